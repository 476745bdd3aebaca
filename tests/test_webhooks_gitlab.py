"""GitLab ingress on the sample payloads of GitLab's webhook documentation
(tests/data/webhooks/README.md); variations are those payloads with one field changed."""

from __future__ import annotations

import asyncio

import pytest
from gidgethub import sansio
from sqlalchemy import func, select

from bot.models import BuildKind, builds, deliveries
from bot.queue import BuildRequest, CancelRef, Ignore
from bot.webhooks import gitlab
from bot.webhooks.ingress import WebhookError, decide
from tests.support import GITLAB_TOKEN, gitlab_payload, post_gitlab

ZERO = "0" * 40


def _decide(event: str, payload: dict):
    return asyncio.run(decide(gitlab.router, sansio.Event(payload, event=event, delivery_id="x")))


def test_push_hook():
    decision = _decide("Push Hook", gitlab_payload("push"))
    assert decision == BuildRequest(
        provider="gitlab",
        repo="mike/diaspora",
        clone_url="http://example.com/mike/diaspora.git",
        ref="refs/heads/master",
        sha="da1560886d4f094c3e6c9ef40349f7d38b5d27d7",
        kind=BuildKind.branch,
        trigger="Push Hook",
        default_branch="master",
    )


def test_tag_push_hook():
    decision = _decide("Tag Push Hook", gitlab_payload("tag_push"))
    assert decision.kind is BuildKind.tag and decision.ref == "refs/tags/v1.0.0"
    assert decision.sha == "82b3d5ae55f7080f1e6022629cdb57bfae7cccc7"
    assert decision.repo == "jsmith/example"


def test_merge_request_hook_open():
    decision = _decide("Merge Request Hook", gitlab_payload("merge_request"))
    assert decision.kind is BuildKind.pull_request
    assert (decision.pr_number, decision.ref) == (1, "refs/merge-requests/1/head")
    assert decision.sha == "da1560886d4f094c3e6c9ef40349f7d38b5d27d7"
    assert decision.fork is False  # source and target project are both 14


@pytest.mark.parametrize(
    ("action", "oldrev", "builds_"),
    [("reopen", None, True), ("update", "abc123", True), ("update", None, False),
     ("close", None, False), ("merge", None, False), ("approved", None, False)],
)
def test_merge_request_actions(action, oldrev, builds_):
    payload = gitlab_payload("merge_request")
    payload["object_attributes"]["action"] = action
    if oldrev:
        payload["object_attributes"]["oldrev"] = oldrev
    decision = _decide("Merge Request Hook", payload)
    assert isinstance(decision, BuildRequest) is builds_, decision
    if not builds_:
        assert decision.reason


def test_fork_merge_request():
    payload = gitlab_payload("merge_request")
    payload["object_attributes"]["source_project_id"] = 99
    assert _decide("Merge Request Hook", payload).fork is True


def test_branch_and_tag_deletion_cancel():
    push = gitlab_payload("push")
    push["after"], push["checkout_sha"] = ZERO, None
    assert _decide("Push Hook", push) == CancelRef("gitlab", "mike/diaspora", "refs/heads/master", "branch deleted")
    tag = gitlab_payload("tag_push")
    tag["after"], tag["checkout_sha"] = ZERO, None
    assert _decide("Tag Push Hook", tag).reason == "tag deleted"


def test_skip_marker_in_the_head_commit_only():
    payload = gitlab_payload("push")
    payload["commits"][1]["message"] = "fixed readme [ci skip]"  # the head commit
    assert _decide("Push Hook", payload).skip_reason == "[ci skip] in the head commit message"
    payload = gitlab_payload("push")
    payload["commits"][0]["message"] = "older commit [skip ci]"
    assert _decide("Push Hook", payload).skip_reason is None


def test_other_events_are_ignored():
    assert _decide("Note Hook", {}) == Ignore("event 'Note Hook' does not build")


@pytest.mark.parametrize("header", [None, "", "wrong"])
def test_token_rejected(header):
    with pytest.raises(WebhookError) as exc:
        gitlab.verify_token(GITLAB_TOKEN.encode(), header)
    assert exc.value.status == 401


# -- the endpoint -----------------------------------------------------------------------------


def _count(db, table) -> int:
    return db.read_sync(lambda conn: conn.execute(select(func.count()).select_from(table)).scalar_one())


@pytest.mark.parametrize(
    ("event", "name", "ref"),
    [("Push Hook", "push", "refs/heads/master"), ("Tag Push Hook", "tag_push", "refs/tags/v1.0.0"),
     ("Merge Request Hook", "merge_request", "refs/merge-requests/1/head")],
)
def test_endpoint_queues_builds(client, db, event, name, ref):
    response = post_gitlab(client, event, gitlab_payload(name), delivery=f"uuid-{name}")
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["outcome"] == "queued"
    row = db.read_sync(lambda conn: conn.execute(select(builds)).one())
    assert (row.provider, row.ref, row.status, row.id) == ("gitlab", ref, "queued", body["build_id"])
    delivery = db.read_sync(lambda conn: conn.execute(select(deliveries)).one())
    assert (delivery.provider, delivery.delivery_id, delivery.event) == ("gitlab", f"uuid-{name}", event)


def test_dedupe_by_idempotency_key_or_event_uuid(client, db):
    payload = gitlab_payload("push")
    assert post_gitlab(client, "Push Hook", payload, delivery="k1").status_code == 201
    again = post_gitlab(client, "Push Hook", payload, delivery="k1")
    assert again.status_code == 200 and again.json()["duplicate"] is True
    headers = {"x-gitlab-event": "Push Hook", "x-gitlab-token": GITLAB_TOKEN,
               "x-gitlab-event-uuid": "e-1", "content-type": "application/json"}
    import json

    payload["after"] = payload["checkout_sha"] = "f" * 40  # derived: another push
    body = json.dumps(payload).encode()
    assert client.post("/webhooks/gitlab", content=body, headers=headers).status_code == 201
    assert client.post("/webhooks/gitlab", content=body, headers=headers).json()["duplicate"] is True
    assert _count(db, builds) == 2 and _count(db, deliveries) == 2


def test_without_a_delivery_id_every_push_counts_but_the_same_body_is_a_replay(client, db):
    payload = gitlab_payload("push")
    assert post_gitlab(client, "Push Hook", payload).status_code == 201
    newer = {**payload, "after": "f" * 40, "checkout_sha": "f" * 40}  # derived: the next push
    second = post_gitlab(client, "Push Hook", newer)
    assert second.status_code == 201 and second.json()["duplicate"] is False
    assert second.json()["superseded"] == [1]
    replay = post_gitlab(client, "Push Hook", payload)  # the first body again: it would roll back
    assert replay.status_code == 200 and replay.json()["duplicate"] is True
    assert _count(db, deliveries) == 2 and _count(db, builds) == 2


def test_wrong_token(client, db):
    response = post_gitlab(client, "Push Hook", gitlab_payload("push"), delivery="t", token="nope")
    assert response.status_code == 401
    assert response.json() == {"error": "X-Gitlab-Token is wrong", "kind": "token"}
    assert _count(db, deliveries) == 0


def test_missing_event_header(client):
    response = client.post("/webhooks/gitlab", content=b"{}", headers={"x-gitlab-token": GITLAB_TOKEN})
    assert response.status_code == 400 and response.json()["error"] == "missing x-gitlab-event header"


def test_malformed_json(client):
    response = client.post(
        "/webhooks/gitlab", content=b"{", headers={"x-gitlab-token": GITLAB_TOKEN, "x-gitlab-event": "Push Hook"}
    )
    assert response.status_code == 400 and response.json()["error"].startswith("payload is not valid JSON")


def test_oversized(client):
    limit = client.app.state.settings.max_payload_bytes
    response = client.post(
        "/webhooks/gitlab", content=b" " * (limit + 1),
        headers={"x-gitlab-token": GITLAB_TOKEN, "x-gitlab-event": "Push Hook"},
    )
    assert response.status_code == 413


def test_ignored_event_answers_202_with_reason(client):
    response = post_gitlab(client, "Pipeline Hook", {"object_kind": "pipeline"}, delivery="p")
    assert response.status_code == 202
    assert response.json()["reason"] == "event 'Pipeline Hook' does not build"


def test_not_configured(db, db_url):
    from starlette.testclient import TestClient

    from bot.app import create_app
    from tests.support import make_settings

    app = create_app(make_settings(db_url, gitlab_webhook_token=None), run_worker=False, db=db)
    with TestClient(app) as unconfigured:
        response = post_gitlab(unconfigured, "Push Hook", gitlab_payload("push"))
    assert response.status_code == 503
    assert response.json()["error"] == "GitLab webhooks are not configured"
