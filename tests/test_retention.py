"""Retention (bot.retention): old build logs, webhook deliveries and ended reports go, batch by
batch; builds, their telemetry, unfinished builds' logs, pending reports and recent ones stay.
The worker prunes when it starts."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from bot import retention, telemetry
from bot.models import BuildStatus, build_logs, builds, deliveries, reports, telemetry_events, utcnow
from bot.worker import BuildOutcome, Worker
from tests.support import make_settings
from tests.test_queue import enqueue, request


def count(db, table, *where) -> int:
    return db.read_sync(lambda c: c.execute(select(func.count()).select_from(table).where(*where)).scalar_one())


def ended(db, build_id: int, days_ago: float) -> None:
    at = utcnow() - timedelta(days=days_ago)
    db.write_sync(lambda c: c.execute(update(builds).where(builds.c.id == build_id)
                                      .values(status=BuildStatus.succeeded.value, finished_at=at)))


def with_log(db, build_id: int, lines: int) -> None:
    db.write_sync(lambda c: telemetry._store_log_lines(c, [(build_id, None, utcnow(), [f"l{n}" for n in range(lines)])]))
    db.write_sync(lambda c: telemetry.record(c, build_id, "build_started", utcnow(), attempt=1))


@pytest.fixture
def history(db):
    """Builds ended 100 and 10 days ago, one still queued; each with a log and an event."""
    old, recent, queued = enqueue(db, request(ref="refs/heads/a"), request(ref="refs/heads/b"),
                                  request(ref="refs/heads/c"), at=utcnow())
    for build_id in (old, recent, queued):
        with_log(db, build_id, 3)
    ended(db, old, 100)
    ended(db, recent, 10)
    return old, recent, queued


def test_logs_of_builds_ended_past_retention_go_and_the_rest_stays(db, history):
    old, recent, queued = history
    cutoff = utcnow() - timedelta(days=90)
    assert db.write_sync(lambda c: retention.prune_logs(c, cutoff)) == 3
    assert db.write_sync(lambda c: retention.prune_logs(c, cutoff)) == 0
    assert [count(db, build_logs, build_logs.c.build_id == b) for b in history] == [0, 3, 3]
    assert count(db, telemetry_events, telemetry_events.c.build_id == old) == 1  # the history stays
    assert count(db, builds) == 3


def test_logs_go_a_few_builds_at_a_time(db):
    ids = enqueue(db, *[request(ref=f"refs/heads/b{n}") for n in range(4)], at=utcnow())
    for build_id in ids:
        with_log(db, build_id, 2)
        ended(db, build_id, 100)
    cutoff = utcnow() - timedelta(days=90)
    assert [db.write_sync(lambda c: retention.prune_logs(c, cutoff, most=3)) for _ in range(3)] == [6, 2, 0]


def test_deliveries_past_retention_go_their_builds_stay(db):
    enqueue(db, request(ref="refs/heads/a"), request(ref="refs/heads/b"), at=utcnow())
    db.write_sync(lambda c: c.execute(update(deliveries).where(deliveries.c.id == 1)
                                      .values(received_at=utcnow() - timedelta(days=31))))
    cutoff = utcnow() - timedelta(days=30)
    assert db.write_sync(lambda c: retention.prune_deliveries(c, cutoff)) == 1
    assert count(db, deliveries) == 1 and count(db, builds) == 2


def test_prune_history_follows_the_settings(db, history):
    old, recent, queued = history
    # the old build's report was sent 8 days ago; the others are still pending (never pruned)
    db.write_sync(lambda c: c.execute(update(reports).where(reports.c.build_id == old).values(
        state="sent", sent_at=utcnow() - timedelta(days=8))))
    keep_forever = make_settings(db.url, log_retention_days=0)
    assert asyncio.run(retention.prune_history(db, keep_forever, utcnow())) == (0, 0, 1)  # reports: 168 h
    assert retention.logs_kept_since(keep_forever, utcnow()) is None
    week = make_settings(db.url, log_retention_days=7, delivery_retention_days=4)
    deliveries_left, reports_left = count(db, deliveries), count(db, reports)
    assert reports_left == 2
    assert asyncio.run(retention.prune_history(db, week, utcnow())) == (6, 0, 0)
    assert asyncio.run(retention.prune_history(db, week, utcnow() + timedelta(days=5))) == (0, deliveries_left, 0)
    assert count(db, reports) == reports_left


def test_delivery_retention_must_outlast_githubs_redelivery_window():
    from bot.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="delivery_retention_days|DELIVERY_RETENTION_DAYS"):
        load_settings(delivery_retention_days=2, _env_file=None)


def test_the_worker_prunes_when_it_starts(db, history):
    old, recent, queued = history
    settings = make_settings(db.url, poll_seconds=0.05, shutdown_grace_seconds=0)

    async def go():
        async def never(build) -> BuildOutcome:
            await asyncio.Event().wait()  # (the queued build stays running until the worker stops)
            return BuildOutcome(BuildStatus.succeeded)

        worker = Worker(db, settings, never)
        running = asyncio.create_task(worker.run())
        async with asyncio.timeout(20):
            while count(db, build_logs, build_logs.c.build_id == old):
                await asyncio.sleep(0.01)
        worker.stop()
        await running

    asyncio.run(go())
    assert [count(db, build_logs, build_logs.c.build_id == b) for b in history] == [0, 3, 3]
