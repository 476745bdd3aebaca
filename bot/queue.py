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

from sqlalchemy import Connection, bindparam, insert, or_, select, update

from bot.models import Build, BuildKind, BuildStatus, builds, deliveries
from bot.reporters import outbox


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
    #: "public" or "private" (bot.models.visibility_of_*): who may read the build on the status page.
    visibility: str = "private"


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
    #: SHA-256 (hex) of the verified body, as received; None where nobody computed it.
    body_sha256: str | None = None


@dataclass(frozen=True)
class Recorded:
    """What recording a delivery did; ``duplicate`` means an earlier delivery had this id, or
    (``duplicate_of`` names it) the same body under another id: a replay."""

    outcome: str
    reason: str | None = None
    build_id: int | None = None
    duplicate: bool = False
    superseded: list[int] = field(default_factory=list)
    cancelled: list[int] = field(default_factory=list)
    duplicate_of: str | None = None


#: Triggers that ask for a build again on purpose: a second click of Re-run (or Retry) may
#: send a byte-identical body and must build again, so their bodies are never deduped.
RERUN_TRIGGERS = frozenset({"check_run", "check_suite"})


def replay_digest(delivery: DeliveryInfo, decision: Decision) -> str | None:
    """The body digest a delivery is deduped by besides its id, or None (exempt).

    The forge's signature covers the body only, so a captured push, tag or pull/merge request
    body is valid forever; sent again under a fresh delivery id it would rebuild an old commit
    and roll its tags back. Those deliveries (builds and ref deletions) are recognised by their
    body; GitHub's own redeliveries keep both id and body, so they are recognised either way.
    """
    match decision:
        case BuildRequest(trigger=trigger) if trigger not in RERUN_TRIGGERS:
            return delivery.body_sha256
        case CancelRef():
            return delivery.body_sha256
    return None


# -- webhook side -----------------------------------------------------------------------------
#
# Deliveries are recorded a group commit at a time (bot.db.Database.write_item): a handful of
# set-based statements per batch, however many deliveries it holds, with the rules applied in
# arrival order. The statements are built once, with bind parameters, because building one
# with inline values costs SQLAlchemy more than SQLite takes to run it.


@dataclass(frozen=True)
class Incoming:
    """A verified delivery, what it asks for, and when it arrived."""

    delivery: DeliveryInfo
    decision: Decision
    platforms: list[str]
    received_at: datetime
    #: The bot reports to this delivery's forge: its build changes owe reports (bot.reporters.outbox).
    reported: bool = True


_EARLIER_DELIVERIES = select(
    deliveries.c.provider, deliveries.c.delivery_id, deliveries.c.outcome,
    deliveries.c.reason, deliveries.c.build_id, deliveries.c.body_sha256,
).where(
    # provider first: the unique indexes on (provider, delivery_id) and (provider, body_sha256)
    # answer this
    deliveries.c.provider == bindparam("provider"),
    or_(deliveries.c.delivery_id.in_(bindparam("ids", expanding=True)),
        deliveries.c.body_sha256.in_(bindparam("digests", expanding=True))),
)
_INSERT_BUILDS = insert(builds).returning(builds.c.id, sort_by_parameter_order=True)
_INSERT_DELIVERIES = insert(deliveries)
#: Unfinished builds of the refs a batch touches, locked so no worker claims them meanwhile.
#: Running ones are ended too: an older build of a ref that finished after a newer one would
#: publish older code under the ref's tags; its worker notices and stops its work.
_UNFINISHED = or_(builds.c.status == BuildStatus.queued.value, builds.c.status == BuildStatus.running.value)
_QUEUED_OF_REFS = (
    select(builds.c.id, builds.c.provider, builds.c.repo, builds.c.ref, builds.c.sha, builds.c.kind,
           builds.c.trigger, builds.c.status)
    .where(
        _UNFINISHED,
        builds.c.repo.in_(bindparam("repos", expanding=True)),
        builds.c.ref.in_(bindparam("refs", expanding=True)),
    )
    .order_by(builds.c.id)
    .with_for_update()
)
_END_BUILD = (
    update(builds)
    .where(builds.c.id == bindparam("w_id"), _UNFINISHED)
    .values(
        status=bindparam("w_status"),
        finished_at=bindparam("w_now"),
        error_message=bindparam("w_message"),
        lease_owner=None,
        lease_expires_at=None,
    )
)
_BUILD_FIELDS = (
    "provider", "repo", "clone_url", "ref", "sha", "trigger", "pr_number", "fork",
    "default_branch", "installation_id", "visibility",
)


def record_delivery(
    conn: Connection,
    delivery: DeliveryInfo,
    decision: Decision,
    platforms: list[str],
    now: datetime,
    reported: bool = True,
) -> Recorded:
    """Store one delivery and what it causes, unless it was delivered before."""
    return record_deliveries(conn, [Incoming(delivery, decision, platforms, now, reported)])[0]


def record_deliveries(conn: Connection, batch: list[Incoming]) -> list[Recorded]:
    """Store deliveries and what they cause, as if one after the other, in few statements.

    A delivery seen before (its id, or for the deliveries :func:`replay_digest` covers, its
    body) changes nothing and is not stored again: it is answered as the first one was."""
    digests = [replay_digest(i.delivery, i.decision) for i in batch]
    earlier = _earlier_deliveries(conn, batch, digests)
    firsts: dict[_Seen, int] = {}  # what this batch's fresh deliveries are recognised by
    repeats: dict[int, _Seen] = {}
    fresh: list[int] = []
    for i, incoming in enumerate(batch):
        keys = _seen_as(incoming.delivery, digests[i])
        seen = next((k for k in keys if k in earlier or k in firsts), None)
        if seen is None:
            firsts.update(dict.fromkeys(keys, i))
            fresh.append(i)
        else:
            repeats[i] = seen

    build_ids = _insert_builds(conn, [batch[i] for i in fresh])
    results = _apply_in_order(conn, batch, fresh, build_ids)
    _hide_when_private(conn, [batch[i].decision for i in fresh], min(build_ids.values(), default=None))
    if fresh:
        conn.execute(_INSERT_DELIVERIES, [_delivery_row(batch[i], results[i], digests[i]) for i in fresh])

    for i, seen in repeats.items():  # of an earlier batch, or earlier in this one
        if seen in earlier:
            original, first_id = earlier[seen]
        else:
            original, first_id = results[firsts[seen]], batch[firsts[seen]].delivery.delivery_id
        results[i] = Recorded(original.outcome, original.reason, original.build_id, duplicate=True,
                              duplicate_of=first_id if seen[0] == "body" else None)
    return [results[i] for i in range(len(batch))]


#: How a delivery is recognised again: ("id", provider, delivery id) or ("body", provider, digest).
_Seen = tuple[str, str, str]


def _seen_as(delivery: DeliveryInfo, digest: str | None) -> list[_Seen]:
    keys = [("id", delivery.provider, delivery.delivery_id)] if delivery.delivery_id is not None else []
    return keys + ([("body", delivery.provider, digest)] if digest is not None else [])


def _earlier_deliveries(
    conn: Connection, batch: list[Incoming], digests: list[str | None]
) -> dict[_Seen, tuple[Recorded, str | None]]:
    """Stored deliveries the batch repeats, each with the id of the stored delivery."""
    wanted: dict[str, set[_Seen]] = {}
    for incoming, digest in zip(batch, digests, strict=True):
        wanted.setdefault(incoming.delivery.provider, set()).update(_seen_as(incoming.delivery, digest))
    earlier: dict[_Seen, tuple[Recorded, str | None]] = {}
    for provider, keys in wanted.items():
        if not keys:
            continue
        ids = sorted(k[2] for k in keys if k[0] == "id")
        bodies = sorted(k[2] for k in keys if k[0] == "body")
        for row in conn.execute(_EARLIER_DELIVERIES, {"provider": provider, "ids": ids, "digests": bodies}):
            recorded = (Recorded(row.outcome, row.reason, row.build_id), row.delivery_id)
            for key in (("id", provider, row.delivery_id), ("body", provider, row.body_sha256)):
                if key in keys:
                    earlier[key] = recorded
    return earlier


_HIDE_REPO = (
    update(builds)
    .where(builds.c.provider == bindparam("p"), builds.c.repo == bindparam("r"),
           builds.c.visibility != "private")
    .values(visibility="private")
)
#: The newest build of a repository before this batch's (ix_builds_repo_id, one row).
_LAST_VISIBILITY = (
    select(builds.c.visibility)
    .where(builds.c.repo == bindparam("r"), builds.c.provider == bindparam("p"), builds.c.id < bindparam("before"))
    .order_by(builds.c.id.desc())
    .limit(1)
)


def _hide_when_private(conn: Connection, decisions: list[Decision], first_new: int | None) -> None:
    """A repository that went private takes its earlier builds with it: the status page must
    not keep showing their logs to anyone because they were built while it was public.

    Only when its newest earlier build is public: every private delivery before hid all that
    came before it, so then nothing is left to hide, and ingress stays one indexed row per
    private repository of the batch however many builds the repository has."""
    private = sorted({(d.provider, d.repo) for d in decisions
                      if isinstance(d, BuildRequest) and d.visibility == "private"})
    if not private or first_new is None:
        return
    went_private = [{"p": provider, "r": repo} for provider, repo in private
                    if conn.execute(_LAST_VISIBILITY, {"p": provider, "r": repo, "before": first_new}).scalar()
                    == "public"]
    if went_private:
        conn.execute(_HIDE_REPO, went_private)


def _insert_builds(conn: Connection, batch: list[Incoming]) -> dict[int, int]:
    """Insert the builds the batch asks for; map position in ``batch`` to build id."""
    wanted = [(n, i) for n, i in enumerate(batch) if isinstance(i.decision, BuildRequest)]
    if not wanted:
        return {}
    rows = conn.execute(_INSERT_BUILDS, [_build_row(i) for _, i in wanted]).all()
    return {n: row.id for (n, _), row in zip(wanted, rows, strict=True)}


def _build_row(incoming: Incoming) -> dict:
    request = incoming.decision
    assert isinstance(request, BuildRequest)
    status = BuildStatus.skipped if request.skip_reason else BuildStatus.queued
    row = {name: getattr(request, name) for name in _BUILD_FIELDS}
    row.update(
        kind=request.kind.value,
        status=status.value,
        platforms=incoming.platforms,
        created_at=incoming.received_at,
        finished_at=incoming.received_at if status.final else None,
        error_message=request.skip_reason,
        attempts=0,
    )
    return row


def _superseded_by(request: BuildRequest, unfinished: list[int],
                   facts: dict[int, tuple[str, str, str, str, str, str]]) -> tuple[list[int], list[int]]:
    """Which of a ref's unfinished builds ``request`` ends, and which it leaves: a push ends
    them all; a re-run (check run or suite, the Retry button, an admin rebuild) only earlier
    runs of its own sha. A re-run is exempt from replay dedupe, so a re-run of an old commit
    (or a replayed one) must never cancel the ref's newest build."""
    if request.trigger not in RERUN_TRIGGERS | {"rebuild"}:
        return unfinished, []
    same = [b for b in unfinished if facts[b][2] == request.sha]
    return same, [b for b in unfinished if b not in same]


def _apply_in_order(
    conn: Connection, batch: list[Incoming], fresh: list[int], build_ids: dict[int, int]
) -> dict[int, Recorded]:
    """Supersede and cancel as sequential processing would, then write the endings at once."""
    touched = [
        d for d in (batch[i].decision for i in fresh)
        if isinstance(d, CancelRef) or (isinstance(d, BuildRequest) and not d.skip_reason)
    ]
    queued: dict[tuple[str, str, str], list[int]] = {}
    facts: dict[int, tuple[str, str, str, str, str, str]] = {}  # build id -> its report key's parts, trigger
    running: list[int] = []  # ended while running: they may owe interim updates
    if touched:
        new = set(build_ids.values())  # the batch's own builds join the queue in order below
        rows = conn.execute(_QUEUED_OF_REFS, {
            "repos": sorted({d.repo for d in touched}), "refs": sorted({d.ref for d in touched}),
        })
        for row in rows:
            if row.id not in new:
                queued.setdefault((row.provider, row.repo, row.ref), []).append(row.id)
                facts[row.id] = (row.provider, row.repo, row.sha, row.kind, row.ref, row.trigger)
                if row.status == BuildStatus.running.value:
                    running.append(row.id)

    results: dict[int, Recorded] = {}
    endings: list[dict] = []
    owed: list[tuple[int, str]] = []  # reports, in the order the changes happened
    for n, i in enumerate(fresh):
        decision, now = batch[i].decision, batch[i].received_at
        owed_before = len(owed)
        if isinstance(decision, BuildRequest):
            facts[build_ids[n]] = (decision.provider, decision.repo, decision.sha, decision.kind.value,
                                   decision.ref, decision.trigger)
        match decision:
            case BuildRequest(skip_reason=str(reason)):
                owed.append((build_ids[n], BuildStatus.skipped.value))
                results[i] = Recorded("skipped", reason, build_ids[n])
            case BuildRequest():
                key = (decision.provider, decision.repo, decision.ref)
                ended, kept = _superseded_by(decision, queued.get(key, []), facts)
                queued[key] = [*kept, build_ids[n]]
                message = f"superseded by build {build_ids[n]}"
                endings += [_ending(b, BuildStatus.superseded, message, now) for b in ended]
                owed += [(b, BuildStatus.superseded.value) for b in ended]
                owed.append((build_ids[n], BuildStatus.queued.value))
                results[i] = Recorded("queued", None, build_ids[n], superseded=ended)
            case CancelRef():
                ended = queued.pop((decision.provider, decision.repo, decision.ref), [])
                endings += [_ending(b, BuildStatus.cancelled, decision.reason, now) for b in ended]
                owed += [(b, BuildStatus.cancelled.value) for b in ended]
                results[i] = Recorded("cancelled", decision.reason, cancelled=ended)
            case Ping():
                results[i] = Recorded("ping", decision.reason)
            case Ignore():
                results[i] = Recorded("ignored", decision.reason)
            case _:
                raise TypeError(f"not a decision: {decision!r}")
        if not batch[i].reported:
            del owed[owed_before:]
    if endings:
        conn.execute(_END_BUILD, endings)
    if owed:  # keyed here, from what the batch already knows (an INSERT ... SELECT per row costs double)
        outbox.owe_keyed(conn, [(b, outbox.report_key(*facts[b][:5]), status) for b, status in owed
                                if facts[b][5] != "cli"], batch[fresh[-1]].received_at, running)
    return results


def cancel(conn: Connection, build_id: int, reason: str, now: datetime, reported: bool = True) -> bool:
    """End a queued or running build as cancelled (an administrator asked); False if it had
    ended already. Its worker notices as with a supersede; its final report is owed here."""
    ended = conn.execute(_END_BUILD, _ending(build_id, BuildStatus.cancelled, reason, now)).rowcount
    if ended and reported:
        outbox.owe(conn, [(build_id, BuildStatus.cancelled.value)], now)
    return bool(ended)


def _ending(build_id: int, status: BuildStatus, message: str, now: datetime) -> dict:
    return {"w_id": build_id, "w_status": status.value, "w_now": now, "w_message": message[:2000]}


def _delivery_row(incoming: Incoming, recorded: Recorded, digest: str | None) -> dict:
    delivery = incoming.delivery
    return {
        "body_sha256": digest,
        "provider": delivery.provider,
        "delivery_id": delivery.delivery_id,
        "event": delivery.event,
        "action": delivery.action,
        "repo": delivery.repo,
        "received_at": incoming.received_at,
        "outcome": recorded.outcome,
        "reason": recorded.reason and recorded.reason[:500],
        "build_id": recorded.build_id,
    }


# -- worker side ------------------------------------------------------------------------------


def claim(
    conn: Connection, owner: str, lease: timedelta, now: datetime, build_id: int | None = None
) -> Build | None:
    """Take the oldest queued build (or build ``build_id``, if queued) for ``owner``; None
    when there is none.

    One UPDATE whose subquery picks the row: SQLite runs it under its write lock, PostgreSQL
    skips rows another worker has locked meanwhile (FOR UPDATE SKIP LOCKED), so no two
    workers ever get the same build.
    """
    candidates = select(builds.c.id).where(builds.c.status == BuildStatus.queued.value)
    if build_id is not None:
        candidates = candidates.where(builds.c.id == build_id)
    oldest = candidates.order_by(builds.c.id).limit(1).with_for_update(skip_locked=True).scalar_subquery()
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


def _held_by(owner: str, build_id: int) -> list:
    """The build is running under ``owner``'s lease (nobody took it over or ended it)."""
    return [
        builds.c.id == build_id,
        builds.c.lease_owner == owner,
        builds.c.status == BuildStatus.running.value,
    ]


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
        .where(*_held_by(owner, build_id))
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
        .where(*_held_by(owner, build_id))
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


def recover(conn: Connection, max_attempts: int, now: datetime,
            report_to: frozenset[str] = outbox.EVERY_FORGE) -> Recovered:
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
        .returning(builds.c.id, builds.c.provider)
    ).all()
    failed_ids = sorted(row.id for row in failed)
    outbox.owe(conn, [(r.id, BuildStatus.failed.value) for r in sorted(failed) if r.provider in report_to], now)
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
