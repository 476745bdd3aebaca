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
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import Connection, insert, select

from bot.models import build_logs, telemetry_events, utcnow
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

    def __init__(self, bus: Bus, maxsize: int) -> None:
        self._bus = bus
        self._queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize)
        self.overflowed = False

    def _offer(self, message: dict[str, Any]) -> None:
        if self.overflowed:
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

    def close(self) -> None:
        self._bus._subscribers.discard(self)

    async def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            yield await self.get()


class Bus:
    """Publish/subscribe inside one process: publishing never blocks the publisher."""

    def __init__(self) -> None:
        self._subscribers: set[Subscription] = set()

    def subscribe(self, maxsize: int = 1000) -> Subscription:
        subscription = Subscription(self, maxsize)
        self._subscribers.add(subscription)
        return subscription

    def publish(self, message: dict[str, Any]) -> None:
        for subscription in list(self._subscribers):
            subscription._offer(message)


class Telemetry:
    """What the pipeline holds: ``await telemetry.emit(...)`` stores, then publishes."""

    def __init__(self, db, bus: Bus | None = None, progress_to: frozenset[str] = frozenset()) -> None:
        self.db = db
        self.bus = bus or Bus()
        #: Forges whose running builds show interim progress (bot.reporters.outbox.progress_to).
        self.progress_to = progress_to

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
        """Append build-log lines (stored for the API and the check run, and published)."""
        if not lines:
            return
        now = utcnow()
        await self.db.write_item(_store_log_lines, (build_id, platform, now, lines))
        for line in lines:
            self.bus.publish({"type": "log", "build_id": build_id, "platform": platform,
                              "ts": _iso(now), "line": line})


def _store_log_lines(conn: Connection, items: list[tuple]) -> list[None]:
    rows = [
        {"build_id": build_id, "platform": platform, "ts": ts, "line": line[:8192]}
        for build_id, platform, ts, lines in items
        for line in lines
    ]
    conn.execute(insert(build_logs), rows)
    return [None] * len(items)


def log_of(conn: Connection, build_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(build_logs).where(build_logs.c.build_id == build_id).order_by(build_logs.c.id)
    )
    return [{"platform": r.platform, "ts": _iso(r.ts), "line": r.line} for r in rows]
