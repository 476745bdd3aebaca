"""Private repositories stay private: a build records its repository's visibility, anonymous
readers see public repositories only (a private build is 404, as if it did not exist), the read
token, the admin token and the dashboard's login see everything, and the operator can close the
whole page or /metrics. On SQLite and PostgreSQL, over the app's real routes."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import pytest
from starlette.testclient import TestClient

from bot import telemetry
from bot.app import create_app
from bot.models import utcnow
from bot.webhooks import github, gitlab
from tests.support import github_payload, gitlab_payload, make_settings, post_github
from tests.test_queue import enqueue, request

READ = "read-token-for-tests"
ADMIN = "admin-token-for-tests"
READER = {"Authorization": f"Bearer {READ}"}
COOKIE = "imagebot_session"


@pytest.fixture
def app_for(db, db_url) -> Iterator:
    """``app_for(**settings)``: a TestClient of the app (no worker) on the test's database."""
    clients = []

    def make(**overrides) -> TestClient:
        values = {"read_token": READ, "admin_token": ADMIN, **overrides}
        test_client = TestClient(create_app(make_settings(db_url, **values), run_worker=False, db=db))
        clients.append(test_client.__enter__())
        return test_client

    yield make
    for test_client in clients:
        test_client.__exit__(None, None, None)


@pytest.fixture
def two_builds(db) -> tuple[int, int]:
    """A public build and a private one, each with an event and a log line."""
    secret = dataclasses.replace(request(ref="refs/heads/secret"), repo="acme/secret", visibility="private")
    public, private = enqueue(db, request(), secret)
    for build_id in (public, private):
        db.write_sync(lambda c, b=build_id: telemetry.record(c, b, "build_started", utcnow(), attempt=1))
        db.write_sync(lambda c, b=build_id: telemetry._store_log_lines(c, [(b, None, utcnow(), [f"log of {b}"])]))
    return public, private


# -- what the forges say ------------------------------------------------------------------------


@pytest.mark.parametrize(("private", "seen"), [(False, "public"), (True, "private"), (None, "private")])
def test_github_visibility(private, seen):
    from bot.models import github_visibility

    assert github_visibility(private) == seen


@pytest.mark.parametrize(("level", "name", "seen"), [
    (20, None, "public"), (None, "public", "public"), (20, "public", "public"),
    (10, None, "private"), (None, "internal", "private"), (0, None, "private"), (None, None, "private"),
    (20, "private", "private"),  # the two disagree: the stricter wins
])
def test_gitlab_visibility(level, name, seen):
    from bot.models import gitlab_visibility

    assert gitlab_visibility(level, name) == seen


def test_decisions_carry_the_repositorys_visibility():
    payload = github_payload("push.payload.4")
    assert github.push_decision(payload).visibility == "public"
    payload["repository"]["private"] = True
    assert github.push_decision(payload).visibility == "private"
    del payload["repository"]["private"]
    assert github.push_decision(payload).visibility == "private"
    project = gitlab_payload("push")
    project["project"]["visibility_level"] = 20
    assert gitlab.push_decision(project).visibility == "public"
    project["project"]["visibility_level"] = 10  # internal: signed-in users of that GitLab only
    assert gitlab.push_decision(project).visibility == "private"


def test_a_private_repositorys_push_is_hidden_from_anonymous_readers(app_for):
    bot = app_for()
    payload = github_payload("push.payload.4")
    payload["repository"].update(private=True, full_name="acme/hidden",
                                 clone_url="https://github.com/acme/hidden.git")  # its own, as ingress checks
    build_id = post_github(bot, "push", payload, "private-push-1").json()["build_id"]
    assert build_id not in [b["id"] for b in bot.get("/api/builds").json()["builds"]]
    assert bot.get(f"/api/builds/{build_id}").status_code == 404
    seen = bot.get(f"/api/builds/{build_id}", headers=READER).json()
    assert (seen["repo"], seen["visibility"]) == ("acme/hidden", "private")


# -- anonymous readers -----------------------------------------------------------------------------


def test_anonymous_lists_never_show_a_private_build(app_for, two_builds):
    public, private = two_builds
    bot = app_for()
    assert [b["id"] for b in bot.get("/api/builds").json()["builds"]] == [public]
    assert bot.get("/api/builds", params={"repo": "acme/secret"}).json()["builds"] == []
    assert [r["repo"] for r in bot.get("/api/repos").json()["repos"]] == ["acme/app"]
    page = bot.get("/").text
    assert f"/builds/{public}" in page and "acme/secret" not in page and f"/builds/{private}" not in page


@pytest.mark.parametrize("path", ["/api/builds/{id}", "/api/builds/{id}/events", "/api/builds/{id}/log",
                                  "/api/builds/{id}/reports", "/api/builds/{id}/stream", "/builds/{id}",
                                  "/builds/{id}/live", "/builds/{id}/row"])
def test_a_private_build_is_not_found_for_anonymous_readers(app_for, two_builds, path):
    public, private = two_builds
    bot = app_for()
    hidden = bot.get(path.format(id=private))
    missing = bot.get(path.format(id=private + 1000))
    assert hidden.status_code == missing.status_code == 404
    assert hidden.text.replace(str(private), "N") == missing.text.replace(str(private + 1000), "N")
    if not path.endswith("/stream"):
        assert bot.get(path.format(id=public)).status_code == 200


def test_the_all_builds_stream_leaves_private_builds_out(app_for, db, two_builds):
    from bot.api.stream import Position, read_round

    public, private = two_builds
    seen = db.read_sync(lambda c: read_round(c, Position(), None, True, {public, private}, public_only=True))
    build_ids = {json.loads(m.data).get("build_id", json.loads(m.data).get("id")) for m in seen.messages}
    assert build_ids == {public}
    everything = db.read_sync(lambda c: read_round(c, Position(), None, True, {public, private}))
    assert {json.loads(m.data).get("build_id", json.loads(m.data).get("id")) for m in everything.messages} == {
        public, private}


# -- readers: the tokens and the login ---------------------------------------------------------------


@pytest.mark.parametrize("token", [READ, ADMIN])
def test_the_read_or_admin_token_sees_private_builds(app_for, two_builds, token):
    public, private = two_builds
    bot = app_for()
    headers = {"Authorization": f"Bearer {token}"}
    assert [b["id"] for b in bot.get("/api/builds", headers=headers).json()["builds"]] == [private, public]
    assert bot.get(f"/api/builds/{private}/log", headers=headers).text == f"[build] log of {private}\n"
    assert bot.get(f"/api/builds/{private}/events", headers=headers).status_code == 200
    assert bot.get(f"/api/builds/{private}/reports", headers=headers).status_code == 200


def test_a_wrong_token_is_an_anonymous_reader(app_for, two_builds):
    public, private = two_builds
    bot = app_for()
    wrong = {"Authorization": f"Bearer {READ}x"}
    assert [b["id"] for b in bot.get("/api/builds", headers=wrong).json()["builds"]] == [public]
    assert bot.get(f"/api/builds/{private}", headers=wrong).status_code == 404


def test_the_dashboard_login_sets_a_signed_httponly_samesite_cookie(app_for, two_builds):
    public, private = two_builds
    bot = app_for()
    form = bot.get("/login?next=/builds/{}".format(private))
    assert form.status_code == 200 and 'name="token"' in form.text
    refused = bot.post("/login", data={"token": "guess", "next": "/"}, follow_redirects=False)
    assert refused.status_code == 401 and "set-cookie" not in refused.headers
    answer = bot.post("/login", data={"token": READ, "next": f"/builds/{private}"}, follow_redirects=False)
    assert answer.status_code == 303 and answer.headers["location"] == f"/builds/{private}"
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}=") and "httponly" in cookie.lower() and "samesite=lax" in cookie.lower()
    assert READ not in cookie
    assert bot.get(f"/builds/{private}").status_code == 200  # the client keeps the cookie
    assert [b["id"] for b in bot.get("/api/builds").json()["builds"]] == [private, public]
    assert "acme/secret" in bot.get("/").text

    bot.post("/logout", follow_redirects=False)
    assert bot.get(f"/builds/{private}").status_code == 404


def test_a_forged_or_foreign_session_cookie_counts_for_nothing(app_for, two_builds):
    public, private = two_builds
    other = app_for(read_token="another-deployments-token")
    foreign = other.post("/login", data={"token": "another-deployments-token"}, follow_redirects=False)
    value = foreign.cookies[COOKIE]
    bot = app_for()
    for forged in (value, value[:-2] + "xx", "eyJyZWFkZXIiOnRydWV9"):
        bot.cookies.set(COOKIE, forged)
        assert bot.get(f"/api/builds/{private}").status_code == 404


def test_login_goes_on_to_this_site_only(app_for):
    bot = app_for()
    for target in ("https://evil.example/", "//evil.example/", "/\\evil.example", "/a\r\nSet-Cookie: x=1"):
        answer = bot.post("/login", data={"token": READ, "next": target}, follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"] == "/", target


def test_logins_are_off_without_a_token(app_for):
    bot = app_for(read_token=None, admin_token=None)
    assert bot.post("/login", data={"token": ""}, follow_redirects=False).status_code == 503


# -- the operator's settings --------------------------------------------------------------------------


def test_a_private_status_page_needs_a_reader_for_everything(app_for, two_builds):
    public, private = two_builds
    bot = app_for(status_private=True)
    for path in ("/api/builds", f"/api/builds/{public}", f"/api/builds/{public}/log", "/api/repos",
                 "/api/events", f"/api/builds/{public}/stream", "/metrics"):
        answer = bot.get(path)
        assert answer.status_code == 401 and "read token" in answer.json()["error"], path
        assert answer.headers["www-authenticate"].startswith("Bearer")
    page = bot.get(f"/builds/{public}", follow_redirects=False)
    assert page.status_code == 303 and page.headers["location"] == f"/login?next=%2Fbuilds%2F{public}"
    assert bot.get("/healthz").status_code == 200 and bot.get("/login").status_code == 200
    assert [b["id"] for b in bot.get("/api/builds", headers=READER).json()["builds"]] == [private, public]


def test_metrics_can_be_private(app_for):
    assert app_for().get("/metrics").status_code == 200
    closed = app_for(metrics_private=True)
    assert closed.get("/metrics").status_code == 401
    assert closed.get("/metrics", headers=READER).status_code == 200


def test_a_rebuild_of_a_private_build_stays_private(app_for, two_builds):
    public, private = two_builds
    bot = app_for()
    rebuilt = bot.post(f"/api/builds/{private}/rebuild", headers={"Authorization": f"Bearer {ADMIN}"}).json()
    assert rebuilt["build"]["visibility"] == "private"
    assert bot.get(f"/api/builds/{rebuilt['build']['id']}").status_code == 404
