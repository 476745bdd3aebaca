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

from sqlalchemy import Connection, Table, exists, func, or_, select
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from bot import telemetry
from bot.api import auth
from bot.api.rest import BUILD_COLUMNS, build_id_of, build_json, build_row, no_unknown_params, read
from bot.models import PUBLIC, build_logs, builds, telemetry_events, utcnow
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
#: Events and log lines a stream replays at most per table; older ones are skipped (a
#: ``skipped`` message says so; the whole log is at /api/builds/{id}/log).
MAX_REPLAY = 2000
#: What a refused stream is told to wait before it tries again.
RETRY_AFTER_SECONDS = 5
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


def _rows(table: Table, after: int, build_id: int | None, public_only: bool):
    """``table``'s rows after id ``after``: of one build, or of all (the public ones only)."""
    query = select(table).where(table.c.id > after)
    if build_id is not None:
        query = query.where(table.c.build_id == build_id)
    if public_only:
        query = query.where(exists().where(builds.c.id == table.c.build_id, builds.c.visibility == PUBLIC))
    return query


def read_round(
    conn: Connection, position: Position, build_id: int | None, logs: bool, changed: set[int],
    public_only: bool = False,
) -> Round:
    """Events and log lines after ``position`` (of one build, or all), merged by time, then
    the state of every build they (or ``changed``) moved."""
    query = _rows(telemetry_events, position.event, build_id, public_only)
    events = [telemetry.as_dict(r) for r in conn.execute(query.order_by(telemetry_events.c.id).limit(PAGE))]
    lines: list[Any] = []
    if logs:
        query = _rows(build_logs, position.log, build_id, public_only)
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
        query = select(*BUILD_COLUMNS).where(builds.c.id.in_(sorted(moved))).order_by(builds.c.id)
        rows = conn.execute(query.where(builds.c.visibility == PUBLIC) if public_only else query)
        messages += [_sse("status", build_json(row), position) for row in rows]
    return Round(messages, position, len(events) == PAGE or len(lines) == PAGE)


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def current_position(conn: Connection) -> Position:
    return Position(
        conn.execute(select(func.coalesce(func.max(telemetry_events.c.id), 0))).scalar_one(),
        conn.execute(select(func.coalesce(func.max(build_logs.c.id), 0))).scalar_one(),
    )


def replay_start(conn: Connection, position: Position, build_id: int | None, public_only: bool,
                 logs: bool) -> Position:
    """``position``, or a later one if more than :data:`MAX_REPLAY` events (or log lines)
    came after it: a resume from long ago, or a build's stream from its start, replays the
    newest MAX_REPLAY of each, not everything."""
    def skip_to(table: Table, after: int) -> int:
        query = _rows(table, after, build_id, public_only).with_only_columns(table.c.id)
        later = conn.execute(query.order_by(table.c.id.desc()).offset(MAX_REPLAY).limit(1)).scalar()
        return after if later is None else later
    return Position(skip_to(telemetry_events, position.event), skip_to(build_logs, position.log) if logs else position.log)


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
    if kind == "stored":  # the watcher saw these builds move (None: any); another process wrote
        return message["ids"] is None or build_id is None or build_id in message["ids"], set()
    return False, set()


async def follow(
    read: Callable[[Callable[[Connection], Any]], Awaitable[Any]],
    subscription: Subscription,
    *,
    build_id: int | None,
    position: Position | None,
    resumed: bool,
    logs: bool,
    poll_seconds: float | None,
    public_only: bool = False,
) -> AsyncIterator[ServerSentEvent]:
    """The stream: replay from ``position`` (None: from now; at most :data:`MAX_REPLAY` of each
    table), then follow. Subscribe before calling, so that nothing committed meanwhile waits for
    the next poll. ``poll_seconds`` None: only messages wake it (the app's :class:`Watcher`
    stands in for polling, one read for every stream)."""
    if position is None:
        position = await read(current_position)
    else:
        asked = position
        position = await read(lambda conn: replay_start(conn, asked, build_id, public_only, logs))
        if position != asked:
            yield _sse("skipped", {"reason": f"more than {MAX_REPLAY} events or log lines came after the "
                                             "position asked for; the newest follow (the whole log is at "
                                             "/api/builds/{id}/log)"}, position)
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
            result = await read(lambda conn: read_round(conn, here, build_id, logs, wanted, public_only))
            changed.clear()
            for message in result.messages:
                yield message
            position = result.position
            last_round = time.monotonic()
            due = last_round if result.full else None
            continue
        if due is not None:
            await asyncio.sleep(due - now)  # a rate limit: what arrives meanwhile is taken in one go
            messages = subscription.drain()
        else:
            try:
                async with asyncio.timeout(poll_seconds):  # None: no limit
                    messages = [await subscription.get(), *subscription.drain()]
            except TimeoutError:
                due = time.monotonic()  # the poll
                continue
        for message in messages:
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


# -- how many: per process, per client --------------------------------------------------------


class Slots:
    """The streams open in one app: at most ``most`` in all (IMAGEBOT_STREAM_MAX) and
    ``per_client`` per client address (IMAGEBOT_STREAM_MAX_PER_CLIENT). One client over its
    share is told 429, everyone 503 when the process is full; both with ``Retry-After``."""

    def __init__(self, most: int, per_client: int) -> None:
        self.most, self.per_client = most, per_client
        self.by_client: dict[str, int] = {}
        self.subscriptions: set[Subscription] = set()

    @property
    def open(self) -> int:
        return sum(self.by_client.values())

    def take(self, client: str) -> None:
        retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
        if self.by_client.get(client, 0) >= self.per_client:
            raise HTTPException(429, f"this client has {self.per_client} streams open, as many as one client may "
                                     "(IMAGEBOT_STREAM_MAX_PER_CLIENT)", headers=retry)
        if self.open >= self.most:
            raise HTTPException(503, f"{self.most} streams are open, as many as this server takes "
                                     "(IMAGEBOT_STREAM_MAX)", headers=retry)
        self.by_client[client] = self.by_client.get(client, 0) + 1

    def give_back(self, client: str) -> None:
        left = self.by_client.get(client, 0) - 1
        if left > 0:
            self.by_client[client] = left
        else:
            self.by_client.pop(client, None)


def slots_of(app: Starlette) -> Slots:
    slots = getattr(app.state, "stream_slots", None)
    if slots is None:
        settings = app.state.settings
        slots = app.state.stream_slots = Slots(settings.stream_max, settings.stream_max_per_client)
    return slots


class _Held(EventSourceResponse):
    """A stream that gives its slot back however it ends (client gone, send timeout, error)."""

    def __init__(self, *args: Any, release: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


#: Builds the watcher names in one wake-up at most; past that it wakes every stream.
_WATCH_IDS = 500


def moved_builds(conn: Connection, seen: Position) -> tuple[Position, list[int] | None]:
    """Where storage is now, and which builds have events or log lines after ``seen`` (None:
    too many to name, or no ``seen`` yet)."""
    here = current_position(conn)
    if here == seen:
        return here, []
    ids: set[int] = set()
    for table, after in ((telemetry_events, seen.event), (build_logs, seen.log)):
        ids |= set(conn.execute(select(table.c.build_id).where(table.c.id > after)
                                .group_by(table.c.build_id).limit(_WATCH_IDS + 1)).scalars())
    return here, sorted(ids) if len(ids) <= _WATCH_IDS else None


async def watch(app: Starlette) -> None:
    """One reader of storage for every stream of the app: every IMAGEBOT_POLL_SECONDS, while
    streams are open, read where storage is and wake the streams whose builds moved (another
    process wrote). Without it each stream polled by itself: N idle streams, N reads a second."""
    slots = slots_of(app)
    seen: Position | None = None
    while slots.subscriptions:
        if seen is None:  # the first look: a stream that just started may have read before a write
            here, ids = await read(app, current_position, gate="stream"), None
        else:
            last = seen
            here, ids = await read(app, lambda conn: moved_builds(conn, last), gate="stream")
        if ids is None or ids:
            for subscription in list(slots.subscriptions):
                subscription._offer({"type": "stored", "ids": ids})
        seen = here
        await asyncio.sleep(app.state.settings.poll_seconds)  # a period, not a synchronisation
    app.state.stream_watcher = None


def _watching(app: Starlette) -> None:
    if getattr(app.state, "stream_watcher", None) is None:
        app.state.stream_watcher = asyncio.get_running_loop().create_task(watch(app), name="stream-watcher")


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
             logs: bool, public_only: bool) -> EventSourceResponse:
    """The stream's response, holding a slot (429/503 here when there is none) and subscribed
    from now on, so nothing committed before its first read is missed."""
    app, client = request.app, request.client.host if request.client else "unknown"
    slots = slots_of(app)
    slots.take(client)
    # the bus drops what this stream would ignore, so a message costs the other streams nothing
    subscription = app.state.telemetry.bus.subscribe(
        maxsize=BUFFER, accept=lambda message: _relevant(message, build_id, logs)[0], build_id=build_id)
    slots.subscriptions.add(subscription)
    _watching(app)

    def release() -> None:
        subscription.close()
        slots.subscriptions.discard(subscription)
        slots.give_back(client)

    async def stream() -> AsyncIterator[ServerSentEvent]:
        async for message in follow(
            lambda work: read(app, work, gate="stream"), subscription, build_id=build_id, position=position,
            resumed=resumed, logs=logs, poll_seconds=None, public_only=public_only,
        ):
            yield message

    return _Held(
        stream(), ping=PING_SECONDS, send_timeout=SEND_TIMEOUT_SECONDS,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"}, release=release,
    )


async def all_events(request: Request) -> EventSourceResponse:
    """Every build: status changes and telemetry events (log lines too with ``logs=1``); from
    now on, or after ``Last-Event-ID``."""
    no_unknown_params(request, "logs", "after")
    logs = _flag(request, "logs")
    start = _start(request)
    hidden = auth.public_only(request)
    # "now" is fixed before the response starts: whatever a client does once it has the
    # headers is in its stream
    position = start or await read(request.app, current_position, gate="stream")
    return _respond(request, build_id=None, position=position, resumed=start is not None, logs=logs,
                    public_only=hidden)


async def build_stream(request: Request) -> EventSourceResponse:
    """One build from its first event (or after ``Last-Event-ID``): its telemetry events and
    log lines, its state after that replay, and its state again whenever it changes."""
    no_unknown_params(request, "after")
    build_id = build_id_of(request)
    hidden = auth.public_only(request)
    await read(request.app, lambda conn: build_row(conn, build_id, hidden), gate="stream")
    start = _start(request)
    return _respond(request, build_id=build_id, position=start or Position(), resumed=start is not None,
                    logs=True, public_only=False)


routes = [
    Route("/api/events", all_events),
    Route("/api/builds/{build_id}/stream", build_stream),
]
