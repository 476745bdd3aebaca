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
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import Connection

from bot import queue, telemetry
from bot.db import Database
from bot.models import Build, BuildStatus, utcnow
from bot.settings import Settings

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
    conn: Connection, owner: str, count: int, lease: timedelta, build_id: int | None = None
) -> list[Build]:
    claimed = []
    for _ in range(count):
        now = utcnow()
        build = queue.claim(conn, owner, lease, now, build_id)
        if build is None:
            break
        telemetry.record(conn, build.id, "build_started", now, attempt=build.attempts)
        claimed.append(build)
    return claimed


def _finish(
    conn: Connection, build: Build, owner: str, outcome: BuildOutcome, started: float
) -> bool:
    now = utcnow()
    if not queue.finish(
        conn, build.id, owner, outcome.status, now, outcome.error_kind, outcome.error_message
    ):
        return False
    duration = round(time.monotonic() - started, 3)
    if outcome.status is BuildStatus.succeeded:
        telemetry.record(
            conn, build.id, "build_succeeded", now, duration_s=duration,
            platforms=list(outcome.platforms), partial=outcome.partial,
        )
    elif outcome.status is BuildStatus.failed:
        telemetry.record(
            conn, build.id, "build_failed", now, duration_s=duration,
            error_kind=outcome.error_kind or "unknown", error_message=outcome.error_message or "",
            step=outcome.step,
        )
    else:
        telemetry.record(
            conn, build.id, "build_cancelled", now, duration_s=duration,
            reason=outcome.error_message or outcome.status.value,
        )
    return True


class Worker:
    def __init__(
        self,
        db: Database,
        settings: Settings,
        run_build: RunBuild,
        owner: str | None = None,
    ) -> None:
        self.db = db
        self.settings = settings
        self.run_build = run_build
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.lease = timedelta(seconds=settings.lease_seconds)
        self.running: dict[int, asyncio.Task] = {}
        self._wake: asyncio.Event | None = None
        self._stopping = False
        self._shutting_down = False
        self._last_recovery = float("-inf")

    # -- control ------------------------------------------------------------------------------

    def wake(self) -> None:
        """Look at the queue now (a build was just queued in this process)."""
        if self._wake is not None:
            self._wake.set()

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
                lambda conn: queue.recover(conn, self.settings.max_attempts, utcnow())
            )
        except Exception:
            log.exception("lease recovery failed; will try again")
            return
        if result.requeued or result.failed:
            log.warning(
                "recovered builds from lost workers: requeued %s, failed %s",
                result.requeued, result.failed,
            )

    async def _fill(self) -> None:
        free = self.settings.concurrency - len(self.running)
        if free <= 0:
            return
        try:
            claimed = await self.db.write(
                lambda conn: _claim_up_to(conn, self.owner, free, self.lease)
            )
        except Exception:
            log.exception("claiming builds failed; will try again")
            return
        for build in claimed:
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
        claimed = await self.db.write(lambda conn: _claim_up_to(conn, self.owner, 1, self.lease, build_id))
        if not claimed:
            return None
        renewer = asyncio.create_task(self._renew_forever(), name="lease-renewer")
        task = asyncio.create_task(self._execute(claimed[0]), name=f"build-{build_id}")
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
            if self._shutting_down:
                await self.db.write(lambda conn: queue.release(conn, build.id, self.owner))
                log.info("build %s given back to the queue at shutdown", build.id)
            raise
        except Exception as exc:
            log.exception("build %s crashed", build.id)
            outcome = BuildOutcome(BuildStatus.failed, "internal", f"{type(exc).__name__}: {exc}")
        held = await self.db.write(lambda conn: _finish(conn, build, self.owner, outcome, started))
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
            for build_id in set(ids) - held:
                task = self.running.get(build_id)
                if task is not None:
                    log.warning("build %s: lease lost (cancelled or taken over); stopping it", build_id)
                    task.cancel()

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
