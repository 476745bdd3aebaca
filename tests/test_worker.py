"""The worker against a real database: concurrency, failures, lease loss, recovery, shutdown.

Builds run a stand-in ``run_build`` that the test controls with events, so the tests wait on
conditions, never on time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import select, update

from bot import queue, telemetry
from bot.models import BuildStatus, builds, utcnow
from bot.worker import BuildOutcome, Worker
from tests.support import make_settings
from tests.test_queue import enqueue, request

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Gate:
    """A controllable build: records which builds started, finishes them when told."""

    def __init__(self) -> None:
        self.started: asyncio.Queue[int] = asyncio.Queue()
        self.release: dict[int, asyncio.Event] = {}
        self.cancelled: asyncio.Queue[int] = asyncio.Queue()
        self.outcome: Callable[[int], BuildOutcome] = lambda _id: BuildOutcome(BuildStatus.succeeded)

    async def __call__(self, build) -> BuildOutcome:
        event = self.release.setdefault(build.id, asyncio.Event())
        await self.started.put(build.id)
        try:
            await event.wait()
        except asyncio.CancelledError:
            await self.cancelled.put(build.id)
            raise
        return self.outcome(build.id)

    def finish(self, build_id: int) -> None:
        self.release.setdefault(build_id, asyncio.Event()).set()


async def until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    """Wait for a condition the worker makes true (a bounded wait, not a sleep-as-sync)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def statuses(db) -> dict[int, str]:
    return dict(db.read_sync(lambda c: list(c.execute(select(builds.c.id, builds.c.status)))))


def fast_settings(db_url: str, **kw):
    values = {"concurrency": 2, "lease_seconds": 1.5, "poll_seconds": 0.05, "shutdown_grace_seconds": 0}
    values.update(kw)
    return make_settings(db_url, **values)


async def test_runs_at_most_concurrency_builds(db, db_url):
    ids = enqueue(db, *[request(ref=f"refs/heads/b{i}") for i in range(5)])
    gate = Gate()
    worker = Worker(db, fast_settings(db_url), gate)
    task = asyncio.create_task(worker.run())
    first = {await gate.started.get(), await gate.started.get()}
    assert first == set(ids[:2])  # oldest first
    assert sorted(s for s in statuses(db).values()) == ["queued"] * 3 + ["running"] * 2
    assert gate.started.empty()
    for build_id in ids:
        gate.finish(build_id)
    await until(lambda: all(s == "succeeded" for s in statuses(db).values()))
    worker.stop()
    await task
    events = db.read_sync(lambda c: telemetry.events_of(c, ids[0]))
    assert [e["name"] for e in events] == ["build_started", "build_succeeded"]
    assert events[0]["data"] == {"attempt": 1}


async def test_a_crash_message_never_shows_the_operators_secrets(db, db_url, caplog):
    """A crash is a bug of ours, and its words may carry what the build had (the registry
    password in a URL, a token in a header): stored and logged masked, like a build's text."""
    import base64

    (build_id,) = enqueue(db, request())
    settings = fast_settings(db_url, registry="r.example", registry_username="bot",
                             registry_password="crash-registry-password", admin_token="crash-admin-token")
    basic = base64.b64encode(b"bot:crash-registry-password").decode()

    async def crash(build):
        raise RuntimeError(f"GET https://bot:crash-registry-password@r.example ({basic}), admin crash-admin-token")

    worker = Worker(db, settings, crash)
    task = asyncio.create_task(worker.run())
    await until(lambda: statuses(db)[build_id] == "failed")
    worker.stop()
    await task
    message = db.read_sync(lambda c: c.execute(select(builds.c.error_message)).scalar_one())
    logged = caplog.text
    for secret in ("crash-registry-password", basic, "crash-admin-token"):
        assert secret not in message and secret not in logged
    assert message.startswith("RuntimeError: GET https://***@r.example") and "crashed" in logged


async def test_a_crashing_build_fails_with_kind_internal(db, db_url):
    (build_id,) = enqueue(db, request())

    async def crash(build):
        raise RuntimeError("boom")

    worker = Worker(db, fast_settings(db_url), crash)
    task = asyncio.create_task(worker.run())
    await until(lambda: statuses(db)[build_id] == "failed")
    worker.stop()
    await task
    row = db.read_sync(lambda c: c.execute(select(builds)).one())
    assert (row.error_kind, row.error_message) == ("internal", "RuntimeError: boom")
    names = [e["name"] for e in db.read_sync(lambda c: telemetry.events_of(c, build_id))]
    assert names == ["build_started", "build_failed"]


async def test_failure_outcome_is_recorded(db, db_url):
    (build_id,) = enqueue(db, request())
    gate = Gate()
    gate.outcome = lambda _id: BuildOutcome(BuildStatus.failed, "denied", "push denied")
    worker = Worker(db, fast_settings(db_url), gate)
    task = asyncio.create_task(worker.run())
    gate.finish(await gate.started.get())
    await until(lambda: statuses(db)[build_id] == "failed")
    worker.stop()
    await task
    event = db.read_sync(lambda c: telemetry.events_of(c, build_id))[-1]
    assert event["name"] == "build_failed"
    assert event["data"]["error_kind"] == "denied" and event["data"]["error_message"] == "push denied"


async def test_losing_the_lease_stops_the_build(db, db_url):
    (build_id,) = enqueue(db, request())
    gate = Gate()
    worker = Worker(db, fast_settings(db_url), gate)
    task = asyncio.create_task(worker.run())
    await gate.started.get()
    # another process ends it (a cancel from the API, say): the next renewal notices
    db.write_sync(lambda c: c.execute(update(builds).values(
        status="cancelled", lease_owner=None, error_message="cancelled by an operator")))
    async with asyncio.timeout(10):
        assert await gate.cancelled.get() == build_id
    await until(lambda: len(db.read_sync(lambda c: telemetry.events_of(c, build_id))) == 2)
    worker.stop()
    await task
    assert statuses(db)[build_id] == "cancelled"
    last = db.read_sync(lambda c: telemetry.events_of(c, build_id))[-1]
    assert last["name"] == "build_cancelled" and last["data"]["reason"] == "cancelled by an operator"


async def test_a_newer_push_stops_the_running_build_at_once(db, db_url):
    """In one process the webhook tells the worker directly: no waiting for a renewal."""
    (first,) = enqueue(db, request(sha="1" * 40))
    gate = Gate()
    bus = telemetry.Bus()
    subscription = bus.subscribe()
    worker = Worker(db, fast_settings(db_url, lease_seconds=600), gate, bus=bus)
    task = asyncio.create_task(worker.run())
    await gate.started.get()
    info = queue.DeliveryInfo("github", "newer", "push", None, "acme/app")
    recorded = db.write_sync(lambda c: queue.record_delivery(c, info, request(sha="2" * 40), ["linux/amd64"], utcnow()))
    assert recorded.superseded == [first]
    worker.stop_builds(recorded.superseded)
    async with asyncio.timeout(5):  # far less than a renewal period (600 s / 3)
        assert await gate.cancelled.get() == first
    names = []
    async with asyncio.timeout(5):
        while "build_cancelled" not in names:
            names.append((await subscription.get())["event"]["name"])
    gate.finish(recorded.build_id)
    await until(lambda: statuses(db)[recorded.build_id] == "succeeded")
    worker.stop()
    await task
    assert statuses(db)[first] == "superseded"
    event = db.read_sync(lambda c: telemetry.events_of(c, first))[-1]
    assert event["data"]["reason"] == f"superseded by build {recorded.build_id}"


async def test_builds_of_a_dead_worker_are_recovered(db, db_url):
    (build_id,) = enqueue(db, request())
    long_ago = utcnow() - timedelta(minutes=5)
    db.write_sync(lambda c: queue.claim(c, "dead-worker", timedelta(seconds=1), long_ago))
    gate = Gate()
    worker = Worker(db, fast_settings(db_url), gate)
    task = asyncio.create_task(worker.run())
    assert await gate.started.get() == build_id
    gate.finish(build_id)
    await until(lambda: statuses(db)[build_id] == "succeeded")
    worker.stop()
    await task
    row = db.read_sync(lambda c: c.execute(select(builds)).one())
    assert row.attempts == 2 and row.lease_owner is None


async def test_graceful_stop_gives_running_builds_back(db, db_url):
    ids = enqueue(db, request(ref="refs/heads/a"), request(ref="refs/heads/b"))
    gate = Gate()
    worker = Worker(db, fast_settings(db_url, shutdown_grace_seconds=0), gate)
    task = asyncio.create_task(worker.run())
    await gate.started.get()
    await gate.started.get()
    worker.stop()
    await task
    rows = db.read_sync(lambda c: list(c.execute(select(builds))))
    assert [(r.status, r.attempts, r.lease_owner) for r in rows] == [("queued", 0, None)] * 2
    assert {await gate.cancelled.get(), await gate.cancelled.get()} == set(ids)


async def test_graceful_stop_lets_builds_finish_within_the_grace_period(db, db_url):
    (build_id,) = enqueue(db, request())
    gate = Gate()
    worker = Worker(db, fast_settings(db_url, shutdown_grace_seconds=30), gate)
    task = asyncio.create_task(worker.run())
    await gate.started.get()
    worker.stop()
    gate.finish(build_id)
    await task
    assert statuses(db)[build_id] == "succeeded"


async def test_a_build_taken_over_elsewhere_stops_here_without_ending(db, db_url):
    """A worker whose lease expired and was taken over stops its copy; the build goes on."""
    (build_id,) = enqueue(db, request())
    gate = Gate()
    worker = Worker(db, fast_settings(db_url), gate)
    task = asyncio.create_task(worker.run())
    await gate.started.get()
    db.write_sync(lambda c: c.execute(update(builds).values(lease_owner="another-worker")))
    async with asyncio.timeout(10):
        assert await gate.cancelled.get() == build_id
    worker.stop()
    await task
    assert statuses(db)[build_id] == "running"  # still the other worker's
    names = [e["name"] for e in db.read_sync(lambda c: telemetry.events_of(c, build_id))]
    assert names == ["build_started"]
