"""The sender: delivers the outbox (bot.reporters.outbox) to GitHub and GitLab.

It runs in every bot process (``serve`` and ``worker``) beside the worker. Each round it leases
the reports that are first in line for their commit and context, renders each from the build
as stored now (statuses from the reported state, check runs from the telemetry), and sends it
to every target of its forge: a commit status, and in GitHub App mode a check run. A refusal
is classified (bot.reporters.errors): 5xx, network faults and rate limits are retried for as
long as it takes, waiting as long as the forge asks; a body the forge calls invalid is dropped
(logged), and other refusals are retried a bounded number of times.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
import uuid
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Connection, select

from bot import telemetry
from bot.db import Database
from bot.models import Build, BuildKind, BuildStatus, ReportState, build_logs, builds, utcnow
from bot.reporters import outbox
from bot.reporters.check_run import LOG_TAIL_LINES, BuildFacts, check_run_body
from bot.reporters.commit_status import CommitStatus, commit_status, describe
from bot.reporters.errors import ReportError
from bot.reporters.github import GitHubClient
from bot.reporters.gitlab import GitLabClient
from bot.settings import Settings
from bot.telemetry import Bus

log = logging.getLogger(__name__)

#: Reports sent at the same time (each for a different commit and context).
BATCH = 8
#: The least time between two rounds while reports keep coming.
ROUND_GAP = 0.05
#: Events after which the worker has owed a report (its start and end, and progress).
WAKING_EVENTS = outbox.PROGRESS_EVENTS | {"build_started", "build_succeeded", "build_failed", "build_cancelled"}
#: GitLab's answer when a status is already in the state posted (e.g. ``running`` twice after a
#: build was re-queued): the report has nothing left to say.
GITLAB_SAME_STATE = "Cannot transition status"


@dataclass
class Rendered:
    """A report's build as stored when it is sent."""

    build: Build
    events: list[dict[str, Any]]
    log: list[dict[str, Any]]


def _load(conn: Connection, build_id: int, with_telemetry: bool) -> Rendered:
    row = conn.execute(select(builds).where(builds.c.id == build_id)).one()
    build = Build.model_validate(row._asdict())
    if not with_telemetry:
        return Rendered(build, [], [])
    tail = conn.execute(
        select(build_logs.c.platform, build_logs.c.line)
        .where(build_logs.c.build_id == build_id)
        .order_by(build_logs.c.id.desc())
        .limit(LOG_TAIL_LINES)
    ).all()
    lines = [{"platform": r.platform, "line": r.line} for r in reversed(tail)]
    return Rendered(build, telemetry.events_of(conn, build_id), lines)


def context_for(settings: Settings, build: Build) -> str:
    """The status context and check-run name of a build (see outbox.REPORT_KEY)."""
    suffix = " (pull_request)" if build.kind == BuildKind.pull_request else ""
    return settings.report_context + suffix


class Pace:
    """Content-creating requests per forge: at most ``per_minute`` in any 60 s and ``per_hour``
    in any hour (GitHub's secondary rate limits are 80 and 500; a burst of builds must not trip
    them, since GitHub then stops answering for a minute or more). A report that would exceed
    them waits, without counting as a failed attempt.

    Interim check-run updates are the one kind of report nobody misses when it is late, so they
    may only use the budgets down to a ``reserve`` (a quarter): statuses and final updates
    never queue behind progress bars.
    """

    MINUTE, HOUR = 60.0, 3600.0

    def __init__(self, per_minute: int, per_hour: int | None = None, reserve: float = 0.25) -> None:
        self.per_minute = per_minute
        self.per_hour = per_hour if per_hour is not None else per_minute * 60
        self.reserve = reserve
        self._sent: dict[str, deque[float]] = {}

    def _windows(self, low: bool) -> list[tuple[float, int]]:
        share = 1 - self.reserve if low else 1.0
        return [(self.MINUTE, max(1, int(self.per_minute * share))), (self.HOUR, max(1, int(self.per_hour * share)))]

    def _recent(self, forge: str, now: float) -> deque[float]:
        sent = self._sent.setdefault(forge, deque())
        while sent and sent[0] <= now - self.HOUR:
            sent.popleft()
        return sent

    def room(self, forge: str, now: float | None = None) -> int:
        """Requests ``forge`` can take now."""
        now = time.monotonic() if now is None else now
        sent = self._recent(forge, now)
        return min(limit - sum(1 for t in sent if t > now - window) for window, limit in self._windows(False))

    def take(self, forge: str, count: int, now: float | None = None, low: bool = False) -> float:
        """Reserve ``count`` requests now; 0, or how long to wait before asking again."""
        now = time.monotonic() if now is None else now
        sent = self._recent(forge, now)
        wait = 0.0
        for window, limit in self._windows(low):
            inside = [t for t in sent if t > now - window]
            over = len(inside) + count - limit
            if over > 0 and inside:  # (a lone request bigger than the budget still goes)
                wait = max(wait, inside[min(over, len(inside)) - 1] + window - now)
        if wait > 0:
            return wait
        sent.extend([now] * count)
        return 0.0


class Sender:
    def __init__(self, db: Database, settings: Settings, github: GitHubClient | None = None,
                 gitlab: GitLabClient | None = None, owner: str | None = None,
                 bus: Bus | None = None, lease: timedelta | None = None) -> None:
        self.db = db
        #: How long a report is ours once leased (as long as a build's lease, so a crashed
        #: process's reports are taken over as soon as its builds are); a delivery is cut off
        #: well before its lease ends, so two senders never send one report at the same time.
        self.lease = lease or timedelta(seconds=settings.lease_seconds)
        self.bus = bus
        self.settings = settings
        self.github = github or GitHubClient(settings)
        self.gitlab = gitlab or GitLabClient(settings)
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}:reports"
        self._wake = asyncio.Event()
        self._stopping = False
        self._last_interim: dict[int, float] = {}  # build id -> monotonic time of its last PATCH
        self.pace = Pace(settings.report_requests_per_minute, settings.report_requests_per_hour)
        self.sent = 0  # requests that reached the forge and were accepted (tests, metrics)
        #: Forges nothing is sent to until a monotonic time: one that asked us to wait (a rate
        #: limit holds for every request of its principal, not just the refused one), or is
        #: failing (5xx, network), where one probe at a time beats a batch of doomed requests.
        self.holds: dict[str, float] = {}
        self._outage: dict[str, int] = {}  # forge -> failed probes in a row

    @property
    def enabled(self) -> bool:
        """Some forge is configured: reports can be owed at all."""
        return bool(outbox.report_to(self.settings))

    def wake(self) -> None:
        if self.enabled:
            self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()  # (not wake(): stopping must work when disabled too)

    def targets(self, provider: str) -> list[str]:
        """Where a build of ``provider`` reports, as configured."""
        if provider == "gitlab":
            return ["status"] if self.settings.gitlab_api_token else []
        mode = self.github.mode
        return {"app": ["status", "check_run"], "token": ["status"]}.get(mode, [])

    # -- the loop -----------------------------------------------------------------------------

    async def run(self) -> None:
        """Send until :meth:`stop`; then finish the round in hand and return."""
        log.info("report sender %s started", self.owner)
        follower = asyncio.create_task(self._follow(), name="report-wakeups") if self.bus else None
        try:
            while not self._stopping:
                if not self.enabled or not await self.send_round():
                    await self._idle()
                else:  # more may be due; but let a burst of wake-ups make one round, not many
                    await asyncio.sleep(ROUND_GAP)
        finally:
            if follower:
                follower.cancel()
            await self.github.aclose()
            await self.gitlab.aclose()

    async def _follow(self) -> None:
        """Wake up when this process's worker changed something worth reporting (other
        processes' changes are found by polling)."""
        assert self.bus is not None
        subscription = self.bus.subscribe(100)
        try:
            async for message in subscription:
                event = message.get("event") or {}
                if message["type"] == "resync" or event.get("name") in WAKING_EVENTS:
                    self.wake()
        finally:
            subscription.close()

    async def _idle(self) -> None:
        timeout = self.settings.poll_seconds
        if self.holds:  # wake up when a hold ends, not at the next poll after
            timeout = max(0.0, min(timeout, min(self.holds.values()) - time.monotonic()))
        try:
            await asyncio.wait_for(self._wake.wait(), timeout)
        except TimeoutError:
            pass
        self._wake.clear()

    async def send_round(self) -> int:
        """Lease and deliver the reports due now; how many were leased. Never more than the
        pace allows (a report that would have to wait is not worth a lease)."""
        held = self.held()
        open_forges = outbox.report_to(self.settings) - held
        room = min([BATCH, *(self.pace.room(forge) for forge in open_forges)])
        if room <= 0 or (held and not open_forges):
            return 0
        if any(forge in self._outage for forge in open_forges):
            room = 1  # a forge that was failing gets one probe before a batch
        try:
            claimed = await self.db.write(
                lambda conn: outbox.claim(conn, self.owner, room, self.lease, utcnow(), held)
            )
        except Exception:
            log.exception("claiming reports failed; will try again")
            return 0
        await asyncio.gather(*(self.deliver(report) for report in claimed))
        return len(claimed)

    # -- one report ---------------------------------------------------------------------------

    async def deliver(self, report: outbox.Claimed) -> None:
        provider = report.key.split(":", 1)[0]
        targets = self.targets(provider)
        wanted = [t for t in targets if t not in report.done
                  and not (report.status == outbox.PROGRESS and t == "status")]
        if not targets or not wanted:
            note = None if targets else f"{provider} reporting is not configured"
            await self._write(outbox.settle, report.id, self.owner, list(report.done), utcnow(),
                              ReportState.sent if targets else ReportState.dead, note)
            return
        if report.status == outbox.PROGRESS and (wait := self._interim_wait(report.build_id)) > 0:
            await self._write(outbox.postpone, report.id, self.owner, utcnow() + timedelta(seconds=wait))
            return
        if (wait := self.pace.take(provider, len(wanted), low=report.status == outbox.PROGRESS)) > 0:
            await self._write(outbox.postpone, report.id, self.owner, utcnow() + timedelta(seconds=wait))
            return
        done = list(report.done)
        budget = self.lease.total_seconds() * 0.75
        try:
            async with asyncio.timeout(budget):
                rendered = await self.db.read(lambda conn: _load(conn, report.build_id, "check_run" in wanted))
                for target in wanted:
                    if provider in self.held():  # another report was told to wait meanwhile
                        wait = self.holds[provider] - time.monotonic()
                        await self._write(outbox.postpone, report.id, self.owner,
                                          utcnow() + timedelta(seconds=wait), done)
                        return
                    await self._send(target, report, rendered)
                    done.append(target)
        except TimeoutError:
            await self._refused(report, done, ReportError("network", f"no answer within {budget:.1f} s"))
        except ReportError as exc:
            await self._refused(report, done, exc)
        except Exception as exc:  # a bug here must not stop reporting: retry like a fault
            log.exception("report %s of build %s failed unexpectedly", report.id, report.build_id)
            await self._refused(report, done, ReportError("unknown", f"{type(exc).__name__}: {exc}"))
        else:
            self._outage.pop(provider, None)  # the forge answers again
            await self._write(outbox.settle, report.id, self.owner, done, utcnow())
            log.info("report %s (%s) of build %s sent to %s", report.id, report.status,
                     report.build_id, ", ".join(wanted))

    def held(self, now: float | None = None) -> frozenset[str]:
        """The forges held off now."""
        now = time.monotonic() if now is None else now
        for forge in [f for f, until in self.holds.items() if until <= now]:
            del self.holds[forge]
        return frozenset(self.holds)

    def _hold(self, forge: str, exc: ReportError, wait: float) -> None:
        """After a refusal: hold the whole forge off if it asked us to wait or is failing."""
        if exc.kind == "rate_limited":
            until = time.monotonic() + wait
        elif exc.kind in ("server", "network") and forge not in self.held():
            failures = self._outage[forge] = self._outage.get(forge, 0) + 1  # once per hold
            until = time.monotonic() + self.backoff(failures)
        else:
            return
        self.holds[forge] = max(self.holds.get(forge, 0.0), until)
        log.warning("holding off %s for %.1f s (%s)", forge, self.holds[forge] - time.monotonic(), exc.kind)

    def _interim_wait(self, build_id: int) -> float:
        last = self._last_interim.get(build_id)
        if last is None:
            return 0.0
        return last + self.settings.report_interval_seconds - time.monotonic()

    async def _send(self, target: str, report: outbox.Claimed, rendered: Rendered) -> None:
        build = rendered.build
        status = BuildStatus.running if report.status == outbox.PROGRESS else BuildStatus(report.status)
        if target == "check_run":
            await self._send_check_run(report, rendered, status)
        elif build.provider == "gitlab":
            await self._send_gitlab(build, self._status(build, status))
        else:
            await self.github.create_status(build.repo, build.sha, self._status(build, status),
                                            context_for(self.settings, build), build.installation_id)
        self.sent += 1

    def _status(self, build: Build, status: BuildStatus) -> CommitStatus:
        final = status.final
        return commit_status(build.provider, build.id, status, build.platforms,
                             build.error_kind if final else None, build.error_message if final else None,
                             self.settings.public_url)

    async def _send_gitlab(self, build: Build, status: CommitStatus) -> None:
        try:
            ref = None if build.kind == BuildKind.pull_request else build.ref
            await self.gitlab.create_status(build.repo, build.sha, status,
                                            context_for(self.settings, build), ref)
        except ReportError as exc:
            if exc.kind == "invalid" and GITLAB_SAME_STATE in str(exc):
                return  # already in this state: the status says what this report would
            raise

    async def _send_check_run(self, report: outbox.Claimed, rendered: Rendered, status: BuildStatus) -> None:
        build = rendered.build
        title = describe(status, build.platforms, build.error_kind if status.final else None,
                         build.error_message if status.final else None)
        facts = BuildFacts(build.id, build.sha, status, build.platforms, build.started_at,
                           build.finished_at, build.error_message)
        url = f"{self.settings.public_url}/builds/{build.id}"
        body = check_run_body(facts, report.status, title, rendered.events, rendered.log, url)
        await self._put_check_run(build, body, maybe_created=report.attempts > 1)
        if status.final:
            self._last_interim.pop(build.id, None)  # nothing interim follows an end
        else:
            self._last_interim[build.id] = time.monotonic()

    async def _put_check_run(self, build: Build, body: dict[str, Any], maybe_created: bool) -> None:
        """Update the build's check run, or create it (again, if GitHub lost it).

        ``maybe_created``: an earlier attempt at this report may have created the run without
        living to store its id (a crash, a timeout, an answer lost on the way); GitHub is asked
        first, by the run's ``external_id`` (the build id), so the build gets one run, not two.
        """
        if build.check_run_id is None and maybe_created:
            found = await self.github.find_check_run(build.repo, build.sha, context_for(self.settings, build),
                                                     str(build.id), build.installation_id)
            if found is not None:
                log.info("check run %s of build %s was created by an earlier attempt; updating it",
                         found["id"], build.id)
                await self.db.write(lambda conn: outbox.set_check_run(conn, build.id, found["id"]))
                build.check_run_id = found["id"]
        if build.check_run_id is not None:
            try:
                await self.github.update_check_run(build.repo, build.check_run_id, body, build.installation_id)
                return
            except ReportError as exc:
                if exc.kind != "not_found":
                    raise
                log.warning("check run %s of build %s is gone; creating a new one", build.check_run_id, build.id)
        body = {"name": context_for(self.settings, build), "head_sha": build.sha, **body}
        created = await self.github.create_check_run(build.repo, body, build.installation_id)
        # Stored at once, before anything else can fail: a retry must update this check run,
        # not create a second one.
        await self.db.write(lambda conn: outbox.set_check_run(conn, build.id, created["id"]))
        build.check_run_id = created["id"]

    async def _refused(self, report: outbox.Claimed, done: list[str], exc: ReportError) -> None:
        error = f"{exc.kind}: {exc}"
        gives_up = exc.kind == "invalid" or (
            not exc.retryable and report.attempts >= self.settings.report_max_attempts
        )
        if gives_up:
            log.error("report %s (%s) of build %s dropped after %d attempt(s): %s",
                      report.id, report.status, report.build_id, report.attempts, error)
            await self._write(outbox.settle, report.id, self.owner, done, utcnow(), ReportState.dead, error)
            return
        wait = exc.retry_after if exc.retry_after is not None else self.backoff(report.attempts)
        self._hold(report.key.split(":", 1)[0], exc, wait)
        log.warning("report %s (%s) of build %s: %s; retrying in %.1f s",
                    report.id, report.status, report.build_id, error, wait)
        await self._write(outbox.retry_at, report.id, self.owner, done,
                          utcnow() + timedelta(seconds=wait), error)

    def backoff(self, attempts: int) -> float:
        """Exponential, with full jitter on the upper half, capped."""
        s = self.settings
        ceiling = min(s.report_retry_max_seconds, s.report_retry_initial_seconds * 2 ** (attempts - 1))
        return ceiling / 2 + random.random() * ceiling / 2

    async def _write(self, fn, *args) -> None:
        held = await self.db.write(lambda conn: fn(conn, *args))
        if held is False:
            log.warning("report %s: lease lost while sending (another sender took it over)", args[0])
