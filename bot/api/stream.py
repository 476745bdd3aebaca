"""Live streams (Server-Sent Events): ``/api/events`` (all builds) and
``/api/builds/{id}/stream`` (one build, from its start).

A stream is a tail of the database, woken by the in-process bus. Everything it sends comes
from storage: telemetry events and log lines by id, build states from the builds table. The
bus only says *when* to look (and which builds changed state without an event: a new build,
a superseded one, an admin's cancel), so a stream can never skip what a bus message would have
carried, builds worked on by another process (``imagebot worker``) show up within
``IMAGEBOT_POLL_SECONDS``, and a client that falls behind costs a bounded buffer only.

Message ids are positions, ``"<E>-<L>"``: the last telemetry event id (E) and the last log
line id (L) the stream has sent. ``Last-Event-ID`` (or ``?after=``, for a first connection
that continues a page the server rendered) resumes after both, replaying from storage; see
docs/api.md for the SSE contract. A ``status`` message is a build's state (the REST shape) and
carries the position it was read at.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Connection, func, or_, select
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route

from bot import telemetry
from bot.api.rest import BUILD_COLUMNS, build_id_of, build_json, build_row, no_unknown_params, read
from bot.models import build_logs, builds, telemetry_events, utcnow
from bot.telemetry import Subscription

#: Bus messages one client may have waiting; past that it is told to resync.
BUFFER = 256
#: Rows read from storage per table and round.
PAGE = 500
#: Seconds between keep-alive comments (proxies drop idle connections).
PING_SECONDS = 15
#: A client that takes longer than this to accept one message is disconnected.
SEND_TIMEOUT_SECONDS = 30
#: Rounds (reads from storage) of one stream start at most this often while messages pour in.
MIN_ROUND_SECONDS = 0.05
#: Builds a resumed or resynced stream re-announces at most (newest first).
MAX_SNAPSHOT = 200
#: Writes are stamped before they commit; look this far back for state changes on a resume.
IN_FLIGHT_MARGIN = timedelta(seconds=60)
#: Events that change a build's status.
STATUS_EVENTS = frozenset({"build_started", "build_succeeded", "build_failed", "build_cancelled"})

_POSITION = re.compile(r"^([0-9]{1,18})-([0-9]{1,18})$")


@dataclass(frozen=True)
class Position:
    """What a stream has sent: telemetry events up to ``event``, log lines up to ``log``."""

    event: int = 0
    log: int = 0

    def __str__(self) -> str:
        return f"{self.event}-{self.log}"


def parse_position(raw: str) -> Position:
    match = _POSITION.match(raw.strip())
    if match is None:
        raise HTTPException(400, f"Last-Event-ID {raw[:40]!r} is not one this API handed out (<event>-<log>)")
    return Position(int(match[1]), int(match[2]))


def announce(app: Starlette, build_ids: list[int]) -> None:
    """Tell the streams these builds changed state without a telemetry event."""
    if build_ids:
        app.state.telemetry.bus.publish({"type": "builds_changed", "ids": list(build_ids)})


# -- reading from storage ---------------------------------------------------------------------


@dataclass
class Round:
    """One read from storage: what to send, in order, and the position after it."""

    messages: list[ServerSentEvent]
    position: Position
    full: bool  # a page was full: read again at once


def _sse(kind: str, data: dict[str, Any], position: Position) -> ServerSentEvent:
    return ServerSentEvent(json.dumps(data, separators=(",", ":")), event=kind, id=str(position))


def read_round(
    conn: Connection, position: Position, build_id: int | None, logs: bool, changed: set[int]
) -> Round:
    """Events and log lines after ``position`` (of one build, or all), merged by time, then
    the state of every build they (or ``changed``) moved."""
    query = select(telemetry_events).where(telemetry_events.c.id > position.event)
    if build_id is not None:
        query = query.where(telemetry_events.c.build_id == build_id)
    events = [telemetry.as_dict(r) for r in conn.execute(query.order_by(telemetry_events.c.id).limit(PAGE))]
    lines: list[Any] = []
    if logs:
        query = select(build_logs).where(build_logs.c.id > position.log)
        if build_id is not None:
            query = query.where(build_logs.c.build_id == build_id)
        lines = list(conn.execute(query.order_by(build_logs.c.id).limit(PAGE)))

    items = [(e["ts"], 0, e["id"], e) for e in events] + [(_iso(r.ts), 1, r.id, r) for r in lines]
    messages = []
    for _, is_log, row_id, item in sorted(items, key=lambda i: (i[0], i[1], i[2])):
        if is_log:
            position = Position(position.event, row_id)
            messages.append(_sse("log", {"build_id": item.build_id, "platform": item.platform,
                                         "ts": _iso(item.ts), "line": item.line}, position))
        else:
            position = Position(row_id, position.log)
            messages.append(_sse("telemetry", item, position))
    moved = changed | {e["build_id"] for e in events if e["name"] in STATUS_EVENTS}
    if build_id is not None:
        moved &= {build_id}
    if moved:
        rows = conn.execute(select(*BUILD_COLUMNS).where(builds.c.id.in_(sorted(moved))).order_by(builds.c.id))
        messages += [_sse("status", build_json(row), position) for row in rows]
    return Round(messages, position, len(events) == PAGE or len(lines) == PAGE)


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def current_position(conn: Connection) -> Position:
    return Position(
        conn.execute(select(func.coalesce(func.max(telemetry_events.c.id), 0))).scalar_one(),
        conn.execute(select(func.coalesce(func.max(build_logs.c.id), 0))).scalar_one(),
    )


def changed_since(conn: Connection, position: Position | None, since: datetime | None,
                  build_id: int | None) -> set[int]:
    """Builds that may have changed state after ``position`` (or ``since``): created, started
    or ended from the time of what was sent last, less the in-flight margin."""
    if since is None and position is not None:
        stamps = [
            conn.execute(select(telemetry_events.c.ts).where(telemetry_events.c.id == position.event)).scalar(),
            conn.execute(select(build_logs.c.ts).where(build_logs.c.id == position.log)).scalar(),
        ]
        since = max((s for s in stamps if s is not None), default=None)
    query = select(builds.c.id).order_by(builds.c.id.desc()).limit(MAX_SNAPSHOT)
    if since is not None:
        since -= IN_FLIGHT_MARGIN
        query = query.where(or_(builds.c.created_at >= since, builds.c.started_at >= since,
                                builds.c.finished_at >= since))
    if build_id is not None:
        query = query.where(builds.c.id == build_id)
    return set(conn.execute(query).scalars())


# -- following --------------------------------------------------------------------------------


def _relevant(message: dict[str, Any], build_id: int | None, logs: bool) -> tuple[bool, set[int]]:
    """Whether a bus message means this stream has something to read, and which builds it
    says changed state."""
    kind = message.get("type")
    if kind == "event":
        return build_id in (None, message["event"]["build_id"]), set()
    if kind == "log":
        return logs and build_id in (None, message["build_id"]), set()
    if kind == "builds_changed":
        ids = {i for i in message["ids"] if build_id in (None, i)}
        return bool(ids), ids
    return False, set()


async def follow(
    read: Callable[[Callable[[Connection], Any]], Awaitable[Any]],
    subscription: Subscription,
    *,
    build_id: int | None,
    position: Position | None,
    resumed: bool,
    logs: bool,
    poll_seconds: float,
) -> AsyncIterator[ServerSentEvent]:
    """The stream: replay from ``position`` (None: from now), then follow. Subscribe before
    calling, so that nothing committed meanwhile waits for the next poll."""
    if position is None:
        position = await read(current_position)
    changed: set[int] = set()
    if build_id is not None:
        changed.add(build_id)  # a build's stream starts with the build's state
    elif resumed:
        start = position
        changed = await read(lambda conn: changed_since(conn, start, None, None))
    due: float | None = 0.0  # when to read storage next; None: when a message or the poll says so
    last_round, round_started = 0.0, utcnow()
    while True:
        now = time.monotonic()
        if due is not None and now >= due:
            round_started, here, wanted = utcnow(), position, set(changed)
            result = await read(lambda conn: read_round(conn, here, build_id, logs, wanted))
            changed.clear()
            for message in result.messages:
                yield message
            position = result.position
            last_round = time.monotonic()
            due = last_round if result.full else None
            continue
        try:
            async with asyncio.timeout(poll_seconds if due is None else due - now):
                message = await subscription.get()
        except TimeoutError:
            due = due if due is not None else time.monotonic()
            continue
        if message.get("type") == "resync":
            yield _sse("resync", {"reason": "this client fell behind and missed live messages; what "
                                            "follows is read again from storage"}, position)
            since = round_started
            changed |= await read(lambda conn: changed_since(conn, None, since, build_id))
            due = time.monotonic()
            continue
        relevant, ids = _relevant(message, build_id, logs)
        changed |= ids
        if relevant and due is None:
            # while messages pour in, read at most every MIN_ROUND_SECONDS
            due = max(time.monotonic(), last_round + MIN_ROUND_SECONDS)


# -- the endpoints ----------------------------------------------------------------------------


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "0").lower()
    if raw not in ("0", "1", "true", "false"):
        raise HTTPException(400, f"{name} must be 1, 0, true or false")
    return raw in ("1", "true")


def _start(request: Request) -> Position | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("after")
    return parse_position(raw) if raw else None


def _respond(request: Request, *, build_id: int | None, position: Position | None, resumed: bool,
             logs: bool) -> EventSourceResponse:
    async def stream() -> AsyncIterator[ServerSentEvent]:
        subscription = request.app.state.telemetry.bus.subscribe(maxsize=BUFFER)
        try:
            async for message in follow(
                lambda work: read(request.app, work), subscription, build_id=build_id, position=position,
                resumed=resumed, logs=logs, poll_seconds=request.app.state.settings.poll_seconds,
            ):
                yield message
        finally:
            subscription.close()

    return EventSourceResponse(
        stream(), ping=PING_SECONDS, send_timeout=SEND_TIMEOUT_SECONDS,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def all_events(request: Request) -> EventSourceResponse:
    """Every build: status changes and telemetry events (log lines too with ``logs=1``); from
    now on, or after ``Last-Event-ID``."""
    no_unknown_params(request, "logs", "after")
    logs = _flag(request, "logs")
    start = _start(request)
    # "now" is fixed before the response starts: whatever a client does once it has the
    # headers is in its stream
    position = start or await read(request.app, current_position)
    return _respond(request, build_id=None, position=position, resumed=start is not None, logs=logs)


async def build_stream(request: Request) -> EventSourceResponse:
    """One build from its first event (or after ``Last-Event-ID``): its telemetry events and
    log lines, its state after that replay, and its state again whenever it changes."""
    no_unknown_params(request, "after")
    build_id = build_id_of(request)
    await read(request.app, lambda conn: build_row(conn, build_id))
    start = _start(request)
    return _respond(request, build_id=build_id, position=start or Position(), resumed=start is not None,
                    logs=True)


routes = [
    Route("/api/events", all_events),
    Route("/api/builds/{build_id}/stream", build_stream),
]
