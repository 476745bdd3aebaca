"""The read API: ``/api/builds``, ``/api/builds/{id}``, ``/api/builds/{id}/events``.

Lists are newest first with an opaque cursor (the last id seen), so paging stays correct while
new builds arrive. Every error is JSON with a reason.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from sqlalchemy import Connection, select
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bot import telemetry
from bot.models import BuildStatus, builds

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
_FILTERS = ("repo", "ref", "sha", "status")


def _iso(value) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def build_json(row: Any) -> dict[str, Any]:
    """The one JSON shape of a build."""
    return {
        "id": row.id,
        "provider": row.provider,
        "repo": row.repo,
        "ref": row.ref,
        "sha": row.sha,
        "kind": row.kind,
        "pr_number": row.pr_number,
        "fork": row.fork,
        "trigger": row.trigger,
        "status": row.status,
        "platforms": row.platforms,
        "attempts": row.attempts,
        "created_at": _iso(row.created_at),
        "started_at": _iso(row.started_at),
        "finished_at": _iso(row.finished_at),
        "error": (
            {"kind": row.error_kind, "message": row.error_message}
            if row.error_kind or (row.error_message and row.status != BuildStatus.succeeded)
            else None
        ),
    }


def encode_cursor(build_id: int) -> str:
    return base64.urlsafe_b64encode(f"b{build_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if raw[:1] != "b" or not raw[1:].isdigit():
            raise ValueError
        return int(raw[1:])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise HTTPException(400, "cursor is not one this API handed out") from None


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise HTTPException(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def _build_id(request: Request) -> int:
    raw = request.path_params["build_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise HTTPException(404, f"no build {raw!r}")
    return int(raw)


async def list_builds(request: Request) -> JSONResponse:
    unknown = set(request.query_params) - {*_FILTERS, "limit", "cursor"}
    if unknown:
        raise HTTPException(400, f"unknown query parameter(s): {', '.join(sorted(unknown))}")
    limit = _limit(request)
    filters = {name: request.query_params[name] for name in _FILTERS if name in request.query_params}
    if "status" in filters and filters["status"] not in BuildStatus.__members__:
        raise HTTPException(400, f"status must be one of {', '.join(BuildStatus.__members__)}")
    before = decode_cursor(request.query_params["cursor"]) if "cursor" in request.query_params else None

    def query(conn: Connection) -> list[Any]:
        stmt = select(builds).order_by(builds.c.id.desc()).limit(limit + 1)
        for name, value in filters.items():
            stmt = stmt.where(builds.c[name] == value)
        if before is not None:
            stmt = stmt.where(builds.c.id < before)
        return list(conn.execute(stmt))

    rows = await request.app.state.db.read(query)
    page = rows[:limit]
    next_cursor = encode_cursor(page[-1].id) if len(rows) > limit else None
    return JSONResponse({"builds": [build_json(r) for r in page], "next_cursor": next_cursor})


async def _one_build(request: Request, build_id: int) -> Any:
    row = await request.app.state.db.read(
        lambda conn: conn.execute(select(builds).where(builds.c.id == build_id)).first()
    )
    if row is None:
        raise HTTPException(404, f"no build {build_id}")
    return row


async def get_build(request: Request) -> JSONResponse:
    return JSONResponse(build_json(await _one_build(request, _build_id(request))))


async def build_events(request: Request) -> JSONResponse:
    build_id = _build_id(request)
    await _one_build(request, build_id)
    events = await request.app.state.db.read(lambda conn: telemetry.events_of(conn, build_id))
    return JSONResponse({"build_id": build_id, "events": events})


routes = [
    Route("/api/builds", list_builds),
    Route("/api/builds/{build_id}", get_build),
    Route("/api/builds/{build_id}/events", build_events),
]
