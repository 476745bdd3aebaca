"""GitHub ingress: ``POST /webhooks/github``.

The endpoint verifies and parses; which deliveries build is decided by plain functions of the
payload, routed by event name with gidgethub's ``Router`` (as bedevere does), so they are
tested with recorded payloads and no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from bot.models import BuildKind, github_visibility
from bot.queue import BuildRequest, CancelRef, Decision, DeliveryInfo, Ignore, Ping
from bot.webhooks import checks
from bot.webhooks.ingress import (
    WebhookError,
    accept,
    field,
    parse_payload,
    read_body,
    required_header,
    router_for,
    skip_reason,
)

PROVIDER = "github"
PR_ACTIONS = ("opened", "synchronize", "reopened")
#: The identifier of imagebot's own check-run button ("Retry").
RETRY_ACTION = "retry"


def verify_signature(secret: bytes, body: bytes, header: str | None) -> None:
    """Check ``X-Hub-Signature-256`` (HMAC-SHA256 of the raw body) in constant time."""
    if not header:
        raise WebhookError(401, "missing X-Hub-Signature-256 header", kind="signature")
    expected = "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), header.strip().encode("utf-8", "replace")):
        raise WebhookError(401, "X-Hub-Signature-256 does not match the payload", kind="signature")


# -- decisions: payload in, Decision out ------------------------------------------------------


def _repo_fields(payload: dict[str, Any]) -> dict[str, Any]:
    """The repository's fields of a build, each checked (bot.webhooks.checks)."""
    return {
        "provider": PROVIDER,
        "repo": checks.repo_at(payload, "repository.full_name", PROVIDER),
        "clone_url": field(payload, "repository.clone_url"),
        "default_branch": checks.branch(
            field(payload, "repository.default_branch", optional=True), "repository.default_branch"),
        "installation_id": checks.number(
            field(payload, "installation.id", of=int, optional=True), "installation.id"),
        "visibility": github_visibility(field(payload, "repository.private", of=bool, optional=True)),
    }


def push_decision(payload: dict[str, Any]) -> Decision:
    ref = checks.ref(field(payload, "ref"), "ref")
    if ref.startswith("refs/heads/"):
        kind, what = BuildKind.branch, "branch"
    elif ref.startswith("refs/tags/"):
        kind, what = BuildKind.tag, "tag"
    else:
        return Ignore(f"push to {ref} is neither a branch nor a tag")
    if payload.get("deleted"):
        return CancelRef(PROVIDER, checks.repo_at(payload, "repository.full_name", PROVIDER), ref,
                         f"{what} deleted")
    return BuildRequest(
        **_repo_fields(payload),
        ref=ref,
        sha=checks.sha_at(payload, "after"),
        kind=kind,
        trigger="push",
        skip_reason=skip_reason(field(payload, "head_commit.message", optional=True)),
    )


def pull_request_decision(payload: dict[str, Any]) -> Decision:
    action = payload.get("action")
    if action not in PR_ACTIONS:
        return Ignore(f"pull_request action {action!r} does not build")
    pr = field(payload, "pull_request", of=dict)
    number = checks.number(field(pr, "number", of=int, at="pull_request"), "pull_request.number")
    head_repo = field(pr, "head.repo.full_name", optional=True, at="pull_request")
    return BuildRequest(
        **_repo_fields(payload),
        ref=f"refs/pull/{number}/head",
        sha=checks.sha_at(pr, "head.sha", at="pull_request"),
        kind=BuildKind.pull_request,
        trigger="pull_request",
        pr_number=number,
        # A deleted fork has no head repo; it is still not ours to trust.
        fork=head_repo is None
        or head_repo != field(pr, "base.repo.full_name", at="pull_request"),
    )


def rerun_decision(
    payload: dict[str, Any], suite: dict[str, Any], sha: str, trigger: str, at: str
) -> Decision:
    """Build ``sha`` again for a check_run/check_suite re-request (or our Retry button)."""
    pulls = field(suite, "pull_requests", of=list, optional=True, at=at) or []
    if pulls:
        pr, where = pulls[0], f"{at}.pull_requests[0]"
        if not isinstance(pr, dict):
            raise WebhookError(400, f"payload field {where} has the wrong type", kind="payload")
        number = checks.number(field(pr, "number", of=int, at=where), f"{where}.number")
        head_id = field(pr, "head.repo.id", of=int, optional=True, at=where)
        return BuildRequest(
            **_repo_fields(payload),
            ref=f"refs/pull/{number}/head",
            sha=sha,
            kind=BuildKind.pull_request,
            trigger=trigger,
            pr_number=number,
            fork=head_id is None or head_id != field(pr, "base.repo.id", of=int, optional=True, at=where),
        )
    branch = field(suite, "head_branch", optional=True, at=at)
    if not branch:
        return Ignore(f"cannot tell which branch {sha} belongs to; push again to rebuild")
    return BuildRequest(
        **_repo_fields(payload),
        ref=checks.ref(f"refs/heads/{branch}", f"{at}.head_branch"),
        sha=sha,
        kind=BuildKind.branch,
        trigger=trigger,
    )


def check_run_decision(payload: dict[str, Any]) -> Decision:
    action = payload.get("action")
    if action == "requested_action":
        identifier = field(payload, "requested_action.identifier", optional=True)
        if identifier != RETRY_ACTION:
            return Ignore(f"requested action {identifier!r} is not imagebot's")
    elif action != "rerequested":
        return Ignore(f"check_run action {action!r} does not build")
    run = field(payload, "check_run", of=dict)
    suite = dict(field(run, "check_suite", of=dict, at="check_run"))
    suite.setdefault("pull_requests", run.get("pull_requests"))
    sha = checks.sha_at(run, "head_sha", at="check_run")
    return rerun_decision(payload, suite, sha, "check_run", at="check_run.check_suite")


def check_suite_decision(payload: dict[str, Any]) -> Decision:
    action = payload.get("action")
    if action != "rerequested":
        return Ignore(f"check_suite action {action!r} does not build")
    suite = field(payload, "check_suite", of=dict)
    sha = checks.sha_at(suite, "head_sha", at="check_suite")
    return rerun_decision(payload, suite, sha, "check_suite", at="check_suite")


def ping_decision(payload: dict[str, Any]) -> Decision:
    return Ping(f"pong (hook {payload.get('hook_id')})")


router = router_for({
    "push": push_decision,
    "pull_request": pull_request_decision,
    "check_run": check_run_decision,
    "check_suite": check_suite_decision,
    "ping": ping_decision,
})


# -- the endpoint -----------------------------------------------------------------------------


async def webhook(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    if settings.github_webhook_secret is None:
        raise WebhookError(503, "GitHub webhooks are not configured", kind="not_configured")
    body = await read_body(request, settings.max_payload_bytes)
    verify_signature(
        settings.github_webhook_secret.get_secret_value().encode(),
        body,
        request.headers.get("x-hub-signature-256"),
    )
    event_name = checks.event(required_header(request, "x-github-event"))
    delivery_id = required_header(request, "x-github-delivery")
    payload = parse_payload(body, request.headers.get("content-type"))
    delivery = DeliveryInfo(
        provider=PROVIDER,
        delivery_id=delivery_id,
        event=event_name,
        action=checks.action(payload.get("action")),
        repo=checks.repo_at(payload, "repository.full_name", PROVIDER, optional=True),
    )
    rules = checks.rules(settings, PROVIDER)
    return await accept(request, router, payload, delivery, lambda d: checks.admit(d, rules))
