"""GitLab ingress: ``POST /webhooks/gitlab``.

GitLab authenticates a webhook with a shared token in ``X-Gitlab-Token`` (no body signature).
Events are routed by the ``X-Gitlab-Event`` header with the same gidgethub ``Router`` the
GitHub side uses; the decisions are plain functions of the payload.
"""

from __future__ import annotations

import hmac
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from bot.models import BuildKind, gitlab_visibility
from bot.queue import BuildRequest, CancelRef, Decision, DeliveryInfo, Ignore
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

PROVIDER = "gitlab"
ZERO_SHA = "0" * 40
#: Merge request actions that bring new code to build ("update" only with new commits).
MR_ACTIONS = ("open", "reopen", "update")


def verify_token(expected: bytes, header: str | None) -> None:
    """Compare ``X-Gitlab-Token`` with the configured token in constant time."""
    if not header:
        raise WebhookError(401, "missing X-Gitlab-Token header", kind="token")
    if not hmac.compare_digest(expected, header.encode("utf-8", "replace")):
        raise WebhookError(401, "X-Gitlab-Token is wrong", kind="token")


def _project_fields(payload: dict[str, Any]) -> dict[str, Any]:
    return {
        "provider": PROVIDER,
        "repo": checks.repo_at(payload, "project.path_with_namespace", PROVIDER),
        "clone_url": field(payload, "project.git_http_url"),
        "default_branch": checks.branch(
            field(payload, "project.default_branch", optional=True), "project.default_branch"),
        "visibility": gitlab_visibility(field(payload, "project.visibility_level", of=int, optional=True),
                                        field(payload, "project.visibility", optional=True)),
    }


def _head_message(payload: dict[str, Any], sha: str) -> str | None:
    """The message of the pushed head commit (GitLab lists at most 20 commits)."""
    commits = payload.get("commits")
    if not isinstance(commits, list):
        return None
    for commit in commits:
        if isinstance(commit, dict) and commit.get("id") == sha:
            return commit.get("message") if isinstance(commit.get("message"), str) else None
    return None


def _push(payload: dict[str, Any], kind: BuildKind, trigger: str) -> Decision:
    ref = checks.ref(field(payload, "ref"), "ref")
    prefix = "refs/heads/" if kind is BuildKind.branch else "refs/tags/"
    if not ref.startswith(prefix):
        return Ignore(f"{trigger} for {ref} is not a {kind.value}")
    after = checks.sha_at(payload, "after")
    if after == ZERO_SHA:
        what = "branch" if kind is BuildKind.branch else "tag"
        return CancelRef(PROVIDER, checks.repo_at(payload, "project.path_with_namespace", PROVIDER), ref,
                         f"{what} deleted")
    checkout = field(payload, "checkout_sha", optional=True)
    sha = checks.sha(checkout, "checkout_sha") if checkout else after
    return BuildRequest(
        **_project_fields(payload),
        ref=ref,
        sha=sha,
        kind=kind,
        trigger=trigger,
        skip_reason=skip_reason(_head_message(payload, sha)),
    )


def push_decision(payload: dict[str, Any]) -> Decision:
    return _push(payload, BuildKind.branch, "Push Hook")


def tag_push_decision(payload: dict[str, Any]) -> Decision:
    return _push(payload, BuildKind.tag, "Tag Push Hook")


def merge_request_decision(payload: dict[str, Any]) -> Decision:
    attrs = field(payload, "object_attributes", of=dict)
    action = attrs.get("action")
    if action not in MR_ACTIONS:
        return Ignore(f"merge request action {action!r} does not build")
    if action == "update" and not attrs.get("oldrev"):
        return Ignore("merge request update without new commits")
    iid = checks.number(field(attrs, "iid", of=int, at="object_attributes"), "object_attributes.iid")
    return BuildRequest(
        **_project_fields(payload),
        ref=f"refs/merge-requests/{iid}/head",
        sha=checks.sha_at(attrs, "last_commit.id", at="object_attributes"),
        kind=BuildKind.pull_request,
        trigger="Merge Request Hook",
        pr_number=iid,
        fork=field(attrs, "source_project_id", of=int) != field(attrs, "target_project_id", of=int),
        skip_reason=skip_reason(field(attrs, "last_commit.message", optional=True)),
    )


router = router_for({
    "Push Hook": push_decision,
    "Tag Push Hook": tag_push_decision,
    "Merge Request Hook": merge_request_decision,
})


async def webhook(request: Request) -> JSONResponse:
    settings = request.app.state.settings
    if settings.gitlab_webhook_token is None:
        raise WebhookError(503, "GitLab webhooks are not configured", kind="not_configured")
    # The token is in a header: check it before reading a byte of the body, so a sender
    # without it cannot make the bot buffer up to MAX_PAYLOAD_BYTES.
    verify_token(
        settings.gitlab_webhook_token.get_secret_value().encode(),
        request.headers.get("x-gitlab-token"),
    )
    event_name = checks.event(required_header(request, "x-gitlab-event"))
    # Idempotency-Key stays the same across GitLab's retries; older GitLab sends only the
    # event UUID. Without either, a delivery cannot be recognised again and is never deduped.
    delivery_id = (
        request.headers.get("idempotency-key") or request.headers.get("x-gitlab-event-uuid") or None
    )
    if delivery_id is not None and len(delivery_id) > 128:
        raise WebhookError(400, "delivery id header is longer than 128 characters")
    body = await read_body(request, settings.max_payload_bytes)
    payload = parse_payload(body, request.headers.get("content-type"))
    attrs = payload.get("object_attributes")
    delivery = DeliveryInfo(
        provider=PROVIDER,
        delivery_id=delivery_id,
        event=event_name,
        action=checks.action(attrs.get("action")) if isinstance(attrs, dict) else None,
        repo=checks.repo_at(payload, "project.path_with_namespace", PROVIDER, optional=True),
    )
    rules = checks.rules(settings, PROVIDER)
    return await accept(request, router, payload, delivery, lambda d: checks.admit(d, rules))
