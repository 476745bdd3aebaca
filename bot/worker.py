"""The worker: claims queued builds, runs up to ``concurrency`` of them, and holds their leases.

It runs in the bot's event loop (``imagebot serve``) or alone (``imagebot worker``). A lease is
renewed every third of its length; a worker that dies stops renewing, and any worker's periodic
recovery queues its builds again (or fails them after ``max_attempts``). A graceful stop
(SIGTERM) waits ``shutdown_grace_seconds`` for running builds, then gives the rest back to the
queue without counting the attempt.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection, select

from bot import masking, queue, retention, telemetry
from bot.db import Database
from bot.models import Build, BuildStatus, builds, utcnow
from bot.reporters import outbox
from bot.settings import Settings
from bot.telemetry import Bus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildOutcome:
    """How a build ended: what the worker records on the build row and as its last event."""

    status: BuildStatus
    error_kind: str | None = None
    error_message: str | None = None
    #: The step that failed (fetch, config, build, push, manifest), for reports.
    step: str | None = None
    #: Platforms whose images made it (all of them, unless a partial build was allowed).
    platforms: tuple[str, ...] = ()
    partial: bool = False


RunBuild = Callable[[Build], Awaitable[BuildOutcome]]


def placeholder_runner(settings: Settings) -> RunBuild:
    """A build that takes a set time, then succeeds: for exercising the queue on its own."""

    async def run(build: Build) -> BuildOutcome:
        await asyncio.sleep(settings.placeholder_build_seconds)
        return BuildOutcome(BuildStatus.succeeded, platforms=tuple(build.platforms))

    return run


def _claim_up_to(
    conn: Connection, owner: str, count: int, lease: timedelta, build_id: int | None = None,
    report_to: frozenset[str] = outbox.EVERY_FORGE,
) -> list[tuple[Build, dict]]:
    claimed = []
    for _ in range(count):
        now = utcnow()
        build = queue.claim(conn, owner, lease, now, build_id)
        if build is None:
            break
        if build.provider in report_to:
            outbox.owe(conn, [(build.id, BuildStatus.running.value)], now)
        claimed.append((build, telemetry.record(conn, build.id, "build_started", now, attempt=build.attempts)))
    return claimed


def _finish(
    conn: Connection, build: Build, owner: str, outcome: BuildOutcome, started: float,
    report_to: frozenset[str] = outbox.EVERY_FORGE,
) -> dict | None:
    """End the build with ``outcome`` and record its last event; None if no longer held."""
    now = utcnow()
    if not queue.finish(
        conn, build.id, owner, outcome.status, now, outcome.error_kind, outcome.error_message
    ):
        return None
    if build.provider in report_to:
        outbox.owe(conn, [(build.id, outcome.status.value)], now)
    duration = round(time.monotonic() - started, 3)
    if outcome.status is BuildStatus.succeeded:
        return telemetry.record(
            conn, build.id, "build_succeeded", now, duration_s=duration,
            platforms=list(outcome.platforms), partial=outcome.partial,
        )
    if outcome.status is BuildStatus.failed:
        return telemetry.record(
            conn, build.id, "build_failed", now, duration_s=duration,
            error_kind=outcome.error_kind or "unknown", error_message=outcome.error_message or "",
            step=outcome.step,
        )
    return telemetry.record(
        conn, build.id, "build_cancelled", now, duration_s=duration,
        reason=outcome.error_message or outcome.status.value,
    )


def _ended_elsewhere(conn: Connection, build_id: int, started: float) -> tuple[BuildOutcome, dict | None]:
    """The build was superseded or cancelled while it ran here: say so in its telemetry.
    (If another worker took it over instead, it goes on there, and nothing is recorded.)"""
    row = conn.execute(
        select(builds.c.status, builds.c.error_message).where(builds.c.id == build_id)
    ).one()
    status = BuildStatus(row.status)
    if not status.final:
        return BuildOutcome(BuildStatus.cancelled, error_message="taken over by another worker"), None
    reason = row.error_message or f"the build was {row.status} while it ran"
    event = telemetry.record(conn, build_id, "build_cancelled", utcnow(),
                             duration_s=round(time.monotonic() - started, 3), reason=reason)
    return BuildOutcome(status, error_message=reason), event


class Worker:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        run_build: RunBuild,
        owner: str | None = None,
        bus: Bus | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.run_build = run_build
        self.bus = bus
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = timedelta(seconds=settings.lease_seconds)
        self.report_to = outbox.report_to(settings)
        self.running: dict[int, asyncio.Task] = {}
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._shutting_down = False
        self._last_recovery = float("-inf")
        self._next_prune = 0.0  # monotonic time of the next pruning (bot.retention)
        self._ended: set[int] = set()  # running here, but superseded or cancelled elsewhere

    # -- control ------------------------------------------------------------------------------

    def wake(self) -> None:
        """Look at the queue now (a build was just queued in this process)."""
        if self._wake is not None:
            self._wake.set()

    def stop_builds(self, build_ids: list[int]) -> None:
        """Stop these builds now if they run here (they were superseded or cancelled)."""
        for build_id in build_ids:
            task = self.running.get(build_id)
            if task is not None and not task.done():
                self._ended.add(build_id)
                task.cancel()

    def _publish(self, *events: dict | None) -> None:
        if self.bus is not None:
            for event in events:
                if event is not None:
                    self.bus.publish({"type": "event", "event": event})

    def _announce(self, build_ids: list[int]) -> None:
        """Tell the live streams (bot.api.stream) these builds changed state without an event."""
        if self.bus is not None and build_ids:
            self.bus.publish({"type": "builds_changed", "ids": build_ids})

    def stop(self) -> None:
        """Stop claiming; ``run`` returns once running builds ended or were given back."""
        self._stopping = True
        self.wake()

    async def run(self) -> None:
        self._wake = asyncio.Event()
        log.info("worker %s started (concurrency %d)", self.owner, self.settings.concurrency)
        renewer = asyncio.create_task(self._renew_forever(), name="lease-renewer")
        try:
            while not self._stopping:
                await self._recover_if_due()
                await self._fill()
                await self._prune_if_due()
                await self._idle()
        finally:
            await self._drain()
            renewer.cancel()
            log.info("worker %s stopped", self.owner)

    # -- the loop -----------------------------------------------------------------------------

    async def _idle(self) -> None:
        assert self._wake is not None
        try:
            await asyncio.wait_for(self._wake.wait(), self.settings.poll_seconds)
        except TimeoutError:
            pass
        self._wake.clear()

    async def _recover_if_due(self) -> None:
        if time.monotonic() - self._last_recovery < self.settings.lease_seconds / 4:
            return
        self._last_recovery = time.monotonic()
        try:
            result = await self.db.write(
                lambda conn: queue.recover(conn, self.settings.max_attempts, utcnow(), self.report_to)
            )
        except Exception:
            log.exception("lease recovery failed; will try again")
            return
        if result.requeued or result.failed:
            self._announce(result.requeued + result.failed)
            log.warning(
                "recovered builds from lost workers: requeued %s, failed %s",
                result.requeued, result.failed,
            )

    async def _prune_if_due(self) -> None:
        """Delete logs, deliveries and sent reports past their retention (bot.retention):
        housekeeping, never in the way of building."""
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + retention.PRUNE_EVERY_SECONDS
        try:
            lines, deliveries, reports = await retention.prune_history(self.db, self.settings, utcnow())
        except Exception:
            log.exception("pruning old logs, deliveries and reports failed; will try again later")
            return
        if lines or deliveries or reports:
            log.info("pruned %d log line(s), %d delivery record(s) and %d report(s) past their retention",
                     lines, deliveries, reports)

    async def _fill(self) -> None:
        free = self.settings.concurrency - len(self.running)
        if free <= 0:
            return
        try:
            claimed = await self.db.write(
                lambda conn: _claim_up_to(conn, self.owner, free, self.lease, report_to=self.report_to)
            )
        except Exception:
            log.exception("claiming builds failed; will try again")
            return
        for build, event in claimed:
            self._publish(event)
            log.info("build %s claimed (%s %s @ %s)", build.id, build.repo, build.ref, build.sha)
            task = asyncio.create_task(self._execute(build), name=f"build-{build.id}")
            self.running[build.id] = task
            task.add_done_callback(lambda _t, build_id=build.id: self._done(build_id))

    def _done(self, build_id: int) -> None:
        self.running.pop(build_id, None)
        self.wake()

    async def run_one(self, build_id: int) -> BuildOutcome | None:
        """Run queued build ``build_id`` here and now (``imagebot build``); None if it was not
        queued. Its lease is held and renewed like any other."""
        claimed = await self.db.write(lambda conn: _claim_up_to(conn, self.owner, 1, self.lease, build_id, self.report_to))
        if not claimed:
            return None
        build, event = claimed[0]
        self._publish(event)
        renewer = asyncio.create_task(self._renew_forever(), name="lease-renewer")
        task = asyncio.create_task(self._execute(build), name=f"build-{build_id}")
        self.running[build_id] = task
        try:
            return await task
        finally:
            self.running.pop(build_id, None)
            renewer.cancel()

    async def _execute(self, build: Build) -> BuildOutcome:
        started = time.monotonic()
        try:
            outcome = await self.run_build(build)
        except asyncio.CancelledError:
            if build.id in self._ended:
                self._ended.discard(build.id)
                outcome, event = await self.db.write(lambda conn: _ended_elsewhere(conn, build.id, started))
                self._publish(event)
                log.info("build %s stopped: %s", build.id, outcome.error_message)
                return outcome
            if self._shutting_down:
                await self.db.write(lambda conn: queue.release(conn, build.id, self.owner))
                log.info("build %s given back to the queue at shutdown", build.id)
            raise
        except Exception as exc:
            # a bug of ours, whose words may carry anything the build had: masked like a build's
            masker = masking.of_settings(self.settings)
            log.error("build %s crashed: %s", build.id, masker.mask("".join(traceback.format_exception(exc))))
            outcome = BuildOutcome(BuildStatus.failed, "internal", masker.mask(f"{type(exc).__name__}: {exc}"))
        held = await self.db.write(lambda conn: _finish(conn, build, self.owner, outcome, started, self.report_to))
        self._publish(held)
        if held:
            log.info("build %s %s", build.id, outcome.status.value)
        else:
            log.warning("build %s ended here but its lease had moved on; result dropped", build.id)
        return outcome

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lease_seconds / 3)
            ids = list(self.running)
            if not ids:
                continue
            try:
                held = await self.db.write(
                    lambda conn: queue.renew(conn, self.owner, ids, self.lease, utcnow())
                )
            except Exception:
                log.exception("renewing leases failed; will try again")
                continue
            lost = sorted(set(ids) - held)
            if lost:
                log.warning("builds %s ended elsewhere (superseded, cancelled or taken over); stopping them", lost)
                self.stop_builds(lost)

    async def _drain(self) -> None:
        tasks = list(self.running.values())
        if not tasks:
            return
        log.info("waiting up to %ss for %d running build(s)",
                 self.settings.shutdown_grace_seconds, len(tasks))
        _, pending = await asyncio.wait(tasks, timeout=self.settings.shutdown_grace_seconds)
        self._shutting_down = True
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
