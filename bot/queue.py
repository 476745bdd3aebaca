"""The durable build queue: builds are rows, and every change to one is a single statement.

The webhook side records a delivery and the build it causes in one transaction
(:func:`record_delivery`); the worker side claims the oldest queued build atomically
(:func:`claim`), holds it with a lease it renews (:func:`renew`), and finishes it
(:func:`finish`). Builds held by a worker that died are found by their expired lease and queued
again, a bounded number of times (:func:`recover`). All functions take a ``Connection`` inside
a transaction (see ``bot.db.Database.write``) and the current time, so they are deterministic
and tested without a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import Connection, insert, select, update

from bot.models import Build, BuildKind, BuildStatus, builds, deliveries


# -- what a webhook can ask for (pure values; see bot.webhooks) -------------------------------


@dataclass(frozen=True)
class BuildRequest:
    """Build ``sha`` of ``repo``; ``skip_reason`` set means: record it as skipped."""

    provider: str
    repo: str
    clone_url: str
    ref: str
    sha: str
    kind: BuildKind
    trigger: str
    pr_number: int | None = None
    fork: bool = False
    default_branch: str | None = None
    installation_id: int | None = None
    skip_reason: str | None = None


@dataclass(frozen=True)
class CancelRef:
    """Cancel the queued builds of ``ref`` (the branch or tag was deleted)."""

    provider: str
    repo: str
    ref: str
    reason: str


@dataclass(frozen=True)
class Ignore:
    """Nothing to build; ``reason`` tells the sender why."""

    reason: str


@dataclass(frozen=True)
class Ping:
    reason: str = "pong"


Decision = BuildRequest | CancelRef | Ignore | Ping


@dataclass(frozen=True)
class DeliveryInfo:
    provider: str
    delivery_id: str | None
    event: str
    action: str | None
    repo: str | None


@dataclass(frozen=True)
class Recorded:
    """What recording a delivery did; ``duplicate`` means an earlier delivery had this id."""

    outcome: str
    reason: str | None = None
    build_id: int | None = None
    duplicate: bool = False
    superseded: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)


# -- webhook side -----------------------------------------------------------------------------


def record_delivery(
    conn: Connection,
    delivery: DeliveryInfo,
    decision: Decision,
    platforms: list[str],
    now: datetime,
) -> Recorded:
    """Store the delivery and what it causes, unless it was delivered before."""
    if delivery.delivery_id is not None:
        earlier = conn.execute(
            select(deliveries.c.outcome, deliveries.c.reason, deliveries.c.build_id).where(
                deliveries.c.provider == delivery.provider,
                deliveries.c.delivery_id == delivery.delivery_id,
            )
        ).first()
        if earlier is not None:
            return Recorded(earlier.outcome, earlier.reason, earlier.build_id, duplicate=True)

    recorded = _apply(conn, decision, platforms, now)
    conn.execute(
        insert(deliveries).values(
            provider=delivery.provider,
            delivery_id=delivery.delivery_id,
            event=delivery.event,
            action=delivery.action,
            repo=delivery.repo,
            received_at=now,
            outcome=recorded.outcome,
            reason=recorded.reason and recorded.reason[:500],
            build_id=recorded.build_id,
        )
    )
    return recorded


def _apply(conn: Connection, decision: Decision, platforms: list[str], now: datetime) -> Recorded:
    match decision:
        case BuildRequest(skip_reason=str(reason)):
            build_id = _insert_build(conn, decision, platforms, BuildStatus.skipped, now)
            return Recorded("skipped", reason, build_id)
        case BuildRequest():
            build_id = _insert_build(conn, decision, platforms, BuildStatus.queued, now)
            superseded = _end_queued(
                conn, decision.provider, decision.repo, decision.ref, BuildStatus.superseded,
                f"superseded by build {build_id}", now, except_id=build_id,
            )
            return Recorded("queued", None, build_id, superseded=superseded)
        case CancelRef():
            cancelled = _end_queued(
                conn, decision.provider, decision.repo, decision.ref, BuildStatus.cancelled,
                decision.reason, now,
            )
            return Recorded("cancelled", decision.reason, cancelled=cancelled)
        case Ping():
            return Recorded("ping", decision.reason)
        case Ignore():
            return Recorded("ignored", decision.reason)
    raise TypeError(f"not a decision: {decision!r}")


def _insert_build(
    conn: Connection, request: BuildRequest, platforms: list[str], status: BuildStatus,
    now: datetime,
) -> int:
    values = {
        name: getattr(request, name)
        for name in (
            "provider", "repo", "clone_url", "ref", "sha", "kind", "trigger", "pr_number",
            "fork", "default_branch", "installation_id",
        )
    }
    values["kind"] = request.kind.value
    return conn.execute(
        insert(builds)
        .values(
            **values,
            status=status.value,
            platforms=platforms,
            created_at=now,
            finished_at=now if status.final else None,
            error_message=request.skip_reason,
        )
        .returning(builds.c.id)
    ).scalar_one()


def _end_queued(
    conn: Connection, provider: str, repo: str, ref: str, status: BuildStatus, message: str,
    now: datetime, except_id: int | None = None,
) -> list[int]:
    condition = [
        builds.c.provider == provider,
        builds.c.repo == repo,
        builds.c.ref == ref,
        builds.c.status == BuildStatus.queued.value,
    ]
    if except_id is not None:
        condition.append(builds.c.id != except_id)
    rows = conn.execute(
        update(builds)
        .where(*condition)
        .values(status=status.value, finished_at=now, error_message=message[:2000])
        .returning(builds.c.id)
    )
    return sorted(row.id for row in rows)


# -- worker side ------------------------------------------------------------------------------


def claim(conn: Connection, owner: str, lease: timedelta, now: datetime) -> Build | None:
    """Take the oldest queued build for ``owner``, or None when the queue is empty.

    One UPDATE whose subquery picks the row: SQLite runs it under its write lock, PostgreSQL
    skips rows another worker has locked meanwhile (FOR UPDATE SKIP LOCKED), so no two
    workers ever get the same build.
    """
    oldest = (
        select(builds.c.id)
        .where(builds.c.status == BuildStatus.queued.value)
        .order_by(builds.c.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    row = conn.execute(
        update(builds)
        .where(builds.c.id == oldest, builds.c.status == BuildStatus.queued.value)
        .values(
            status=BuildStatus.running.value,
            lease_owner=owner,
            lease_expires_at=now + lease,
            started_at=now,
            attempts=builds.c.attempts + 1,
        )
        .returning(*builds.c)
    ).first()
    return None if row is None else Build.model_validate(row._asdict())


def renew(
    conn: Connection, owner: str, build_ids: list[int], lease: timedelta, now: datetime
) -> set[int]:
    """Extend the leases ``owner`` still holds; return the ids it still holds."""
    if not build_ids:
        return set()
    rows = conn.execute(
        update(builds)
        .where(
            builds.c.id.in_(build_ids),
            builds.c.lease_owner == owner,
            builds.c.status == BuildStatus.running.value,
        )
        .values(lease_expires_at=now + lease)
        .returning(builds.c.id)
    )
    return {row.id for row in rows}


def finish(
    conn: Connection,
    build_id: int,
    owner: str,
    status: BuildStatus,
    now: datetime,
    error_kind: str | None = None,
    error_message: str | None = None,
) -> bool:
    """Record the end of a build ``owner`` holds; False if it no longer holds it."""
    assert status.final, status
    row = conn.execute(
        update(builds)
        .where(
            builds.c.id == build_id,
            builds.c.lease_owner == owner,
            builds.c.status == BuildStatus.running.value,
        )
        .values(
            status=status.value,
            finished_at=now,
            error_kind=error_kind,
            error_message=error_message and error_message[:2000],
            lease_owner=None,
            lease_expires_at=None,
        )
        .returning(builds.c.id)
    ).first()
    return row is not None


def release(conn: Connection, build_id: int, owner: str) -> bool:
    """Give a build back to the queue (graceful shutdown); the attempt does not count."""
    row = conn.execute(
        update(builds)
        .where(
            builds.c.id == build_id,
            builds.c.lease_owner == owner,
            builds.c.status == BuildStatus.running.value,
        )
        .values(
            status=BuildStatus.queued.value,
            attempts=builds.c.attempts - 1,
            started_at=None,
            lease_owner=None,
            lease_expires_at=None,
        )
        .returning(builds.c.id)
    ).first()
    return row is not None


@dataclass(frozen=True)
class Recovered:
    requeued: list[int]
    failed: list[int]


def recover(conn: Connection, max_attempts: int, now: datetime) -> Recovered:
    """Queue again the builds whose worker stopped renewing; fail those out of attempts."""
    expired = [
        builds.c.status == BuildStatus.running.value,
        builds.c.lease_expires_at < now,
    ]
    failed = conn.execute(
        update(builds)
        .where(*expired, builds.c.attempts >= max_attempts)
        .values(
            status=BuildStatus.failed.value,
            finished_at=now,
            error_kind="lease_expired",
            error_message=(
                f"the worker running this build stopped answering {max_attempts} time(s); "
                "giving up"
            ),
            lease_owner=None,
            lease_expires_at=None,
        )
        .returning(builds.c.id)
    )
    failed_ids = sorted(row.id for row in failed)
    requeued = conn.execute(
        update(builds)
        .where(*expired, builds.c.attempts < max_attempts)
        .values(status=BuildStatus.queued.value, lease_owner=None, lease_expires_at=None)
        .returning(builds.c.id)
    )
    return Recovered(sorted(row.id for row in requeued), failed_ids)


def queue_depth(conn: Connection) -> int:
    from sqlalchemy import func

    return conn.execute(
        select(func.count()).select_from(builds).where(builds.c.status == BuildStatus.queued.value)
    ).scalar_one()
