"""The outbox: reports a build owes its forge, stored in the transaction that changes the build.

Whoever changes a build (ingress queuing, skipping, superseding or cancelling it; the worker
starting or finishing it; lease recovery failing it) calls :func:`owe` on the same connection,
so the change and the promise to report it commit together or not at all. The sender
(bot.reporters.sender) then delivers the rows: per ``key`` (forge, repository, commit, context, ref)
strictly in id order, one at a time, under a lease, so several bot processes can send without
ever reordering or doubling a report.

Like bot.queue, every function takes a ``Connection`` inside a transaction and the time.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (JSON, Connection, Insert, and_, bindparam, case, delete, exists, insert, literal, or_, select,
                        update)
from sqlalchemy.orm import aliased

from bot.models import ReportState, UTCDateTime, builds, reports
from bot.settings import Settings

#: The report of an interim check-run update, next to the build statuses.
PROGRESS = "progress"
#: Telemetry that changes what a running build's check run shows (bot.telemetry.Telemetry.emit
#: owes a progress report with each; the sender coalesces them).
PROGRESS_EVENTS = frozenset({
    "fetch_succeeded", "build_platform_succeeded", "build_platform_failed", "build_platform_retry", "push_retry",
    "push_succeeded", "push_failed", "auth_refresh_succeeded", "auth_refresh_failed",
    "manifest_published", "manifest_failed",
})

#: What orders reports: statuses of one commit and context replace each other on the forge,
#: so they must arrive in the order they were written. A pull request's build reports under
#: its own context (as GitHub Actions' "(pull_request)" checks do): a push and a pull request
#: of one commit are two builds, and one must not overwrite the other's status. The ref ends
#: the key: a branch build and a tag build of one commit are two builds too (GitLab keeps a
#: status per ref), and neither's reports wait behind the other's.
REPORT_KEY = (
    builds.c.provider + ":" + builds.c.repo + "@" + builds.c.sha + "#"
    + case((builds.c.kind == "pull_request", "pull_request"), else_="push") + ":" + builds.c.ref
)

@functools.cache
def _owe_statement(forges: frozenset[str] | None = None) -> Insert:
    """INSERT ... SELECT: a report row for a build, keyed from the build's own columns (built
    once per forge set: building statements costs more than SQLite takes to run them)."""
    where = [builds.c.id == bindparam("r_build"), builds.c.trigger != "cli"]
    if forges is not None:
        where.append(builds.c.provider.in_(sorted(forges)))
    return insert(reports).from_select(
        ["build_id", "key", "status", "state", "created_at", "next_attempt_at", "attempts", "done"],
        select(
            builds.c.id,
            REPORT_KEY,
            bindparam("r_status"),
            literal(ReportState.pending.value),
            bindparam("r_now", type_=UTCDateTime()),
            bindparam("r_now", type_=UTCDateTime()),
            literal(0),
            bindparam("r_done", type_=JSON()),
        ).where(*where),
    )


#: Every forge: what tests and callers that do not filter pass.
EVERY_FORGE = frozenset({"github", "gitlab"})


def report_to(settings: Settings) -> frozenset[str]:
    """The forges this bot can report to. Builds of other forges owe no reports: nothing
    would ever send them, and writing them would cost every delivery a statement."""
    forges = set()
    if settings.github_token is not None or settings.github_app_id is not None:
        forges.add("github")
    if settings.gitlab_api_token is not None:
        forges.add("gitlab")
    return frozenset(forges)


def report_key(provider: str, repo: str, sha: str, kind: str, ref: str) -> str:
    """:data:`REPORT_KEY`, for a build whose columns are at hand."""
    return f"{provider}:{repo}@{sha}#{'pull_request' if kind == 'pull_request' else 'push'}:{ref}"


def progress_to(settings: Settings) -> frozenset[str]:
    """The forges that show interim progress: only GitHub check runs (App mode) do."""
    return frozenset({"github"}) if settings.github_app_id is not None else frozenset()


def _coalesce(conn: Connection, build_ids: list[int], now: datetime) -> None:
    """A newer report of a build shows at least what its unsent interim updates would: those
    are coalesced (not sent). One in flight (leased) is left to finish."""
    if build_ids:
        conn.execute(
            update(reports)
            .where(reports.c.build_id.in_(sorted(set(build_ids))), reports.c.status == PROGRESS,
                   reports.c.state == ReportState.pending.value, _free(now))
            .values(state=ReportState.coalesced.value, sent_at=now)
        )


def owe(conn: Connection, changes: list[tuple[int, str]], now: datetime) -> None:
    """Owe a report of each ``(build id, status)``, in list order.

    Builds started from the command line (trigger ``cli``) report nowhere: nobody pushed.
    """
    if changes:
        _coalesce(conn, [b for b, _ in changes], now)
        conn.execute(_owe_statement(), [{"r_build": b, "r_status": s, "r_now": now, "r_done": []}
                                        for b, s in changes])


def owe_keyed(conn: Connection, changes: list[tuple[int, str, str]], now: datetime,
              were_running: list[int]) -> None:
    """:func:`owe`, for ``(build id, key, status)`` whose key the caller made (report_key);
    ``were_running``: the builds among them that may have owed interim updates."""
    if changes:
        _coalesce(conn, were_running, now)
        pending = ReportState.pending.value
        conn.execute(insert(reports), [
            {"build_id": b, "key": key, "status": status, "state": pending, "created_at": now,
             "next_attempt_at": now, "attempts": 0, "done": []}
            for b, key, status in changes
        ])


def owe_progress(conn: Connection, build_id: int, now: datetime, forges: frozenset[str]) -> None:
    """Owe an interim update of a running build, if its forge shows them (``forges``)."""
    if forges:
        _coalesce(conn, [build_id], now)
        conn.execute(_owe_statement(forges), {"r_build": build_id, "r_status": PROGRESS, "r_now": now, "r_done": []})


@dataclass(frozen=True)
class Claimed:
    id: int
    build_id: int
    key: str
    status: str
    attempts: int
    done: tuple[str, ...]


def _free(now: datetime):
    return or_(reports.c.lease_expires_at.is_(None), reports.c.lease_expires_at < now)


_NOW = bindparam("now", type_=UTCDateTime())
_EARLIER = aliased(reports)


@functools.cache
def _heads(skip: frozenset[str]):
    """The reports due now whose key has nothing pending before them, of every forge but
    ``skip`` (built once per set: an aliased statement built per call is compiled per call,
    which cost more than running it)."""
    return (
        select(reports.c.id)
        .where(
            reports.c.state == ReportState.pending.value,
            reports.c.next_attempt_at <= _NOW,
            or_(reports.c.lease_expires_at.is_(None), reports.c.lease_expires_at < _NOW),
            *(~reports.c.key.startswith(f"{forge}:", autoescape=True) for forge in sorted(skip)),
            ~exists().where(
                _EARLIER.c.key == reports.c.key,
                _EARLIER.c.state == ReportState.pending.value,
                _EARLIER.c.id < reports.c.id,
            ),
        )
        .order_by(reports.c.id)
        .limit(bindparam("limit"))
        .with_for_update(skip_locked=True)
    )


def claim(conn: Connection, owner: str, limit: int, lease: timedelta, now: datetime,
          skip: frozenset[str] = frozenset()) -> list[Claimed]:
    """Lease up to ``limit`` reports that are due and first in line for their key, of every
    forge but those in ``skip`` (the ones the sender is holding off)."""
    heads = conn.execute(_heads(frozenset(skip)), {"now": now, "limit": limit})
    ids = [row.id for row in heads]
    if not ids:
        return []
    rows = conn.execute(
        update(reports)
        .where(reports.c.id.in_(ids))
        .values(lease_owner=owner, lease_expires_at=now + lease, attempts=reports.c.attempts + 1)
        .returning(reports.c.id, reports.c.build_id, reports.c.key, reports.c.status,
                   reports.c.attempts, reports.c.done)
    )
    claimed = [Claimed(r.id, r.build_id, r.key, r.status, r.attempts, tuple(r.done)) for r in rows]
    return sorted(claimed, key=lambda c: c.id)


def _held(report_id: int, owner: str):
    return and_(reports.c.id == report_id, reports.c.lease_owner == owner,
                reports.c.state == ReportState.pending.value)


def _end_lease(conn: Connection, report_id: int, owner: str, **values) -> bool:
    row = conn.execute(
        update(reports).where(_held(report_id, owner))
        .values(lease_owner=None, lease_expires_at=None, **values)
        .returning(reports.c.id)
    ).first()
    return row is not None


def settle(conn: Connection, report_id: int, owner: str, done: list[str], now: datetime,
           state: ReportState = ReportState.sent, note: str | None = None) -> bool:
    """The report is over: delivered to every target (or ``state`` says otherwise)."""
    return _end_lease(conn, report_id, owner, state=state.value, done=done, sent_at=now,
                      last_error=note and note[:500])


def retry_at(conn: Connection, report_id: int, owner: str, done: list[str], when: datetime,
             error: str) -> bool:
    """Try again at ``when``, keeping the targets that took it already."""
    return _end_lease(conn, report_id, owner, done=done, next_attempt_at=when, last_error=error[:500])


def postpone(conn: Connection, report_id: int, owner: str, when: datetime, done: list[str] | None = None) -> bool:
    """Not yet (an interim update too soon after the last, the pace, a forge held off): not a
    failed attempt. ``done``: the targets that took it meanwhile, if any did."""
    values = {} if done is None else {"done": done}
    return _end_lease(conn, report_id, owner, next_attempt_at=when, attempts=reports.c.attempts - 1, **values)


def set_check_run(conn: Connection, build_id: int, check_run_id: int | None) -> None:
    conn.execute(update(builds).where(builds.c.id == build_id).values(check_run_id=check_run_id))


def prune(conn: Connection, ended_before: datetime, limit: int = 1000) -> int:
    """Delete up to ``limit`` reports that ended before ``ended_before``; how many went.

    In batches, so that on SQLite (one writer) a large backlog never holds the write lock long
    enough to delay a webhook."""
    doomed = (
        select(reports.c.id)
        .where(reports.c.state != ReportState.pending.value, reports.c.sent_at < ended_before)
        .order_by(reports.c.id)
        .limit(limit)
        .scalar_subquery()
    )
    return conn.execute(delete(reports).where(reports.c.id.in_(doomed))).rowcount


def reports_of(conn: Connection, build_id: int) -> list[dict[str, Any]]:
    """What a build owed its forge and what became of each report, in order (the API and the
    dashboard show it: "why is my commit still pending?")."""
    rows = conn.execute(select(reports).where(reports.c.build_id == build_id).order_by(reports.c.id))
    return [
        {
            "id": r.id, "status": r.status, "state": r.state, "attempts": r.attempts, "targets": list(r.done),
            "created_at": _iso(r.created_at), "sent_at": _iso(r.sent_at),
            "next_attempt_at": _iso(r.next_attempt_at) if r.state == ReportState.pending.value else None,
            "last_error": r.last_error,
        }
        for r in rows
    ]


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat().replace("+00:00", "Z")


def pending_count(conn: Connection) -> int:
    from sqlalchemy import func

    return conn.execute(
        select(func.count()).select_from(reports).where(reports.c.state == ReportState.pending.value)
    ).scalar_one()
