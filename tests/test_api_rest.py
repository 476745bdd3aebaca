"""The read API: newest first, filters, cursor paging, JSON errors."""

from __future__ import annotations

import pytest

from bot import queue, telemetry
from bot.models import utcnow
from tests.test_queue import LEASE, T0, enqueue, request


@pytest.fixture
def seeded(db):
    ids = enqueue(db, *[request(ref=f"refs/heads/b{i % 3}", sha=f"{i:040x}") for i in range(7)])
    other = queue.BuildRequest(
        provider="gitlab", repo="group/other", clone_url="https://example.test/o.git",
        ref="refs/heads/main", sha="f" * 40, kind=queue.BuildKind.branch, trigger="Push Hook",
        visibility="public",
    )
    ids += enqueue(db, other)
    return ids


def test_list_newest_first(client, seeded):
    body = client.get("/api/builds").json()
    assert [b["id"] for b in body["builds"]] == list(reversed(seeded))
    assert body["next_cursor"] is None
    build = body["builds"][0]
    assert build["repo"] == "group/other" and build["status"] == "queued"
    assert build["created_at"].endswith("Z") and build["platforms"] == ["linux/amd64"]


def test_filters(client, seeded):
    assert {b["repo"] for b in client.get("/api/builds?repo=acme/app").json()["builds"]} == {"acme/app"}
    ref = client.get("/api/builds", params={"ref": "refs/heads/b1"}).json()["builds"]
    assert {b["ref"] for b in ref} == {"refs/heads/b1"}
    # the queue superseded all but the newest per ref
    assert [b["status"] for b in ref] == ["queued", "superseded"]
    assert len(client.get("/api/builds?status=superseded").json()["builds"]) == 4
    assert client.get(f"/api/builds?sha={5:040x}").json()["builds"][0]["id"] == seeded[5]


def test_cursor_paging_covers_everything_once(client, seeded):
    seen, cursor = [], None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        body = client.get("/api/builds", params=params).json()
        seen += [b["id"] for b in body["builds"]]
        cursor = body["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(seeded))


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("limit=0", "limit must be a whole number from 1 to 200"),
        ("limit=abc", "limit must be a whole number from 1 to 200"),
        ("limit=201", "limit must be a whole number from 1 to 200"),
        ("limit=%C2%B2", "limit must be a whole number from 1 to 200"),  # "²" is a digit to str.isdigit
        ("status=done", "status must be one of queued, running, succeeded, failed, cancelled, superseded, skipped"),
        ("cursor=!!!", "cursor is not one this API handed out"),
        ("cursor=YWJj", "cursor is not one this API handed out"),
        ("cursor=Yjk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5OTk5", "cursor is not one this API handed out"),  # b9…9: too big
        ("colour=red", "unknown query parameter(s): colour"),
    ],
)
def test_bad_queries(client, query, reason):
    response = client.get(f"/api/builds?{query}")
    assert response.status_code == 400 and response.json() == {"error": reason}


def test_one_build_and_its_events(client, db, seeded):
    build_id = seeded[0]
    db.write_sync(lambda c: telemetry.record(c, build_id, "build_started", utcnow(), attempt=1))
    assert client.get(f"/api/builds/{build_id}").json()["id"] == build_id
    events = client.get(f"/api/builds/{build_id}/events").json()
    assert events["build_id"] == build_id
    assert [(e["name"], e["data"]) for e in events["events"]] == [("build_started", {"attempt": 1})]


@pytest.mark.parametrize("path", ["/api/builds/999", "/api/builds/abc", "/api/builds/999/events", "/api/builds/-1",
                                  "/api/builds/%C2%B2", "/api/builds/9999999999999999999999"])
def test_unknown_build_is_404_json(client, path):
    response = client.get(path)
    assert response.status_code == 404 and "no build" in response.json()["error"]


def test_unknown_route_is_json(client):
    response = client.get("/api/nothing")
    assert response.status_code == 404 and response.json() == {"error": "Not Found"}
    assert client.post("/api/builds").status_code == 405


def test_healthz(client):
    assert client.get("/healthz").json() == {"status": "ok", "database": "ok"}


def test_failed_build_shows_its_error(client, db, seeded):
    claimed = db.write_sync(lambda c: queue.claim(c, "w", LEASE, T0))
    db.write_sync(lambda c: queue.recover(c, 1, T0 + LEASE * 2))
    body = client.get(f"/api/builds/{claimed.id}").json()
    assert body["status"] == "failed" and body["attempts"] == 1
    assert body["error"]["kind"] == "lease_expired" and "giving up" in body["error"]["message"]
    assert client.get(f"/api/builds/{seeded[-1]}").json()["error"] is None


def test_healthz_is_503_when_the_database_does_not_answer():
    from starlette.testclient import TestClient

    from bot.app import create_app
    from tests.support import make_settings

    settings = make_settings("postgresql+psycopg://nobody:secret-pw@127.0.0.1:1/none")
    with TestClient(create_app(settings, run_worker=False)) as unreachable:
        response = unreachable.get("/healthz")
    assert response.status_code == 503
    assert response.json() == {"status": "unhealthy", "database": "unreachable"}
    assert "secret-pw" not in response.text


# -- what a build produced, its log, repos ------------------------------------------------------


def record_all(db, build_id: int, seen: list[dict]) -> None:
    """Store events in the order given (what the pipeline would have emitted)."""
    for event in seen:
        db.write_sync(lambda c, e=event: telemetry.record(c, build_id, e["name"], utcnow(), e["platform"], **e["data"]))


def test_build_detail_has_per_platform_results_and_the_manifest_list(client, db, seeded):
    from tests.test_summary import DIGEST, whole_build

    build_id = seeded[-1]
    record_all(db, build_id, whole_build())
    body = client.get(f"/api/builds/{build_id}").json()
    assert [r["platform"] for r in body["results"]] == ["linux/amd64", "linux/arm64"]
    amd = body["results"][0]
    assert (amd["status"], amd["digest"], amd["size"], amd["push_attempts"]) == ("pushed", DIGEST, 528, 2)
    assert body["manifest"]["status"] == "published" and body["manifest"]["tags"] == ["main", "latest"]
    # a build with no events yet: its platforms are pending, there is no manifest list
    fresh = client.get(f"/api/builds/{seeded[0]}").json()
    assert [r["status"] for r in fresh["results"]] == ["pending"] and fresh["manifest"] is None


@pytest.fixture
def logged(db, seeded):
    """A build with a 3-line log: 20 + 23 + 20 bytes of text."""
    build_id = seeded[0]
    db.write_sync(lambda c: telemetry._store_log_lines(c, [
        (build_id, None, utcnow(), ["fetched 0123456"]),
        (build_id, "linux/arm64", utcnow(), ["Step 1/2 : FROM x", "ok"]),
    ]))
    return build_id


LOG = "[build] fetched 0123456\n[linux/arm64] Step 1/2 : FROM x\n[linux/arm64] ok\n"


def test_log_is_text(client, logged):
    response = client.get(f"/api/builds/{logged}/log")
    assert response.status_code == 200 and response.text == LOG
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["accept-ranges"] == "bytes"


@pytest.mark.parametrize(
    ("header", "status", "first", "last"),
    [
        ("bytes=0-6", 206, 0, 6),
        ("bytes=24-", 206, 24, len(LOG) - 1),
        ("bytes=-3", 206, len(LOG) - 3, len(LOG) - 1),
        ("bytes=-1000", 206, 0, len(LOG) - 1),  # a suffix longer than the log is all of it
        ("bytes=10-5000", 206, 10, len(LOG) - 1),
        ("BYTES = 1-1", 206, 1, 1),
        ("bytes=0-1,4-5", 200, None, None),  # several ranges: may be ignored, and are
        ("bytes=5-2", 200, None, None),  # invalid: ignored
        ("items=0-1", 200, None, None),  # another unit: ignored
        ("bytes=x-1", 200, None, None),
        ("bytes=\u00b2-".encode("latin-1"), 200, None, None),  # "²": a digit to str.isdigit
    ],
)
def test_log_byte_ranges(client, logged, header, status, first, last):
    response = client.get(f"/api/builds/{logged}/log", headers={"Range": header})
    assert response.status_code == status
    if status == 206:
        assert response.content == LOG.encode()[first:last + 1]
        assert response.headers["content-range"] == f"bytes {first}-{last}/{len(LOG)}"
    else:
        assert response.text == LOG and "content-range" not in response.headers


@pytest.mark.parametrize("header", ["bytes=1000-", f"bytes={len(LOG)}-", "bytes=-0"])
def test_log_range_past_the_end_is_416_json(client, logged, header):
    response = client.get(f"/api/builds/{logged}/log", headers={"Range": header})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(LOG)}"
    assert response.json() == {"error": f"range not satisfiable: the log has {len(LOG)} bytes"}


def test_log_if_range_without_a_validator_sends_everything(client, logged):
    response = client.get(f"/api/builds/{logged}/log", headers={"Range": "bytes=0-3", "If-Range": '"x"'})
    assert response.status_code == 200 and response.text == LOG


def test_empty_log_and_unknown_build(client, seeded):
    assert client.get(f"/api/builds/{seeded[0]}/log").text == ""
    assert client.get(f"/api/builds/{seeded[0]}/log", headers={"Range": "bytes=0-"}).status_code == 416
    assert client.get("/api/builds/999/log").json() == {"error": "no build 999"}


def test_repos_with_last_build_and_success_rate(client, db, seeded):
    claimed = [db.write_sync(lambda c: queue.claim(c, "w", LEASE, T0)) for _ in range(3)]
    db.write_sync(lambda c: queue.finish(c, claimed[0].id, "w", queue.BuildStatus.succeeded, T0))
    db.write_sync(lambda c: queue.finish(c, claimed[1].id, "w", queue.BuildStatus.failed, T0, "build", "x"))
    db.write_sync(lambda c: queue.finish(c, claimed[2].id, "w", queue.BuildStatus.succeeded, T0))
    repos = {r["repo"]: r for r in client.get("/api/repos").json()["repos"]}
    assert list(repos) == ["acme/app", "group/other"]
    app = repos["acme/app"]
    assert (app["builds"], app["succeeded"], app["failed"]) == (7, 2, 1)
    assert app["success_rate"] == 0.6667 and app["last_build"]["id"] == seeded[-2]
    other = repos["group/other"]
    assert other["success_rate"] is None and other["last_build"]["id"] == seeded[-1]


# -- admin: rebuild and cancel ----------------------------------------------------------------

TOKEN = "admin-token-for-tests"


@pytest.fixture
def admin(db, db_url):
    """The app with an admin token and its worker, whose builds run until stopped."""
    from starlette.testclient import TestClient

    from bot.app import create_app
    from tests.support import make_settings

    settings = make_settings(db_url, admin_token=TOKEN, placeholder_build_seconds=600, poll_seconds=0.05,
                             shutdown_grace_seconds=0)
    with TestClient(create_app(settings, db=db)) as test_client:
        yield test_client


def authorized(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.mark.parametrize(
    ("headers", "status", "reason"),
    [
        ({}, 401, "an admin bearer token is needed (Authorization: Bearer <token>)"),
        ({"Authorization": f"Basic {TOKEN}"}, 401, "an admin bearer token is needed (Authorization: Bearer <token>)"),
        ({"Authorization": "Bearer"}, 401, "an admin bearer token is needed (Authorization: Bearer <token>)"),
        (authorized("wrong"), 403, "the admin token is wrong"),
        (authorized(TOKEN + "x"), 403, "the admin token is wrong"),
    ],
)
@pytest.mark.parametrize("action", ["rebuild", "cancel"])
def test_admin_needs_the_token(admin, seeded, headers, status, reason, action):
    response = admin.post(f"/api/builds/{seeded[-1]}/{action}", headers=headers)
    assert response.status_code == status and response.json() == {"error": reason}
    if status == 401:
        assert response.headers["www-authenticate"] == 'Bearer realm="imagebot"'
    after = admin.get("/api/builds").json()["builds"]
    assert [b["id"] for b in after] == list(reversed(seeded))  # no rebuild
    assert "cancelled" not in {b["status"] for b in after}


def test_admin_is_off_without_a_token(client, seeded):
    response = client.post(f"/api/builds/{seeded[0]}/cancel", headers=authorized())
    assert response.status_code == 503
    assert response.json() == {"error": "admin endpoints are off: IMAGEBOT_ADMIN_TOKEN is not set"}


def test_rebuild_queues_the_same_commit_again(admin, db):
    from tests.support import wait_until

    (old,) = enqueue(db, request(sha="b" * 40))
    wait_until(lambda: admin.get(f"/api/builds/{old}").json()["status"] == "running", what="the build to run")
    response = admin.post(f"/api/builds/{old}/rebuild", headers=authorized())
    assert response.status_code == 201
    body = response.json()
    new = body["build"]
    assert response.headers["location"] == f"/api/builds/{new['id']}"
    assert (new["repo"], new["ref"], new["sha"], new["trigger"]) == ("acme/app", "refs/heads/main", "b" * 40, "rebuild")
    assert body["rebuild_of"] == old and body["superseded"] == [old]
    # the running build was stopped by the worker, and said so in its telemetry
    wait_until(lambda: "build_cancelled" in [e["name"] for e in admin.get(f"/api/builds/{old}/events").json()["events"]],
               what="the superseded build to stop")
    assert admin.get(f"/api/builds/{old}").json()["status"] == "superseded"


def test_cancel_ends_a_running_build_and_refuses_an_ended_one(admin, db):
    from tests.support import wait_until

    (build_id,) = enqueue(db, request(sha="c" * 40))
    wait_until(lambda: admin.get(f"/api/builds/{build_id}").json()["status"] == "running", what="the build to run")
    response = admin.post(f"/api/builds/{build_id}/cancel", headers=authorized())
    assert response.status_code == 200
    assert response.json()["build"]["status"] == "cancelled"
    assert response.json()["build"]["error"]["message"] == "cancelled by an administrator"
    events = wait_until(lambda: [e for e in admin.get(f"/api/builds/{build_id}/events").json()["events"]
                                 if e["name"] == "build_cancelled"], what="the worker to stop the build")
    assert events[0]["data"]["reason"] == "cancelled by an administrator"
    again = admin.post(f"/api/builds/{build_id}/cancel", headers=authorized())
    assert again.status_code == 409 and again.json() == {"error": f"build {build_id} already ended (cancelled)"}


@pytest.mark.parametrize("action", ["rebuild", "cancel"])
def test_admin_on_an_unknown_build_is_404(admin, action):
    response = admin.post(f"/api/builds/12345/{action}", headers=authorized())
    assert response.status_code == 404 and response.json() == {"error": "no build 12345"}


def test_a_builds_reports_say_what_the_forge_was_told_and_what_is_pending(client, db):
    from datetime import timedelta

    from bot.reporters import outbox

    first, second = enqueue(db, request(), request())  # the second supersedes the first
    [head] = db.write_sync(lambda c: outbox.claim(c, "s1", 10, LEASE, utcnow()))
    db.write_sync(lambda c: outbox.settle(c, head.id, "s1", ["status", "check_run"], utcnow()))
    [superseded] = db.write_sync(lambda c: outbox.claim(c, "s1", 10, LEASE, utcnow()))
    later = utcnow() + timedelta(seconds=30)
    db.write_sync(lambda c: outbox.retry_at(c, superseded.id, "s1", ["status"], later, "server: 502 Server Error"))
    db.write_sync(lambda c: outbox.set_check_run(c, first, 2**40))

    body = client.get(f"/api/builds/{first}/reports").json()
    assert (body["build_id"], body["check_run_id"]) == (first, 2**40)
    sent, pending = body["reports"]
    assert (sent["status"], sent["state"], sent["targets"], sent["attempts"]) == ("queued", "sent", ["status", "check_run"], 1)
    assert sent["sent_at"].endswith("Z") and sent["next_attempt_at"] is None and sent["last_error"] is None
    assert (pending["status"], pending["state"], pending["targets"]) == ("superseded", "pending", ["status"])
    assert pending["next_attempt_at"] == later.isoformat().replace("+00:00", "Z")
    assert pending["last_error"] == "server: 502 Server Error" and pending["sent_at"] is None
    assert [r["status"] for r in client.get(f"/api/builds/{second}/reports").json()["reports"]] == ["queued"]
    assert client.get("/api/builds/999/reports").status_code == 404
    assert client.get(f"/api/builds/{first}/reports?x=1").status_code == 400
