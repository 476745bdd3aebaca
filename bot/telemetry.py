"""Telemetry: every step of a build as a schema-checked event, stored and published unchanged.

Each event name has a fixed schema (below); an event that does not match it is a bug, so
emitting it raises instead of storing something no consumer can rely on. Stored events are
published on an in-process :class:`Bus` in exactly the shape the API returns (``as_dict``),
which is the shape every consumer (REST, SSE, dashboard, metrics, check runs) reads.
The contract is documented in docs/telemetry.md.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from dataclasses import dataclass

from sqlalchemy import Connection, insert, select, update

from bot.models import build_logs, builds, telemetry_events, utcnow
from bot.reporters import outbox

log = logging.getLogger(__name__)


class TelemetryError(Exception):
    kind = "telemetry"


class _Event(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class _Failure(_Event):
    kind: str
    message: str


class _Timed(_Event):
    duration_s: float = Field(ge=0)


# -- the schemas, one per event name ----------------------------------------------------------


class BuildStarted(_Event):
    attempt: int = Field(ge=1)


class BuildSucceeded(_Timed):
    platforms: list[str]
    partial: bool = False


class BuildFailed(_Timed):
    error_kind: str
    error_message: str
    step: str | None = None


class BuildCancelled(_Timed):
    reason: str


class FetchSucceeded(_Timed):
    sha: str
    method: str  # "sha": exactly that commit; "ref": the ref, then the sha in it


class FetchFailed(_Failure):
    pass


class BuildPlatformStarted(_Event):
    image: str


class BuildPlatformRetry(_Event):
    attempt: int = Field(ge=1)  # the build attempt that failed pulling a base image
    delay_s: float = Field(ge=0)
    kind: str
    refreshed: bool  # credentials were refreshed before this retry
    detail: str


class BuildPlatformSucceeded(_Timed):
    image_id: str


class BuildPlatformFailed(_Failure):
    duration_s: float = Field(ge=0)


class TagStarted(_Event):
    image_id: str
    tag: str


class TagSucceeded(_Event):
    tag: str


class TagFailed(_Failure):
    tag: str


class PushStarted(_Event):
    tag: str


class PushSkipped(_Event):
    reason: str


class PushRetry(_Event):
    tag: str
    attempt: int = Field(ge=1)  # the attempt that failed
    delay_s: float = Field(ge=0)
    kind: str
    refreshed: bool  # credentials were refreshed before this retry
    detail: str


class PushSucceeded(_Timed):
    tag: str
    digest: str
    size: int = Field(ge=0)
    attempts: int = Field(ge=1)
    retries: int = Field(ge=0)


class PushFailed(_Event):
    tag: str
    kind: str
    attempts: int = Field(ge=1)
    retries: int = Field(ge=0)
    detail: str


class AuthRefreshSucceeded(_Event):
    registry: str
    source: str  # settings, password_file, credential_helper
    changed: bool  # the source answered different credentials than before


class AuthRefreshFailed(_Failure):
    registry: str
    source: str


class TagsWithheld(_Event):
    tags: list[str]  # may be empty: a reserved branch name gives no tag to list
    reason: str


class ManifestStarted(_Event):
    tags: list[str]
    platforms: list[str]
    media_type: str


class ManifestRetry(_Event):
    attempt: int = Field(ge=1)
    delay_s: float = Field(ge=0)
    kind: str
    refreshed: bool
    detail: str


class ManifestPublished(_Event):
    digest: str
    tags: list[str]
    platforms: list[str]
    media_type: str
    partial: bool


class ManifestFailed(_Failure):
    attempts: int = Field(ge=1)


class LogTruncated(_Event):
    reason: str  # "bytes" or "lines": the cap that was reached
    max_bytes: int = Field(ge=0)
    max_lines: int = Field(ge=0)
    bytes: int = Field(ge=0)  # the stored log's size, the marker line included
    lines: int = Field(ge=0)


SCHEMAS: dict[str, type[_Event]] = {
    "build_started": BuildStarted,
    "build_succeeded": BuildSucceeded,
    "build_failed": BuildFailed,
    "build_cancelled": BuildCancelled,
    "fetch_succeeded": FetchSucceeded,
    "fetch_failed": FetchFailed,
    "build_platform_started": BuildPlatformStarted,
    "build_platform_retry": BuildPlatformRetry,
    "build_platform_succeeded": BuildPlatformSucceeded,
    "build_platform_failed": BuildPlatformFailed,
    "tag_started": TagStarted,
    "tag_succeeded": TagSucceeded,
    "tag_failed": TagFailed,
    "push_started": PushStarted,
    "push_skipped": PushSkipped,
    "push_retry": PushRetry,
    "push_succeeded": PushSucceeded,
    "push_failed": PushFailed,
    "auth_refresh_succeeded": AuthRefreshSucceeded,
    "auth_refresh_failed": AuthRefreshFailed,
    "tags_withheld": TagsWithheld,
    "manifest_started": ManifestStarted,
    "manifest_retry": ManifestRetry,
    "manifest_published": ManifestPublished,
    "manifest_failed": ManifestFailed,
    "log_truncated": LogTruncated,
}

#: Events about one platform's image must say which platform.
PLATFORM_EVENTS = frozenset({
    "build_platform_started", "build_platform_retry", "build_platform_succeeded", "build_platform_failed",
    "tag_started", "tag_succeeded", "tag_failed",
    "push_started", "push_skipped", "push_retry", "push_succeeded", "push_failed",
})
#: Events about the whole build never carry one.
BUILD_WIDE_EVENTS = frozenset({
    "build_started", "build_succeeded", "build_failed", "build_cancelled",
    "fetch_succeeded", "fetch_failed",
    "tags_withheld", "manifest_started", "manifest_retry", "manifest_published", "manifest_failed",
    "log_truncated",
})


def check(name: str, platform: str | None, data: dict[str, Any]) -> dict[str, Any]:
    """The event's data in stored form, or :class:`TelemetryError` saying what is wrong."""
    schema = SCHEMAS.get(name)
    if schema is None:
        raise TelemetryError(f"unknown telemetry event {name!r}")
    if name in PLATFORM_EVENTS and not platform:
        raise TelemetryError(f"{name} needs a platform")
    if name in BUILD_WIDE_EVENTS and platform:
        raise TelemetryError(f"{name} is about the whole build; it takes no platform")
    try:
        return schema.model_validate(data).model_dump(mode="json")
    except ValidationError as exc:
        raise TelemetryError(f"{name}: {exc}") from None


def record(
    conn: Connection,
    build_id: int,
    name: str,
    now: datetime,
    platform: str | None = None,
    **data: Any,
) -> dict[str, Any]:
    """Check and store one event; return it in its one JSON shape."""
    stored = check(name, platform, data)
    event_id = conn.execute(
        insert(telemetry_events)
        .values(build_id=build_id, name=name, platform=platform, ts=now, data=stored)
        .returning(telemetry_events.c.id)
    ).scalar_one()
    return _shape(event_id, build_id, name, platform, now, stored)


def _iso(value: datetime) -> str:
    return value.isoformat().replace("+00:00", "Z")


def _shape(event_id, build_id, name, platform, ts, data) -> dict[str, Any]:
    return {"id": event_id, "build_id": build_id, "name": name, "platform": platform,
            "ts": _iso(ts), "data": data}


def as_dict(row: Any) -> dict[str, Any]:
    """The one JSON shape of an event, the same for the API, the stream and the reports."""
    return _shape(row.id, row.build_id, row.name, row.platform, row.ts, row.data)


def events_of(conn: Connection, build_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(telemetry_events)
        .where(telemetry_events.c.build_id == build_id)
        .order_by(telemetry_events.c.id)
    )
    return [as_dict(row) for row in rows]


def latest_attempt(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events from the last ``build_started`` on (all of them if there is none): a build
    whose worker died starts again, and what the earlier attempt did is void. Every reader of a
    build's telemetry (the API's results, the check run) counts only this."""
    starts = [i for i, e in enumerate(events) if e["name"] == "build_started"]
    return events[starts[-1]:] if starts else events


# -- the in-process bus -----------------------------------------------------------------------


class Subscription:
    """A bounded queue of bus messages. A consumer that falls behind is not waited for: its
    queue is dropped and it receives one ``{"type": "resync"}`` message, after which it should
    re-read what it missed from storage."""

    def __init__(self, bus: Bus, maxsize: int, accept: Callable[[dict[str, Any]], bool] | None = None) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize)
        self._accept = accept
        self.overflowed = False

    def _offer(self, message: dict[str, Any]) -> None:
        if self.overflowed or (self._accept is not None and not self._accept(message)):
            return
        try:
            self._queue.put_nowait(message)
        except asyncio.QueueFull:
            self.overflowed = True
            while not self._queue.empty():
                self._queue.get_nowait()
            self._queue.put_nowait({"type": "resync"})

    async def get(self) -> dict[str, Any]:
        message = await self._queue.get()
        if message.get("type") == "resync":
            self.overflowed = False
        return message

    def drain(self) -> list[dict[str, Any]]:
        """Every message waiting, without waiting for more."""
        messages = []
        while not self._queue.empty():
            messages.append(self._queue.get_nowait())
            if messages[-1].get("type") == "resync":
                self.overflowed = False
        return messages

    def close(self) -> None:
        self._bus._discard(self)

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self.get()


def builds_of(message: dict[str, Any]) -> list[int] | None:
    """The builds a bus message is about (None: not one build's, e.g. a resync)."""
    try:
        kind = message.get("type")
        if kind == "event":
            return [message["event"]["build_id"]]
        if kind == "log":
            return [message["build_id"]]
        if kind == "builds_changed":
            return list(message["ids"])
    except (KeyError, TypeError):
        pass
    return None


class Bus:
    """Publish/subscribe inside one process: publishing never blocks the publisher.

    A subscription may be about one build: it is kept under that build, so a message costs the
    subscriptions it concerns, not every open stream of the process."""

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()
        self._by_build: dict[int, set[Subscription]] = {}

    def subscribe(self, maxsize: int = 1000, accept: Callable[[dict[str, Any]], bool] | None = None,
                  build_id: int | None = None) -> Subscription:
        """A new subscription; ``accept`` (if given) picks the messages it takes, so that the
        others cost one call, not a wake-up of its consumer; ``build_id``: only that build's
        messages (and those about no build) reach it."""
        subscription = Subscription(self, maxsize, accept)
        if build_id is None:
            self._subscribers.add(subscription)
        else:
            subscription._build_id = build_id
            self._by_build.setdefault(build_id, set()).add(subscription)
        return subscription

    def _discard(self, subscription: Subscription) -> None:
        self._subscribers.discard(subscription)
        build_id = getattr(subscription, "_build_id", None)
        if build_id is not None and build_id in self._by_build:
            self._by_build[build_id].discard(subscription)
            if not self._by_build[build_id]:
                del self._by_build[build_id]

    def publish(self, message: dict[str, Any]) -> None:
        about = builds_of(message)
        keyed = ([s for b in about for s in self._by_build.get(b, ())] if about is not None
                 else [s for group in self._by_build.values() for s in group])
        for subscription in [*self._subscribers, *keyed]:
            subscription._offer(message)


@dataclass(frozen=True)
class LogCaps:
    """The most of one build's log that is stored (IMAGEBOT_LOG_MAX_BYTES / _LINES): a build
    that prints more (``RUN yes``) goes on, its log ends in one marker line."""

    max_bytes: int = 16 * 1024 * 1024
    max_lines: int = 100_000

    @classmethod
    def of(cls, settings: Any) -> LogCaps:
        return cls(settings.log_max_bytes, settings.log_max_lines)


#: Characters of one stored line at most (a line without a newline can be any length).
MAX_LINE_CHARS = 8192
#: Builds whose log is known full, remembered so that their lines cost no write; at most this many.
_FULL_MEMORY = 4096


class Telemetry:
    """What the pipeline holds: ``await telemetry.emit(...)`` stores, then publishes."""

    def __init__(self, db, bus: Bus | None = None, progress_to: frozenset[str] = frozenset(),
                 log_caps: LogCaps | None = None) -> None:
        self.db = db
        self.bus = bus or Bus()
        #: Forges whose running builds show interim progress (bot.reporters.outbox.progress_to).
        self.progress_to = progress_to
        self.log_caps = log_caps or LogCaps()
        self._full: set[int] = set()

    async def emit(self, build_id: int, name: str, platform: str | None = None, **data: Any) -> dict[str, Any]:
        check(name, platform, data)  # fail in the caller's frame, before queuing the write

        def store(conn: Connection) -> dict[str, Any]:
            now = utcnow()
            if name in outbox.PROGRESS_EVENTS:  # the check run shows it too
                outbox.owe_progress(conn, build_id, now, self.progress_to)
            return record(conn, build_id, name, now, platform, **data)

        event = await self.db.write(store)
        self.bus.publish({"type": "event", "event": event})
        return event

    async def log_lines(self, build_id: int, platform: str | None, lines: list[str]) -> None:
        """Append build-log lines, up to the build's cap (stored for the API and the check run).

        The bus hears one message per call, not per line: a stream reads the lines from
        storage, so a build that prints fast costs each subscriber one wake-up per batch.
        """
        if not lines or build_id in self._full:
            return
        now = utcnow()
        stored = await self.db.write_item(_store_log_lines, (build_id, platform, now, lines, self.log_caps))
        if stored.truncated is not None:
            if len(self._full) >= _FULL_MEMORY:
                self._full.clear()
            self._full.add(build_id)
            self.bus.publish({"type": "event", "event": stored.truncated})
        if stored.lines:
            self.bus.publish({"type": "log", "build_id": build_id, "platform": platform,
                              "ts": _iso(now), "lines": stored.lines})


def render_line(platform: str | None, line: str) -> str:
    """One stored line as the log serves it: prefixed with its platform (or ``build`` for the
    build's own steps), so the interleaved platforms stay readable."""
    return f"[{platform or 'build'}] {line}\n"


@dataclass(frozen=True)
class Stored:
    """What one call's lines became: the lines kept, and the ``log_truncated`` event if they
    reached the cap."""

    lines: list[str]
    truncated: dict[str, Any] | None = None


def _store_log_lines(conn: Connection, items: list[tuple]) -> list[Stored]:
    """Each item's lines that fit under its build's cap, with their offsets; past the cap one
    marker line and a ``log_truncated`` event, then nothing more for that build."""
    rows: list[dict[str, Any]] = []
    results = [_append(conn, rows, *item) for item in items]
    if rows:
        conn.execute(insert(build_logs), rows)
    return results


def _append(conn: Connection, rows: list[dict[str, Any]], build_id: int, platform: str | None,
            ts: datetime, lines: list[str], caps: LogCaps = LogCaps()) -> Stored:
    # one writer per build (its lease); FOR UPDATE keeps a second one honest on PostgreSQL
    size = conn.execute(select(builds.c.log_bytes, builds.c.log_lines, builds.c.log_truncated)
                        .where(builds.c.id == build_id).with_for_update()).first()
    if size is None or size.log_truncated:
        return Stored([])
    total, count, kept, reason = size.log_bytes, size.log_lines, [], None
    for line in lines:
        line = line[:MAX_LINE_CHARS]
        length = len(render_line(platform, line).encode())
        if count + 1 > caps.max_lines:
            reason = "lines"
        elif total + length > caps.max_bytes:
            reason = "bytes"
        if reason:
            break
        total, count = total + length, count + 1
        kept.append(line)
        rows.append({"build_id": build_id, "platform": platform, "ts": ts, "line": line, "end_offset": total})
    truncated = None
    if reason:
        marker = (f"imagebot: the log reached its cap of {caps.max_bytes} bytes or {caps.max_lines} lines "
                  f"(IMAGEBOT_LOG_MAX_BYTES / IMAGEBOT_LOG_MAX_LINES); the rest is not kept, the build goes on")
        total, count = total + len(render_line(None, marker).encode()), count + 1
        rows.append({"build_id": build_id, "platform": None, "ts": ts, "line": marker, "end_offset": total})
        truncated = record(conn, build_id, "log_truncated", ts, reason=reason, max_bytes=caps.max_bytes,
                           max_lines=caps.max_lines, bytes=total, lines=count)
    conn.execute(update(builds).where(builds.c.id == build_id)
                 .values(log_bytes=total, log_lines=count, log_truncated=reason is not None))
    return Stored(kept, truncated)


def log_of(conn: Connection, build_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(build_logs).where(build_logs.c.build_id == build_id).order_by(build_logs.c.id)
    )
    return [{"platform": r.platform, "ts": _iso(r.ts), "line": r.line} for r in rows]
