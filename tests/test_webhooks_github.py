"""GitHub ingress: the pure decisions on real payloads, and the endpoint on both databases.

Payloads are @octokit/webhooks-examples (tests/data/webhooks/README.md). Cases the examples do
not cover (a fork PR, a `[skip ci]` push, a branch deletion) are real payloads with one field
changed, and say so.
"""

from __future__ import annotations

import copy
import json
from urllib.parse import urlencode

import pytest
from gidgethub import sansio
from sqlalchemy import func, select

from bot.models import BuildKind, builds, deliveries
from bot.queue import BuildRequest, CancelRef, Ignore, Ping
from bot.webhooks import github
from bot.webhooks.ingress import WebhookError, decide
from tests.support import GITHUB_SECRET, WEBHOOKS, github_headers, github_payload, post_github, sign

INDEX = json.loads((WEBHOOKS / "github" / "index.json").read_text())

# Expected outcome of every vendored payload: (HTTP status, outcome, facts of the build).
EXPECTED = {
    "push.payload.0.json": (201, "queued", {"kind": "tag", "ref": "refs/tags/simple-tag"}),
    "push.payload.1.json": (200, "cancelled", {}),
    "push.payload.2.json": (200, "cancelled", {}),
    "push.payload.3.json": (200, "cancelled", {}),
    "push.payload.4.json": (201, "queued", {"kind": "branch", "ref": "refs/heads/master"}),
    "push.payload.5.json": (201, "queued", {"kind": "branch", "ref": "refs/heads/master"}),
    "push.payload.6.json": (200, "cancelled", {}),
    "pull_request.opened.0.json": (201, "queued", {"kind": "pull_request", "pr_number": 2, "fork": False}),
    "pull_request.opened.12.json": (201, "queued", {"kind": "pull_request", "pr_number": 2}),
    "pull_request.opened.13.json": (201, "queued", {"kind": "pull_request", "pr_number": 2}),
    "pull_request.opened.14.json": (201, "queued", {"kind": "pull_request", "pr_number": 2}),
    "pull_request.reopened.18.json": (201, "queued", {"ref": "refs/pull/2/head"}),
    "pull_request.reopened.19.json": (201, "queued", {"ref": "refs/pull/2/head"}),
    "pull_request.synchronize.22.json": (
        201, "queued", {"ref": "refs/pull/2/head", "sha": "ec26c3e57ca3a959ca5aad62de7213c562f8c821"},
    ),
    "pull_request.closed.3.json": (202, "ignored", {}),
    "pull_request.closed.4.json": (202, "ignored", {}),
    "pull_request.labeled.8.json": (202, "ignored", {}),
    "ping.payload.0.json": (200, "ping", {}),
    "ping.payload.1.json": (200, "ping", {}),
    "ping.payload.2.json": (200, "ping", {}),
    "ping.payload.3.json": (200, "ping", {}),
    "check_run.requested_action.6.json": (202, "ignored", {}),  # not imagebot's button
    "check_run.rerequested.7.json": (
        201, "queued", {"kind": "branch", "ref": "refs/heads/master", "trigger": "check_run"},
    ),
    "check_run.rerequested.8.json": (201, "queued", {"sha": "d6fde92930d4715a2b49857d24b940956b26d2d3"}),
    "check_run.created.0.json": (202, "ignored", {}),
    "check_suite.rerequested.7.json": (
        201, "queued", {"kind": "pull_request", "pr_number": 2, "trigger": "check_suite"},
    ),
    "check_suite.rerequested.8.json": (201, "queued", {"ref": "refs/pull/2/head"}),
    "check_suite.requested.4.json": (202, "ignored", {}),
    "installation.created.1.json": (202, "ignored", {}),
    "installation.deleted.0.json": (202, "ignored", {}),
}


#: Vendored payloads whose clone URL is plain http://github.com: the endpoint refuses them, since
#: a clone URL must be on IMAGEBOT_GITHUB_URL (https://github.com by default), scheme included.
PLAIN_HTTP_CLONE_URL = {"check_run.rerequested.7.json", "check_run.rerequested.8.json"}


def test_every_vendored_payload_has_an_expectation():
    assert {entry["file"] for entry in INDEX} == set(EXPECTED)


def _decide(event: str, payload: dict):
    import asyncio

    return asyncio.run(decide(github.router, sansio.Event(payload, event=event, delivery_id="x")))


# -- signature --------------------------------------------------------------------------------


def test_githubs_documented_signature_vector():
    vector = json.loads((WEBHOOKS / "github" / "signature_vector.json").read_text())
    github.verify_signature(vector["secret"].encode(), vector["body"].encode(), vector["signature"])
    with pytest.raises(WebhookError) as bad:
        github.verify_signature(vector["secret"].encode(), b"Hello, World?", vector["signature"])
    assert bad.value.status == 401


@pytest.mark.parametrize("header", [None, "", "sha1=abc", "sha256=" + "0" * 64, "sha256=zz"])
def test_signature_rejects(header):
    with pytest.raises(WebhookError) as exc:
        github.verify_signature(b"secret", b"{}", header)
    assert exc.value.status == 401 and exc.value.kind == "signature"


# -- pure decisions on real payloads ------------------------------------------------------------


@pytest.mark.parametrize("entry", INDEX, ids=lambda e: e["file"])
def test_decision_for_every_vendored_payload(entry):
    payload = github_payload(entry["file"].removesuffix(".json"))
    decision = _decide(entry["event"], payload)
    _, outcome, facts = EXPECTED[entry["file"]]
    expected_type = {"queued": BuildRequest, "cancelled": CancelRef, "ignored": Ignore, "ping": Ping}
    assert isinstance(decision, expected_type[outcome]), decision
    for name, value in facts.items():
        actual = getattr(decision, name)
        assert (actual.value if isinstance(actual, BuildKind) else actual) == value
    if isinstance(decision, BuildRequest):
        assert decision.repo == payload["repository"]["full_name"]
        assert decision.clone_url == payload["repository"]["clone_url"]
        assert len(decision.sha) == 40
        assert decision.installation_id == entry["summary"].get("installation_id")


def test_push_carries_default_branch_and_installation():
    decision = _decide("push", github_payload("push.payload.3"))  # tag deletion, installation 1
    assert decision == CancelRef("github", "Codertocat/Hello-World", "refs/tags/simple-tag", "tag deleted")
    build = _decide("push", github_payload("push.payload.5"))
    assert build.default_branch == "master" and build.installation_id == 1


def test_fork_pull_request_is_marked():
    payload = github_payload("pull_request.opened.0")  # derived: head repo changed to a fork
    payload["pull_request"]["head"]["repo"]["full_name"] = "someone-else/Hello-World"
    assert _decide("pull_request", payload).fork is True
    payload["pull_request"]["head"]["repo"] = None  # the fork was deleted
    assert _decide("pull_request", payload).fork is True


@pytest.mark.parametrize("marker", ["[skip ci]", "[ci skip]", "[no ci]", "[SKIP CI]"])
def test_skip_markers(marker):
    payload = github_payload("push.payload.4")  # derived: head commit message changed
    payload["head_commit"]["message"] = f"Fix typo {marker}\n\nbody"
    decision = _decide("push", payload)
    assert decision.skip_reason == f"{marker.lower()} in the head commit message"


def test_check_run_retry_button_rebuilds():
    payload = github_payload("check_run.requested_action.6")  # derived: our own identifier
    payload["requested_action"]["identifier"] = "retry"
    decision = _decide("check_run", payload)
    assert decision.kind is BuildKind.pull_request and decision.pr_number == 26764
    assert decision.sha == "5bd5f196a46b8222fb7484f05faba41a73cf34bd"


def test_rerequest_without_branch_or_pr_is_ignored_with_reason():
    payload = github_payload("check_suite.rerequested.7")  # derived: detached head, no PR
    payload["check_suite"]["head_branch"] = None
    payload["check_suite"]["pull_requests"] = []
    decision = _decide("check_suite", payload)
    assert isinstance(decision, Ignore) and "cannot tell which branch" in decision.reason


def test_push_to_other_refs_is_ignored():
    payload = github_payload("push.payload.4")
    payload["ref"] = "refs/notes/commits"
    assert _decide("push", payload) == Ignore("push to refs/notes/commits is neither a branch nor a tag")


# -- the endpoint -----------------------------------------------------------------------------


def _count(db, table) -> int:
    return db.read_sync(lambda conn: conn.execute(select(func.count()).select_from(table)).scalar_one())


@pytest.mark.parametrize("entry", INDEX, ids=lambda e: e["file"])
def test_endpoint_answers_every_vendored_payload(client, db, entry):
    payload = github_payload(entry["file"].removesuffix(".json"))
    if entry["file"] in PLAIN_HTTP_CLONE_URL:
        refused = post_github(client, entry["event"], payload, delivery=f"http-{entry['file']}")
        assert refused.status_code == 400
        assert refused.json()["error"].startswith("clone URL 'http://github.com/github/hello-world.git' "
                                                  "is not on https://github.com")
        assert _count(db, deliveries) == 0 and _count(db, builds) == 0
        # derived: the https clone URL GitHub sends today
        payload["repository"]["clone_url"] = "https://github.com/github/hello-world.git"
    response = post_github(client, entry["event"], payload, delivery=f"d-{entry['file']}")
    status, outcome, _ = EXPECTED[entry["file"]]
    assert response.status_code == status, response.text
    body = response.json()
    assert body["outcome"] == outcome and body["duplicate"] is False
    if outcome in ("ignored", "ping"):
        assert body["reason"]
    stored = db.read_sync(lambda conn: conn.execute(select(deliveries)).one())
    assert (stored.provider, stored.delivery_id, stored.event) == ("github", f"d-{entry['file']}", entry["event"])
    assert stored.action == payload.get("action") and stored.outcome == outcome
    assert stored.repo == entry["summary"].get("repository_full_name", payload.get("repository", {}).get("full_name"))
    assert stored.build_id == body.get("build_id")


def test_redelivery_creates_nothing(client, db):
    payload = github_payload("push.payload.4")
    first = post_github(client, "push", payload, delivery="same-id")
    again = post_github(client, "push", payload, delivery="same-id")
    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json() == {**first.json(), "duplicate": True}
    assert _count(db, builds) == 1 and _count(db, deliveries) == 1


def test_new_build_supersedes_queued_builds_of_the_same_ref(client, db):
    payload = github_payload("push.payload.4")
    first = post_github(client, "push", payload, delivery="a").json()
    other = copy.deepcopy(payload)  # derived: a push to another branch
    other["ref"] = "refs/heads/feature"
    post_github(client, "push", other, delivery="b")
    newer = copy.deepcopy(payload)  # derived: the next push to the same branch
    newer["before"], newer["after"] = payload["after"], "f" * 40
    second = post_github(client, "push", newer, delivery="c").json()
    assert second["superseded"] == [first["build_id"]]
    rows = {r.id: r for r in db.read_sync(lambda conn: list(conn.execute(select(builds))))}
    assert len(rows) == 3  # each accepted push has its own row
    assert rows[first["build_id"]].status == "superseded"
    assert rows[first["build_id"]].error_message == f"superseded by build {second['build_id']}"
    assert rows[first["build_id"]].finished_at is not None
    assert [r.status for r in rows.values() if r.ref == "refs/heads/feature"] == ["queued"]
    assert rows[second["build_id"]].status == "queued"


def test_skip_ci_records_a_skipped_build(client, db):
    payload = github_payload("push.payload.4")  # derived: [skip ci] in the head commit
    payload["head_commit"]["message"] = "docs only [skip ci]"
    queued = post_github(client, "push", github_payload("push.payload.4"), delivery="q").json()
    response = post_github(client, "push", payload, delivery="s")
    assert response.status_code == 201
    body = response.json()
    assert body["outcome"] == "skipped" and body["reason"] == "[skip ci] in the head commit message"
    row = db.read_sync(lambda conn: conn.execute(select(builds).where(builds.c.id == body["build_id"])).one())
    assert row.status == "skipped" and row.finished_at is not None
    # a skipped commit builds nothing, so it does not supersede the queued build of the ref
    other = db.read_sync(lambda conn: conn.execute(select(builds).where(builds.c.id == queued["build_id"])).one())
    assert other.status == "queued"


def test_branch_deletion_cancels_queued_builds_of_that_ref(client, db):
    payload = github_payload("push.payload.4")
    queued = post_github(client, "push", payload, delivery="1").json()
    feature = copy.deepcopy(payload)
    feature["ref"] = "refs/heads/feature"
    kept = post_github(client, "push", feature, delivery="2").json()
    deletion = github_payload("push.payload.1")  # derived: the tag deletion, for the branch
    deletion["ref"] = "refs/heads/master"
    response = post_github(client, "push", deletion, delivery="3")
    assert response.status_code == 200
    assert response.json()["cancelled"] == [queued["build_id"]]
    assert response.json()["reason"] == "branch deleted"
    status = dict(db.read_sync(lambda conn: list(conn.execute(select(builds.c.id, builds.c.status)))))
    assert status == {queued["build_id"]: "cancelled", kept["build_id"]: "queued"}


def test_form_encoded_delivery(client):
    payload = json.dumps(github_payload("ping.payload.0"))
    body = urlencode({"payload": payload}).encode()
    headers = github_headers("ping", body, "form-1")
    headers["content-type"] = "application/x-www-form-urlencoded"
    response = client.post("/webhooks/github", content=body, headers=headers)
    assert response.status_code == 200 and response.json()["outcome"] == "ping"


# -- bad input: exact status and reason ---------------------------------------------------------


def _post_raw(client, body: bytes, **headers):
    base = {"content-type": "application/json", "x-github-event": "push", "x-github-delivery": "bad"}
    base.update({k.replace("_", "-"): v for k, v in headers.items() if v is not None})
    for k in [k for k, v in headers.items() if v is None]:
        base.pop(k.replace("_", "-"), None)
    return client.post("/webhooks/github", content=body, headers=base)


def test_missing_signature(client, db):
    response = _post_raw(client, b"{}")
    assert response.status_code == 401
    assert response.json() == {"error": "missing X-Hub-Signature-256 header", "kind": "signature"}
    assert _count(db, deliveries) == 0


def test_wrong_signature(client):
    response = _post_raw(client, b"{}", x_hub_signature_256=sign(b"{}", "other-secret"))
    assert response.status_code == 401
    assert response.json()["error"] == "X-Hub-Signature-256 does not match the payload"


@pytest.mark.parametrize(
    ("missing", "reason"),
    [("x_github_event", "missing x-github-event header"), ("x_github_delivery", "missing x-github-delivery header")],
)
def test_missing_headers(client, missing, reason):
    response = _post_raw(client, b"{}", x_hub_signature_256=sign(b"{}"), **{missing: None})
    assert response.status_code == 400 and response.json()["error"] == reason


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "payload is not valid JSON"),
        (b"[1, 2]", "payload is not a JSON object"),
        (b"\xff\xfe", "payload is not valid JSON"),
    ],
)
def test_malformed_json(client, db, body, reason):
    response = _post_raw(client, body, x_hub_signature_256=sign(body))
    assert response.status_code == 400 and response.json()["error"].startswith(reason)
    assert _count(db, deliveries) == 0


def test_payload_missing_a_field_names_it(client):
    payload = github_payload("push.payload.4")
    del payload["repository"]["clone_url"]
    response = post_github(client, "push", payload, delivery="x")
    assert response.status_code == 400
    assert response.json() == {"error": "payload has no repository.clone_url", "kind": "payload"}
    payload = github_payload("pull_request.opened.0")
    payload["pull_request"]["number"] = "two"
    response = post_github(client, "pull_request", payload, delivery="y")
    assert response.json()["error"] == "payload field pull_request.number has the wrong type"


def test_oversized_body_refused_by_content_length(client):
    limit = client.app.state.settings.max_payload_bytes
    body = b"x" * (limit + 1)
    response = _post_raw(client, body, x_hub_signature_256=sign(body))
    assert response.status_code == 413
    assert response.json()["error"] == f"payload of {limit + 1} bytes is over the limit of {limit}"


def test_oversized_chunked_body_refused_while_streaming(client):
    limit = client.app.state.settings.max_payload_bytes
    sent = 0

    def chunks():
        nonlocal sent
        for _ in range(limit // 65536 + 8):
            sent += 65536
            yield b"x" * 65536

    response = client.post(
        "/webhooks/github", content=chunks(),
        headers={"x-github-event": "push", "x-github-delivery": "big", "x-hub-signature-256": "sha256=00"},
    )
    assert response.status_code == 413
    assert response.json()["error"] == f"payload is over the limit of {limit} bytes"


def test_not_configured(db, db_url):
    from starlette.testclient import TestClient

    from bot.app import create_app
    from tests.support import make_settings

    app = create_app(make_settings(db_url, github_webhook_secret=None), run_worker=False, db=db)
    with TestClient(app) as unconfigured:
        response = post_github(unconfigured, "ping", github_payload("ping.payload.0"), "n")
    assert response.status_code == 503
    assert response.json()["error"] == "GitHub webhooks are not configured"


def test_secret_is_never_echoed(client):
    response = _post_raw(client, b"{}", x_hub_signature_256="sha256=" + "a" * 64)
    assert GITHUB_SECRET not in response.text
