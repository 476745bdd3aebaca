"""Telemetry events: one row per step of a build, read unchanged by every consumer.

The pipeline issue adds the per-step event schemas; for now the worker records the build-level
events, and the shape of a stored event (id, build_id, name, platform, ts, data) is fixed here.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Connection, insert, select

from bot.models import telemetry_events

BUILD_EVENTS = {"build_started", "build_succeeded", "build_failed", "build_cancelled"}


class TelemetryError(Exception):
    kind = "telemetry"


def record(
    conn: Connection,
    build_id: int,
    name: str,
    now: datetime,
    platform: str | None = None,
    **data: Any,
) -> int:
    """Store one event; an unknown event name is a bug, so it raises instead of storing."""
    if name not in BUILD_EVENTS:
        raise TelemetryError(f"unknown telemetry event {name!r}")
    return conn.execute(
        insert(telemetry_events)
        .values(build_id=build_id, name=name, platform=platform, ts=now, data=data)
        .returning(telemetry_events.c.id)
    ).scalar_one()


def as_dict(row: Any) -> dict[str, Any]:
    """The one JSON shape of an event, the same for the API, the stream and the reports."""
    return {
        "id": row.id,
        "build_id": row.build_id,
        "name": row.name,
        "platform": row.platform,
        "ts": row.ts.isoformat().replace("+00:00", "Z"),
        "data": row.data,
    }


def events_of(conn: Connection, build_id: int) -> list[dict[str, Any]]:
    rows = conn.execute(
        select(telemetry_events)
        .where(telemetry_events.c.build_id == build_id)
        .order_by(telemetry_events.c.id)
    )
    return [as_dict(row) for row in rows]
