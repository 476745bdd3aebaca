"""Payload fields are untrusted after the signature: what ingress lets through (issue 12, item 2).

A valid signature or token proves who sent a delivery, not that its fields are harmless: a
clone URL that is a git option or another host, a sha that is an API path, a ref that overflows
a column, a repository the operator does not serve. Here: the endpoint on SQLite and
PostgreSQL with real signed payloads, and the reporters against the forge stand-ins (the pure
checks are in test_webhooks_checks.py). Only what main had is imported, so each of these
fails on the code before the fix for the reason it tests, not for a missing name.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy

import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from bot.app import create_app
from bot.models import BuildStatus, builds, deliveries
from bot.reporters.commit_status import commit_status
from bot.reporters.errors import ReportError
from bot.reporters.github import GitHubClient
from bot.reporters.gitlab import GitLabClient
from tests.standins.github import GitHubStandIn
from tests.standins.gitlab import GitLabStandIn
from tests.support import github_payload, gitlab_payload, make_settings, post_github, post_gitlab, wait_until

TRAVERSAL_SHA = "../../../projects/5/members?user_id=42&access_level=50"
SHA = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
TOKEN = "glpat-trust-test"


def bad_clone_urls(tmp_path) -> dict[str, str]:
    """The three clone URLs of the review: a git option, a local repository, another host."""
    return {
        "option": f"--upload-pack=touch {tmp_path / 'pwned'}",
        "file": f"file://{tmp_path}/acme/app.git",
        "other host": "https://attacker.example/acme/app.git",
    }


def _count(db, table) -> int:
    return db.read_sync(lambda conn: conn.execute(select(func.count()).select_from(table)).scalar_one())


# -- the endpoint (SQLite and PostgreSQL) ----------------------------------------------------------


def _push(clone_url: str | None = None, **changes) -> dict:
    payload = github_payload("push.payload.4")  # derived: the fields under test changed
    if clone_url is not None:
        payload["repository"]["clone_url"] = clone_url
    payload.update(changes)
    return payload


@pytest.mark.parametrize("which", ["option", "file", "other host"])
def test_github_bad_clone_url_is_refused_and_nothing_stored(client, db, tmp_path, which):
    url = bad_clone_urls(tmp_path)[which]
    response = post_github(client, "push", _push(url), delivery=f"bad-{which}")
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"clone URL {url[:40]!r}"[:-1])
    assert response.json()["error"].endswith(" is not on https://github.com, the forge's URL (IMAGEBOT_GITHUB_URL)")
    assert _count(db, builds) == 0 and _count(db, deliveries) == 0


@pytest.mark.parametrize("which", ["option", "file", "other host"])
def test_gitlab_bad_clone_url_is_refused_and_nothing_stored(client, db, tmp_path, which):
    payload = gitlab_payload("push")  # derived: the clone URL changed
    payload["project"]["git_http_url"] = bad_clone_urls(tmp_path)[which]
    response = post_gitlab(client, "Push Hook", payload, delivery=f"bad-{which}")
    assert response.status_code == 400, response.text
    assert "is not on http://example.com, the forge's URL (IMAGEBOT_GITLAB_URL)" in response.json()["error"]
    assert _count(db, builds) == 0 and _count(db, deliveries) == 0


def test_clone_url_of_another_repository_is_refused(client, db):
    """The allowlist checks ``full_name``; the URL git fetches must be that repository's."""
    response = post_github(client, "push", _push("https://github.com/secret/other.git"), delivery="o")
    assert response.status_code == 400
    assert "is not the one of Codertocat/Hello-World" in response.json()["error"]
    assert _count(db, builds) == 0


@pytest.mark.parametrize(("event", "payload", "field_"), [
    ("push", _push(after=TRAVERSAL_SHA), "after"),
    ("push", _push(ref="refs/heads/" + "x" * 600), "ref"),
    ("push", _push(ref="refs/heads/a..b"), "ref"),
    ("push", _push(ref="refs/heads/--upload-pack=x:y"), "ref"),
])
def test_github_bad_fields_are_refused_naming_them(client, db, event, payload, field_):
    response = post_github(client, event, payload, delivery="f")
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(f"payload field {field_} ")
    assert _count(db, builds) == 0 and _count(db, deliveries) == 0


def test_github_pull_request_head_sha_and_number(client, db):
    payload = github_payload("pull_request.opened.0")  # derived: hostile head sha, then number
    payload["pull_request"]["head"]["sha"] = TRAVERSAL_SHA
    response = post_github(client, "pull_request", payload, delivery="p1")
    assert response.status_code == 400 and "pull_request.head.sha is not a commit sha" in response.json()["error"]
    payload = github_payload("pull_request.opened.0")
    payload["pull_request"]["number"] = 2**40  # an INTEGER column: a 500 on PostgreSQL before
    response = post_github(client, "pull_request", payload, delivery="p2")
    assert response.status_code == 400 and "pull_request.number is out of range" in response.json()["error"]
    assert _count(db, builds) == 0


def test_over_long_ref_and_repo_and_event_are_400_not_500(client, db):
    """PostgreSQL refuses a value longer than its column (SQLite stores it): bounded at ingress."""
    gitlab = gitlab_payload("push")  # derived: a 600-character branch name
    gitlab["ref"] = "refs/heads/" + "b" * 600
    response = post_gitlab(client, "Push Hook", gitlab, delivery="long-ref")
    assert response.status_code == 400
    assert response.json()["error"].startswith("payload field ref is 611 bytes long, over the limit of 255")
    deep = gitlab_payload("push")  # derived: a path longer than the repo column
    deep["project"]["path_with_namespace"] = "g/" + "/".join(["s" * 99] * 3)
    deep["project"]["git_http_url"] = f"http://example.com/{deep['project']['path_with_namespace']}.git"
    response = post_gitlab(client, "Push Hook", deep, delivery="long-repo")
    assert response.status_code == 400 and "is not a repository path" in response.json()["error"]
    long_event = "push" + "_" * 100  # the header may be 128 characters, the column 64
    response = post_github(client, long_event, _push(), delivery="long-event")
    assert response.status_code == 400 and response.json()["error"].startswith("event 'push____")
    action = github_payload("pull_request.labeled.8")  # derived: an action longer than its column
    action["action"] = "l" * 65
    response = post_github(client, "pull_request", action, delivery="long-action")
    assert response.status_code == 400 and "payload field action is not an action name" in response.json()["error"]
    assert _count(db, builds) == 0 and _count(db, deliveries) == 0


def test_vendored_payloads_still_build(client, db):
    assert post_github(client, "push", _push(), delivery="ok").status_code == 201
    assert post_gitlab(client, "Merge Request Hook", gitlab_payload("merge_request"), delivery="mr").status_code == 201
    assert _count(db, builds) == 2


@pytest.fixture
def allowlisted(db, db_url):
    settings = make_settings(db_url, repositories=["github:Codertocat/*", "gitlab:group/*"])
    with TestClient(create_app(settings, run_worker=False, db=db)) as served:
        yield served


def _gitlab_push(path: str) -> dict:
    payload = gitlab_payload("push")  # derived: another project
    payload["project"].update(path_with_namespace=path, git_http_url=f"http://example.com/{path}.git")
    return payload


def test_unlisted_repositories_are_ignored_and_recorded(allowlisted, db):
    other = _push("https://github.com/Octocat/Other.git")
    other["repository"]["full_name"] = "Octocat/Other"
    response = post_github(allowlisted, "push", other, delivery="unlisted")
    assert response.status_code == 202
    assert response.json() == {
        "delivery": "unlisted", "duplicate": False, "outcome": "ignored",
        "reason": "repository Octocat/Other is not one this bot serves (IMAGEBOT_REPOSITORIES)",
    }
    sub = post_gitlab(allowlisted, "Push Hook", _gitlab_push("group/sub/app"), delivery="sub")
    assert sub.status_code == 202 and sub.json()["outcome"] == "ignored"  # group/* is no subgroup
    stored = db.read_sync(lambda conn: list(conn.execute(select(deliveries).order_by(deliveries.c.id))))
    assert [(d.repo, d.outcome, d.build_id) for d in stored] == [
        ("Octocat/Other", "ignored", None), ("group/sub/app", "ignored", None)]
    assert stored[0].reason == response.json()["reason"]
    assert _count(db, builds) == 0
    assert post_github(allowlisted, "push", _push(), delivery="listed").status_code == 201
    assert post_gitlab(allowlisted, "Push Hook", _gitlab_push("group/app"), delivery="g").status_code == 201
    assert _count(db, builds) == 2


# -- no forge request for a hostile sha --------------------------------------------------------------


@pytest.fixture
def gitlab_served(db, db_url):
    """The app reporting to the GitLab stand-in, whose URL is also the clone URLs' forge."""
    with GitLabStandIn(tokens={TOKEN}, projects={5: "mike/diaspora"}) as gitlab:
        settings = make_settings(db_url, gitlab_url=gitlab.url, gitlab_api_token=TOKEN)
        with TestClient(create_app(settings, run_worker=False, db=db)) as served:
            yield served, gitlab
        gitlab.assert_no_violations()


def test_traversal_sha_is_refused_and_the_forge_sees_no_request(gitlab_served, db):
    served, gitlab = gitlab_served
    payload = gitlab_payload("push")  # derived: our stand-in's URL, then a hostile sha
    payload["project"]["git_http_url"] = f"{gitlab.url}/mike/diaspora.git"
    hostile = copy.deepcopy(payload)
    hostile["after"] = hostile["checkout_sha"] = TRAVERSAL_SHA
    response = post_gitlab(served, "Push Hook", hostile, delivery="traversal")
    assert response.status_code == 400
    assert response.json()["error"] == f"payload field after is not a commit sha (40 or 64 hex digits): {TRAVERSAL_SHA!r}"
    assert _count(db, builds) == 0
    # A good delivery afterwards is reported: once the stand-in has its status, the sender has
    # had its chance at everything owed before it.
    assert post_gitlab(served, "Push Hook", payload, delivery="good").status_code == 201
    wait_until(lambda: gitlab.requests, what="the pending status of the good build")
    assert [(r.method, r.path) for r in gitlab.requests] == [
        ("POST", f"/api/v4/projects/mike%2Fdiaspora/statuses/{SHA}")]


def _status():
    return commit_status("gitlab", 1, BuildStatus.queued, ["linux/amd64"], None, None, "https://ci.example")


def test_gitlab_reporter_quotes_every_segment():
    """Defence in depth: a sha that slipped past ingress (an old row) stays one path segment."""
    with GitLabStandIn(tokens={TOKEN}, projects={5: "mike/diaspora"}) as gitlab:
        client = GitLabClient(make_settings(gitlab_url=gitlab.url, gitlab_api_token=TOKEN))

        async def go():
            try:
                await client.create_status("mike/diaspora", TRAVERSAL_SHA, _status(), "imagebot")
            finally:
                await client.aclose()

        with contextlib.suppress(ReportError):  # whatever GitLab answers, the path is the point
            asyncio.run(go())
        (request,) = gitlab.requests
    assert request.path == (
        "/api/v4/projects/mike%2Fdiaspora/statuses/..%2F..%2F..%2Fprojects%2F5%2Fmembers%3Fuser_id%3D42%26access_level%3D50")
    assert request.query == {}


def test_github_reporter_quotes_every_segment():
    token = "ghp_trust-test"
    with GitHubStandIn(tokens={token}) as github:
        client = GitHubClient(make_settings(github_api_url=github.url, github_token=token))

        async def go():
            try:
                await client.create_status("Codertocat/Hello-World", "../../../user/keys?x=1", _status(), "imagebot")
            finally:
                await client.aclose()

        with contextlib.suppress(ReportError):
            asyncio.run(go())
        (request,) = github.requests
    # The stand-in sees the decoded path; unquoted, the client would have sent /repos/user/keys?x=1.
    assert request.path.startswith("/repos/Codertocat/Hello-World/statuses/") and request.query == ""
