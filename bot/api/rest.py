"""The read API: ``/api/builds``, ``/api/builds/{id}`` (with per-platform results and the
manifest list), ``/api/builds/{id}/events``, ``/api/builds/{id}/log``, ``/api/repos``.

Lists are newest first with an opaque cursor (the last id seen), so paging stays correct while
new builds arrive. What a build produced (digests, sizes, push attempts) is not stored twice:
it is read from the build's telemetry by :mod:`bot.summary`, so the API cannot disagree with
the events it returns. Every error is JSON with a reason.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from typing import Any, TypeVar

from sqlalchemy import Connection, case, func, select, true
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from bot import telemetry
from bot import summary
from bot.api import auth
from bot.models import PUBLIC, BuildStatus, build_logs, builds
from bot.reporters import outbox

T = TypeVar("T")

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
_FILTERS = ("repo", "ref", "sha", "status")


def _iso(value) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


#: The columns :func:`build_json` reads: lists select only these (a third less row decoding).
BUILD_COLUMNS = [builds.c[name] for name in (
    "id", "provider", "repo", "ref", "sha", "kind", "pr_number", "fork", "trigger", "status",
    "platforms", "attempts", "created_at", "started_at", "finished_at", "error_kind", "error_message",
    "visibility",
)]


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
        "visibility": row.visibility,
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


#: Database reads the API runs at once, per app. Each runs in a thread; past about the number
#: of cores they only take turns at the GIL with each other and with the event loop, and every
#: request waits longer (bench/api: 16 connections got 358 req/s and a p99 of 125 ms with
#: anyio's 40 threads, 786 req/s and 28 ms with 2).
READ_CONCURRENCY = 2
#: The live streams' reads have a gate of their own, so that however many are open they take
#: one thread at a time and never queue ahead of the REST API's reads.
STREAM_READ_CONCURRENCY = 1
_GATES = {"api": READ_CONCURRENCY, "stream": STREAM_READ_CONCURRENCY}


async def read(app: Any, work: Callable[[Connection], T], gate: str = "api") -> T:
    """``app.state.db.read(work)``, at most ``_GATES[gate]`` at once."""
    loop = asyncio.get_running_loop()
    name = f"{gate}_reads"
    held = getattr(app.state, name, None)
    if held is None or held[0] is not loop:  # an asyncio.Semaphore belongs to one loop
        held = (loop, asyncio.Semaphore(_GATES[gate]))
        setattr(app.state, name, held)
    async with held[1]:
        return await app.state.db.read(work)


def digits(text: str, most: int = 18) -> bool:
    """Whether ``text`` is a whole number ``int()`` takes and a database integer holds
    (``str.isdigit`` alone also accepts "²")."""
    return text.isascii() and text.isdigit() and len(text) <= most


def encode_cursor(build_id: int) -> str:
    return base64.urlsafe_b64encode(f"b{build_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> int:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        if raw[:1] != "b" or not digits(raw[1:]):
            raise ValueError
        return int(raw[1:])
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise HTTPException(400, "cursor is not one this API handed out") from None


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit", str(DEFAULT_LIMIT))
    if not digits(raw) or not 1 <= int(raw) <= MAX_LIMIT:
        raise HTTPException(400, f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return int(raw)


def build_id_of(request: Request) -> int:
    raw = request.path_params["build_id"]
    if not digits(raw):
        raise HTTPException(404, f"no build {raw!r}")
    return int(raw)


def no_unknown_params(request: Request, *known: str) -> None:
    unknown = set(request.query_params) - set(known)
    if unknown:
        raise HTTPException(400, f"unknown query parameter(s): {', '.join(sorted(unknown))}")


async def page_of_builds(request: Request) -> tuple[list[Any], str | None]:
    """The page of builds the query asks for (filters, ``limit``, ``cursor``) and the cursor of
    the next one; the API and the dashboard's list share it."""
    no_unknown_params(request, *_FILTERS, "limit", "cursor")
    limit = _limit(request)
    filters = {name: request.query_params[name] for name in _FILTERS if request.query_params.get(name)}
    if "status" in filters and filters["status"] not in BuildStatus.__members__:
        raise HTTPException(400, f"status must be one of {', '.join(BuildStatus.__members__)}")
    before = decode_cursor(request.query_params["cursor"]) if request.query_params.get("cursor") else None
    seen = auth.visible(request)

    def query(conn: Connection) -> list[Any]:
        stmt = select(*BUILD_COLUMNS).order_by(builds.c.id.desc()).limit(limit + 1)
        if seen is not None:
            stmt = stmt.where(seen)
        for name, value in filters.items():
            stmt = stmt.where(builds.c[name] == value)
        if before is not None:
            stmt = stmt.where(builds.c.id < before)
        return list(conn.execute(stmt))

    rows = await read(request.app, query)
    page = rows[:limit]
    return page, encode_cursor(page[-1].id) if len(rows) > limit else None


async def list_builds(request: Request) -> JSONResponse:
    page, next_cursor = await page_of_builds(request)
    return JSONResponse({"builds": [build_json(r) for r in page], "next_cursor": next_cursor})


def build_row(conn: Connection, build_id: int, public_only: bool = False) -> Any:
    """The build, or 404; with ``public_only`` a private build is 404 too (the same answer, so
    that an anonymous reader cannot tell a private build from a missing one)."""
    row = conn.execute(select(builds).where(builds.c.id == build_id)).first()
    if row is None or (public_only and row.visibility != PUBLIC):
        raise HTTPException(404, f"no build {build_id}")
    return row


async def _one_build(request: Request, build_id: int) -> Any:
    hidden = auth.public_only(request)
    return await read(request.app, lambda conn: build_row(conn, build_id, hidden))


def build_detail(row: Any, events: list[dict[str, Any]]) -> dict[str, Any]:
    """A build with what its telemetry says it produced: per-platform results and the
    manifest list (``null`` until one is being published)."""
    return {
        **build_json(row),
        "results": summary.platform_results(row.platforms, events),
        "manifest": summary.manifest_result(events),
    }


async def get_build(request: Request) -> JSONResponse:
    build_id = build_id_of(request)
    hidden = auth.public_only(request)

    def query(conn: Connection) -> dict[str, Any]:
        return build_detail(build_row(conn, build_id, hidden), telemetry.events_of(conn, build_id))

    return JSONResponse(await read(request.app, query))


async def build_events(request: Request) -> JSONResponse:
    build_id = build_id_of(request)
    await _one_build(request, build_id)
    events = await read(request.app, lambda conn: telemetry.events_of(conn, build_id))
    return JSONResponse({"build_id": build_id, "events": events})


async def build_reports(request: Request) -> JSONResponse:
    """What the build owed its forge (commit statuses, check-run updates) and what became of
    each: sent, pending with the next attempt's time and the last error, coalesced, dropped."""
    build_id = build_id_of(request)
    no_unknown_params(request)
    hidden = auth.public_only(request)

    def query(conn: Connection) -> dict[str, Any]:
        build_row(conn, build_id, hidden)
        check_run = conn.execute(select(builds.c.check_run_id).where(builds.c.id == build_id)).scalar_one()
        return {"build_id": build_id, "check_run_id": check_run, "reports": outbox.reports_of(conn, build_id)}

    return JSONResponse(await read(request.app, query))


# -- the log ---------------------------------------------------------------------------------


def log_text(lines: list[dict[str, Any]]) -> str:
    """The log as text (:func:`bot.telemetry.render_line` per stored line)."""
    return "".join(telemetry.render_line(line["platform"], line["line"]) for line in lines)


class Unsatisfiable(Exception):
    """No byte of the representation is in the requested range (RFC 9110, 15.5.17)."""


def byte_range(header: str | None, length: int) -> tuple[int, int] | None:
    """The one byte range (first, last, inclusive) that ``Range`` asks for, per RFC 9110 14.1.2.

    None means: answer with the whole representation (no header, a unit other than bytes, a
    malformed value, or several ranges: a server may ignore a Range it does not support).
    :class:`Unsatisfiable` means 416.
    """
    if not header:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash or not (digits(first, 30) or first == "") or not (digits(last, 30) or last == ""):
        return None
    if first == "":  # suffix: the last N bytes
        if last == "":
            return None
        suffix = int(last)
        if suffix == 0 or length == 0:
            raise Unsatisfiable
        return max(length - suffix, 0), length - 1
    start = int(first)
    if last and int(last) < start:
        return None  # invalid; ignored
    if start >= length:
        raise Unsatisfiable
    return start, min(int(last) if last else length - 1, length - 1)


#: Log lines read from storage per round of a log response.
LOG_PAGE = 1000


def log_page(conn: Connection, build_id: int, after: int, upto: int | None, limit: int) -> list[Any]:
    """Up to ``limit`` lines, in order, that end after byte ``after`` (exclusive ends) and at
    or before ``upto`` (None: anywhere). Read by offset, so a range costs its own lines only."""
    query = select(build_logs.c.platform, build_logs.c.line, build_logs.c.end_offset).where(
        build_logs.c.build_id == build_id, build_logs.c.end_offset > after)
    if upto is not None:
        query = query.where(build_logs.c.end_offset <= upto)
    return list(conn.execute(query.order_by(build_logs.c.end_offset).limit(limit)))


async def _log_bytes(request: Request, build_id: int, first: int, last: int):
    """Bytes ``first``..``last`` (inclusive) of the rendered log, a page of lines at a time:
    the lines that end inside the range, then the one line that holds its last byte."""
    after, done = first, False
    while not done:
        here = after
        rows = await read(request.app, lambda conn: log_page(conn, build_id, here, last + 1, LOG_PAGE))
        if len(rows) < LOG_PAGE:
            tail = max(after, rows[-1].end_offset if rows else after)
            rows += await read(request.app, lambda conn: log_page(conn, build_id, tail, None, 1))
            done = True
        for row in rows:
            text = telemetry.render_line(row.platform, row.line).encode()
            start = row.end_offset - len(text)
            if start > last:
                return
            yield text[max(first - start, 0):min(last + 1, row.end_offset) - start]
        if rows:
            after = rows[-1].end_offset


async def build_log(request: Request) -> Response:
    """``text/plain``; ``Range: bytes=…`` gives 206 with that part (a client following a
    running build asks for ``bytes=<what it has>-``), 416 when the range is past the end.

    The length is the build's stored log size; the body is read a page of lines at a time,
    by byte offset, so neither the whole log nor more than a page of it is ever in memory."""
    build_id = build_id_of(request)
    no_unknown_params(request)
    hidden = auth.public_only(request)
    length = await read(request.app, lambda conn: build_row(conn, build_id, hidden).log_bytes)
    headers = {"Accept-Ranges": "bytes", "Cache-Control": "no-store"}
    # If-Range needs a validator this resource does not have, so a conditional range is never
    # satisfied and the whole log is sent (RFC 9110, 13.1.5).
    header = None if "if-range" in request.headers else request.headers.get("range")
    try:
        wanted = byte_range(header, length)
    except Unsatisfiable:
        return JSONResponse(
            {"error": f"range not satisfiable: the log has {length} bytes"}, 416,
            headers={**headers, "Content-Range": f"bytes */{length}"},
        )
    media_type = "text/plain; charset=utf-8"
    first, last = wanted or (0, length - 1)
    if wanted is not None:
        headers["Content-Range"] = f"bytes {first}-{last}/{length}"
    return StreamingResponse(_log_bytes(request, build_id, first, last), 206 if wanted else 200,
                             headers=headers, media_type=media_type)


# -- repositories -----------------------------------------------------------------------------


async def list_repos(request: Request) -> JSONResponse:
    """Every repo with builds: counts, success rate (succeeded / (succeeded + failed); null
    before either happened) and its last build."""
    no_unknown_params(request)
    status = builds.c.status
    seen = auth.visible(request)

    def query(conn: Connection) -> list[dict[str, Any]]:
        stats = conn.execute(
            select(
                builds.c.repo,
                func.count().label("total"),
                func.sum(case((status == BuildStatus.succeeded.value, 1), else_=0)).label("succeeded"),
                func.sum(case((status == BuildStatus.failed.value, 1), else_=0)).label("failed"),
                func.max(builds.c.id).label("last_id"),
            ).where(seen if seen is not None else true()).group_by(builds.c.repo).order_by(builds.c.repo)
        ).all()
        last = {row.id: row for row in conn.execute(
            select(*BUILD_COLUMNS).where(builds.c.id.in_([s.last_id for s in stats]))
        )}
        return [
            {
                "repo": s.repo,
                "builds": s.total,
                "succeeded": int(s.succeeded or 0),
                "failed": int(s.failed or 0),
                "success_rate": (
                    round(int(s.succeeded) / (int(s.succeeded) + int(s.failed)), 4)
                    if int(s.succeeded or 0) + int(s.failed or 0) else None
                ),
                "last_build": build_json(last[s.last_id]),
            }
            for s in stats
        ]

    return JSONResponse({"repos": await read(request.app, query)})


routes = [
    Route("/api/builds", list_builds),
    Route("/api/builds/{build_id}", get_build),
    Route("/api/builds/{build_id}/events", build_events),
    Route("/api/builds/{build_id}/log", build_log),
    Route("/api/builds/{build_id}/reports", build_reports),
    Route("/api/repos", list_repos),
]
