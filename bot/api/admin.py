"""``POST /api/builds/{id}/rebuild`` and ``/cancel``, behind ``IMAGEBOT_ADMIN_TOKEN``.

Both go through the queue's own machinery, so an admin's action follows the same rules as a
webhook's: a rebuild is a new build request (it supersedes the ref's unfinished builds, exactly
like a forge's "re-run"), a cancel ends the build the way a branch deletion ends one, and a
running build is stopped by the worker that holds it (at once in this process; by its lease
renewal in another).
"""

from __future__ import annotations

import hmac
from typing import Any

from sqlalchemy import Connection
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bot import queue
from bot.api.rest import build_id_of, build_json, build_row
from bot.api.stream import announce
from bot.models import BuildKind, utcnow
from bot.reporters import outbox

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="imagebot"'}


def check_admin(request: Request) -> None:
    """401 without a bearer token, 403 with the wrong one, 503 when none is configured.

    The comparison is constant-time (``hmac.compare_digest``), so response timing does not
    tell how much of a guess was right.
    """
    configured = request.app.state.settings.admin_token
    if configured is None or not configured.get_secret_value():
        raise HTTPException(503, "admin endpoints are off: IMAGEBOT_ADMIN_TOKEN is not set")
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise HTTPException(401, "an admin bearer token is needed (Authorization: Bearer <token>)",
                            headers=_CHALLENGE)
    if not hmac.compare_digest(token.strip().encode(), configured.get_secret_value().encode()):
        raise HTTPException(403, "the admin token is wrong")


async def rebuild(request: Request) -> JSONResponse:
    """A new queued build of the same repo, ref and sha (trigger ``rebuild``): 201."""
    check_admin(request)
    build_id = build_id_of(request)

    def write(conn: Connection) -> tuple[Any, queue.Recorded]:
        old = build_row(conn, build_id)
        request_ = queue.BuildRequest(
            provider=old.provider, repo=old.repo, clone_url=old.clone_url, ref=old.ref, sha=old.sha,
            kind=BuildKind(old.kind), trigger="rebuild", pr_number=old.pr_number, fork=old.fork,
            default_branch=old.default_branch, installation_id=old.installation_id, visibility=old.visibility,
        )
        delivery = queue.DeliveryInfo(old.provider, None, "rebuild", None, old.repo)
        reported = old.provider in outbox.report_to(request.app.state.settings)
        recorded = queue.record_delivery(conn, delivery, request_, old.platforms, utcnow(), reported)
        return build_row(conn, recorded.build_id), recorded

    new, recorded = await request.app.state.db.write(write)
    if recorded.superseded:
        request.app.state.notify_ended(recorded.superseded)
    request.app.state.notify_queued()
    announce(request.app, [new.id, *recorded.superseded])
    return JSONResponse(
        {"build": build_json(new), "rebuild_of": build_id, "superseded": recorded.superseded},
        201, headers={"Location": f"/api/builds/{new.id}"},
    )


async def cancel(request: Request) -> JSONResponse:
    """End a queued or running build as ``cancelled``: 200; 409 if it had already ended."""
    check_admin(request)
    build_id = build_id_of(request)
    reason = "cancelled by an administrator"

    def write(conn: Connection) -> tuple[bool, Any]:
        row = build_row(conn, build_id)
        # Only a build still queued or running is ended, so a race with its end is decided by
        # the row; the queue owes its final report in the same transaction.
        reported = row.provider in outbox.report_to(request.app.state.settings)
        ended = queue.cancel(conn, build_id, reason, utcnow(), reported)
        return ended, build_row(conn, build_id)

    ended, row = await request.app.state.db.write(write)
    if not ended:
        raise HTTPException(409, f"build {build_id} already ended ({row.status})")
    request.app.state.notify_ended([build_id])
    announce(request.app, [build_id])
    return JSONResponse({"build": build_json(row)})


routes = [
    Route("/api/builds/{build_id}/rebuild", rebuild, methods=["POST"]),
    Route("/api/builds/{build_id}/cancel", cancel, methods=["POST"]),
]
