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
        ("status=done", "status must be one of queued, running, succeeded, failed, cancelled, superseded, skipped"),
        ("cursor=!!!", "cursor is not one this API handed out"),
        ("cursor=YWJj", "cursor is not one this API handed out"),
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


@pytest.mark.parametrize("path", ["/api/builds/999", "/api/builds/abc", "/api/builds/999/events", "/api/builds/-1"])
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
