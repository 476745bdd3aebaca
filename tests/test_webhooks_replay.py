"""Replays: a captured, validly signed body sent again under a fresh delivery id.

The forge's signature covers the body only, so an old push replayed with a new
``X-GitHub-Delivery`` would rebuild an old commit and roll its tags back. Pushes, tags, ref
deletions and pull/merge requests are recognised by their body too (GitHub's own redeliveries
keep id and body alike); re-run requests are not, since a second click of Re-run may send the
very same body and must build again. Through the app, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import copy
import json
import threading

import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from bot.app import create_app
from bot.db import Database
from bot.models import builds, deliveries
from tests.support import GITLAB_TOKEN, github_payload, gitlab_payload, make_settings, post_github


def _count(db, table) -> int:
    return db.read_sync(lambda conn: conn.execute(select(func.count()).select_from(table)).scalar_one())


def _status(db, build_id: int) -> str:
    return db.read_sync(lambda c: c.execute(select(builds.c.status).where(builds.c.id == build_id)).scalar_one())


def test_an_old_push_replayed_with_a_new_guid_builds_nothing_and_rolls_nothing_back(client, db):
    old = github_payload("push.payload.4")
    first = post_github(client, "push", old, delivery="guid-1").json()
    newer = copy.deepcopy(old)  # derived: the next push to the branch
    newer["before"], newer["after"] = old["after"], "f" * 40
    second = post_github(client, "push", newer, delivery="guid-2").json()
    assert second["superseded"] == [first["build_id"]]

    replay = post_github(client, "push", old, delivery="guid-attacker")
    assert replay.status_code == 200
    assert replay.json() == {"delivery": "guid-attacker", "duplicate": True, "duplicate_of": "guid-1",
                             "outcome": "queued", "build_id": first["build_id"]}
    assert _count(db, builds) == 2 and _count(db, deliveries) == 2
    assert _status(db, second["build_id"]) == "queued"  # the newer build was not superseded


@pytest.mark.parametrize("name", ["push.payload.0", "push.payload.1", "pull_request.opened.0",
                                  "pull_request.synchronize.22"])
def test_github_tag_deletion_and_pull_request_bodies_are_recognised(client, db, name):
    event = name.split(".")[0]
    payload = github_payload(name)
    first = post_github(client, event, payload, delivery="original")
    again = post_github(client, event, payload, delivery="fresh")
    assert first.status_code in (200, 201) and again.status_code == 200
    assert again.json()["duplicate"] is True and again.json()["duplicate_of"] == "original"
    assert again.json()["outcome"] == first.json()["outcome"]
    assert _count(db, deliveries) == 1


@pytest.mark.parametrize(("event", "name"), [("Push Hook", "push"), ("Tag Push Hook", "tag_push"),
                                             ("Merge Request Hook", "merge_request")])
def test_gitlab_bodies_are_recognised_under_a_new_idempotency_key(client, db, event, name):
    body = json.dumps(gitlab_payload(name)).encode()
    headers = {"content-type": "application/json", "x-gitlab-event": event, "x-gitlab-token": GITLAB_TOKEN}
    assert client.post("/webhooks/gitlab", content=body, headers={**headers, "idempotency-key": "k1"}).status_code == 201
    again = client.post("/webhooks/gitlab", content=body, headers={**headers, "idempotency-key": "k2"})
    assert again.status_code == 200 and again.json()["duplicate_of"] == "k1"
    assert _count(db, builds) == 1


def _https(payload: dict) -> dict:
    """derived: the https clone URL GitHub sends today (some vendored examples say http, which
    the endpoint refuses: a clone URL must be on IMAGEBOT_GITHUB_URL, scheme included)."""
    payload["repository"]["clone_url"] = payload["repository"]["clone_url"].replace("http://", "https://", 1)
    return payload


def _retry_button() -> dict:
    payload = _https(github_payload("check_run.requested_action.6"))  # derived: our own identifier
    payload["requested_action"]["identifier"] = "retry"
    return payload


@pytest.mark.parametrize(("event", "payload"), [
    ("check_run", _https(github_payload("check_run.rerequested.7"))),
    ("check_suite", _https(github_payload("check_suite.rerequested.8"))),
    ("check_run", _retry_button()),
], ids=["check_run rerequested", "check_suite rerequested", "requested_action retry"])
def test_a_second_rerun_with_the_same_body_builds_again(client, db, event, payload):
    first = post_github(client, event, payload, delivery="click-1")
    second = post_github(client, event, payload, delivery="click-2")
    assert (first.status_code, second.status_code) == (201, 201), second.text
    assert second.json()["duplicate"] is False and second.json()["superseded"] == [first.json()["build_id"]]
    assert _count(db, builds) == 2
    assert post_github(client, event, payload, delivery="click-2").json()["duplicate"] is True  # a redelivery


def test_the_same_body_raced_through_two_processes_builds_once(db, db_url):
    """Two bot processes (two apps, two writers) take one replayed body at the same moment: the
    unique index on the body's digest lets exactly one of them store it."""
    body = json.dumps(github_payload("push.payload.4")).encode()
    from tests.support import github_headers

    other = Database(db_url)
    answers: list[tuple[int, dict]] = []
    try:
        apps = [create_app(make_settings(db_url), run_worker=False, db=d) for d in (db, other)]
        with TestClient(apps[0]) as one, TestClient(apps[1]) as two:
            start = threading.Barrier(2)

            def post(client: TestClient, guid: str) -> None:
                start.wait()
                response = client.post("/webhooks/github", content=body, headers=github_headers("push", body, guid))
                answers.append((response.status_code, response.json()))

            threads = [threading.Thread(target=post, args=(c, g)) for c, g in ((one, "p1"), (two, "p2"))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
    finally:
        other.close()
    assert sorted(status for status, _ in answers) == [200, 201]
    assert [a["duplicate"] for _, a in sorted(answers, key=lambda a: a[0])] == [True, False]
    assert _count(db, builds) == 1 and _count(db, deliveries) == 1
