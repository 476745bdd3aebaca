"""What the bot keeps, and for how long: build logs, webhook deliveries and the reports that
were sent to the forges are deleted once they are older than the settings say.

Builds and their telemetry events stay: they are small, and the history, the metrics and the
dashboard's timelines are made of them. Logs are most of the database (every line of every
build), and a delivery is only needed while its forge may deliver it again (GitHub lets a
delivery be redelivered for three days). A report is only needed until it is delivered; ended
ones are kept a while for whoever asks what the forge was told (``/api/builds/{id}/reports``).

The worker prunes (every process that runs builds, at start and every ``PRUNE_EVERY_SECONDS``),
in small batches, so that on SQLite the one writer is never held long enough to delay a webhook.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection, delete, exists, select, update

from bot.db import Database
from bot.models import build_logs, builds, deliveries
from bot.reporters import outbox
from bot.settings import Settings

PRUNE_EVERY_SECONDS = 600.0
#: Builds whose log lines one transaction deletes (a build's log may have many thousand lines).
LOG_BUILDS_PER_BATCH = 5
DELIVERIES_PER_BATCH = 1000


def logs_kept_since(settings: Settings, now: datetime) -> datetime | None:
    """Builds that ended before this have no log any more (None: logs are kept forever)."""
    days = settings.log_retention_days
    return now - timedelta(days=days) if days else None


def prune_logs(conn: Connection, ended_before: datetime, most: int = LOG_BUILDS_PER_BATCH) -> int:
    """Delete the log lines of up to ``most`` builds that ended before ``ended_before``; how
    many lines went."""
    ended = conn.execute(
        select(builds.c.id)
        .where(builds.c.finished_at < ended_before, exists().where(build_logs.c.build_id == builds.c.id))
        .order_by(builds.c.id).limit(most)
    ).scalars().all()
    if not ended:
        return 0
    conn.execute(update(builds).where(builds.c.id.in_(ended)).values(log_bytes=0, log_lines=0))
    return conn.execute(delete(build_logs).where(build_logs.c.build_id.in_(ended))).rowcount


def prune_deliveries(conn: Connection, received_before: datetime, most: int = DELIVERIES_PER_BATCH) -> int:
    """Delete up to ``most`` deliveries received before ``received_before`` (their builds stay)."""
    doomed = (
        select(deliveries.c.id).where(deliveries.c.received_at < received_before)
        .order_by(deliveries.c.id).limit(most).scalar_subquery()
    )
    return conn.execute(delete(deliveries).where(deliveries.c.id.in_(doomed))).rowcount


async def prune_history(db: Database, settings: Settings, now: datetime) -> tuple[int, int, int]:
    """Everything past its retention, batch by batch; (log lines, deliveries, reports) deleted."""
    logs_before = logs_kept_since(settings, now)
    delivered_before = now - timedelta(days=settings.delivery_retention_days)
    reported_before = now - timedelta(hours=settings.report_retention_hours)
    return (
        await _batches(db, lambda conn: prune_logs(conn, logs_before)) if logs_before is not None else 0,
        await _batches(db, lambda conn: prune_deliveries(conn, delivered_before)),
        await _batches(db, lambda conn: outbox.prune(conn, reported_before)),
    )


async def _batches(db: Database, batch) -> int:
    """Run ``batch`` (one transaction each) until it deletes nothing; how many rows went."""
    total = 0
    while deleted := await db.write(batch):
        total += deleted
    return total
