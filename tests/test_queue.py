"""The queue's statements, on SQLite and PostgreSQL, with explicit times (no clock, no sleeps)."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from bot import queue
from bot.db import Database
from bot.models import BuildKind, BuildStatus, builds

T0 = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)
LEASE = timedelta(seconds=30)


def request(ref: str = "refs/heads/main", sha: str = "a" * 40, **kw) -> queue.BuildRequest:
    """A push build of a public repository (the status page shows it to anyone)."""
    return queue.BuildRequest(
        provider="github", clone_url="https://example.test/acme/app.git", ref=ref, sha=sha, kind=BuildKind.branch,
        **{"repo": "acme/app", "trigger": "push", "visibility": "public", **kw},
    )


def enqueue(db: Database, *reqs: queue.BuildRequest, at: datetime = T0) -> list[int]:
    """Record a delivery per request, received ``at`` (T0 unless a test needs the wall clock)."""
    ids = []
    for n, req in enumerate(reqs):
        info = queue.DeliveryInfo("github", f"d{len(ids)}-{n}-{req.ref}-{req.sha}-{req.trigger}", "push", None,
                                  "acme/app")
        ids.append(db.write_sync(lambda c: queue.record_delivery(c, info, req, ["linux/amd64"], at)).build_id)
    return ids


def status_of(db: Database, build_id: int) -> str:
    return db.read_sync(lambda c: c.execute(select(builds.c.status).where(builds.c.id == build_id)).scalar_one())


def test_claim_takes_the_oldest_and_sets_the_lease(db):
    first, second = enqueue(db, request(ref="refs/heads/a"), request(ref="refs/heads/b"))
    build = db.write_sync(lambda c: queue.claim(c, "w1", LEASE, T0))
    assert build.id == first and build.status == BuildStatus.running
    assert build.lease_owner == "w1" and build.lease_expires_at == T0 + LEASE
    assert build.started_at == T0 and build.attempts == 1
    assert db.write_sync(lambda c: queue.claim(c, "w2", LEASE, T0)).id == second
    assert db.write_sync(lambda c: queue.claim(c, "w3", LEASE, T0)) is None


def test_concurrent_claims_never_hand_out_a_build_twice(db_url):
    """Several processes' worth of claimers (own Database each), racing over 30 builds."""
    setup = Database(db_url)
    ids = enqueue(setup, *[request(ref=f"refs/heads/b{i}") for i in range(30)])
    setup.close()
    claimed: list[int] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def claimer(name: str) -> None:
        database = Database(db_url)
        start.wait()
        while (build := database.write_sync(lambda c: queue.claim(c, name, LEASE, T0))) is not None:
            with lock:
                claimed.append(build.id)
        database.close()

    threads = [threading.Thread(target=claimer, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(claimed) == ids


def test_renew_extends_only_held_leases(db):
    a, b = enqueue(db, request(ref="refs/heads/a"), request(ref="refs/heads/b"))
    db.write_sync(lambda c: queue.claim(c, "w1", LEASE, T0))
    db.write_sync(lambda c: queue.claim(c, "w2", LEASE, T0))
    later = T0 + timedelta(seconds=10)
    held = db.write_sync(lambda c: queue.renew(c, "w1", [a, b], LEASE, later))
    assert held == {a}
    expires = db.read_sync(lambda c: c.execute(select(builds.c.lease_expires_at).where(builds.c.id == a)).scalar_one())
    assert expires == later + LEASE


def test_recover_requeues_expired_then_fails_after_max_attempts(db):
    (build_id,) = enqueue(db, request())
    now = T0
    for attempt in (1, 2):
        assert db.write_sync(lambda c: queue.claim(c, "dead", LEASE, now)).attempts == attempt
        # not yet expired: nothing happens
        assert db.write_sync(lambda c: queue.recover(c, 2, now + LEASE)) == queue.Recovered([], [])
        now = now + LEASE + timedelta(seconds=1)
        result = db.write_sync(lambda c: queue.recover(c, 2, now))
        if attempt == 1:
            assert result == queue.Recovered([build_id], [])
            assert status_of(db, build_id) == "queued"
    assert result == queue.Recovered([], [build_id])
    row = db.read_sync(lambda c: c.execute(select(builds).where(builds.c.id == build_id)).one())
    assert row.status == "failed" and row.error_kind == "lease_expired"
    assert "2 time(s)" in row.error_message and row.lease_owner is None and row.finished_at == now


def test_finish_only_by_the_holder(db):
    (build_id,) = enqueue(db, request())
    db.write_sync(lambda c: queue.claim(c, "w1", LEASE, T0))
    assert not db.write_sync(lambda c: queue.finish(c, build_id, "w2", BuildStatus.succeeded, T0))
    assert db.write_sync(
        lambda c: queue.finish(c, build_id, "w1", BuildStatus.failed, T0, "network", "reset")
    )
    row = db.read_sync(lambda c: c.execute(select(builds).where(builds.c.id == build_id)).one())
    assert (row.status, row.error_kind, row.error_message, row.lease_owner) == ("failed", "network", "reset", None)
    # finished builds cannot be finished again
    assert not db.write_sync(lambda c: queue.finish(c, build_id, "w1", BuildStatus.succeeded, T0))


def test_release_gives_the_build_back_without_counting_the_attempt(db):
    (build_id,) = enqueue(db, request())
    db.write_sync(lambda c: queue.claim(c, "w1", LEASE, T0))
    assert db.write_sync(lambda c: queue.release(c, build_id, "w1"))
    row = db.read_sync(lambda c: c.execute(select(builds).where(builds.c.id == build_id)).one())
    assert (row.status, row.attempts, row.started_at, row.lease_owner) == ("queued", 0, None, None)


@pytest.mark.parametrize("trigger", ["check_run", "check_suite", "rebuild"])
def test_a_rerun_ends_only_earlier_runs_of_its_own_sha(db, trigger):
    """Re-runs are exempt from replay dedupe (each click builds), so a captured or late re-run of
    an old commit must not cancel the ref's newest build: it ends only runs of its own sha."""
    old, newest = enqueue(db, request(sha="1" * 40), request(sha="2" * 40))
    assert status_of(db, old) == "superseded"
    rerun_new, = enqueue(db, request(sha="2" * 40, trigger=trigger))
    rerun_old, = enqueue(db, request(sha="1" * 40, trigger=trigger))
    assert [status_of(db, i) for i in (newest, rerun_new, rerun_old)] == ["superseded", "queued", "queued"]
    push, = enqueue(db, request(sha="3" * 40))  # a push still ends every unfinished build of the ref
    assert [status_of(db, i) for i in (rerun_new, rerun_old, push)] == ["superseded", "superseded", "queued"]


def test_supersede_ends_queued_and_running_builds_of_the_ref(db):
    first, = enqueue(db, request(sha="1" * 40))
    db.write_sync(lambda c: queue.claim(c, "w1", LEASE, T0))  # first is now running
    finished, = enqueue(db, request(ref="refs/heads/other", sha="9" * 40))
    db.write_sync(lambda c: queue.claim(c, "w1", LEASE, T0))
    db.write_sync(lambda c: queue.finish(c, finished, "w1", queue.BuildStatus.succeeded, T0))
    second, = enqueue(db, request(sha="2" * 40))
    third, = enqueue(db, request(sha="3" * 40))
    assert [status_of(db, i) for i in (first, second, third)] == ["superseded", "superseded", "queued"]
    row = db.read_sync(lambda c: c.execute(select(builds).where(builds.c.id == first)).one())
    assert row.lease_owner is None and row.error_message == f"superseded by build {second}"
    # the worker holding it no longer does: its renewal tells it to stop
    assert db.write_sync(lambda c: queue.renew(c, "w1", [first], LEASE, T0)) == set()
    assert status_of(db, finished) == "succeeded"  # finished builds are never touched


def test_queue_depth(db):
    enqueue(db, request(ref="refs/heads/a"), request(ref="refs/heads/b"), request(skip_reason="[skip ci]"))
    assert db.read_sync(queue.queue_depth) == 2


def _random_stream(seed: int, length: int = 40) -> list[queue.Incoming]:
    """Pushes, deletions, skips, pings, redeliveries and replays (the same body under another
    id) over a few refs, in random order."""
    import random

    rng = random.Random(seed)
    stream = []
    for n in range(length):
        ref = rng.choice(["refs/heads/a", "refs/heads/b", "refs/tags/v1"])
        roll = rng.random()
        if roll < 0.55:
            decision = request(ref=ref, sha=f"{n:040x}")
        elif roll < 0.65:
            decision = request(ref=ref, sha=f"{n:040x}", skip_reason="[skip ci] in the head commit message")
        elif roll < 0.8:
            decision = queue.CancelRef("github", "acme/app", ref, "branch deleted")
        elif roll < 0.9:
            decision = queue.Ping()
        else:
            decision = queue.Ignore("event 'x' does not build")
        delivery_id = rng.choice([f"id-{n}", f"id-{n}", f"id-{rng.randrange(max(n, 1))}", None])
        body = rng.choice([f"{n:064x}", f"{n:064x}", f"{rng.randrange(max(n, 1)):064x}"])
        info = queue.DeliveryInfo("github", delivery_id, "push", None, "acme/app", body)
        stream.append(queue.Incoming(info, decision, ["linux/amd64"], T0 + timedelta(seconds=n)))
    return stream


def _snapshot(db: Database):
    from bot.models import deliveries

    def read(conn):
        b = [tuple(r) for r in conn.execute(
            select(builds.c.id, builds.c.ref, builds.c.sha, builds.c.status, builds.c.error_message).order_by(builds.c.id))]
        d = [tuple(r) for r in conn.execute(
            select(deliveries.c.delivery_id, deliveries.c.outcome, deliveries.c.build_id).order_by(deliveries.c.id))]
        return b, d
    return db.read_sync(read)


def _reset(url: str) -> None:
    """Empty the tables; ids start again at 1 on both databases."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        if url.startswith("sqlite"):
            for table in ("build_logs", "telemetry_events", "deliveries", "builds"):
                conn.execute(text(f"DELETE FROM {table}"))
        else:
            conn.execute(text("TRUNCATE build_logs, telemetry_events, deliveries, builds RESTART IDENTITY CASCADE"))
    engine.dispose()


def test_a_batch_records_exactly_what_one_by_one_would(db):
    """Group commits must not change the rules: supersede, cancel, skip and dedupe in order."""
    for seed in range(6):
        stream = _random_stream(seed)
        got = db.write_sync(lambda c: queue.record_deliveries(c, stream))
        got_state = _snapshot(db)
        _reset(db.url)
        want = [db.write_sync(lambda c, i=i: queue.record_deliveries(c, [i]))[0] for i in stream]
        assert got == want, f"seed {seed}"
        assert got_state == _snapshot(db), f"seed {seed}"
        assert any(r.duplicate for r in got) and any(r.superseded for r in got)
        assert any(r.duplicate_of for r in got) and any(r.duplicate and not r.duplicate_of for r in got)
        assert any(r.cancelled for r in got) and any(r.outcome == "skipped" for r in got)
        _reset(db.url)


def test_claim_locks_with_skip_locked_on_postgresql(db):
    """The claim is one UPDATE whose subquery skips rows other workers hold (PostgreSQL)."""
    from sqlalchemy import event

    statements: list[str] = []
    event.listen(db.writer_engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *args: statements.append(statement))
    enqueue(db, request())
    db.write_sync(lambda c: queue.claim(c, "w1", LEASE, T0))
    claim_sql = next(s for s in statements if s.lstrip().upper().startswith("UPDATE BUILDS"))
    if db.is_sqlite:  # SQLite serialises writers with its lock (BEGIN IMMEDIATE) instead
        assert "FOR UPDATE" not in claim_sql
        assert "BEGIN IMMEDIATE" in statements
    else:
        assert "FOR UPDATE SKIP LOCKED" in claim_sql


def test_a_repository_that_went_private_takes_its_earlier_builds_with_it(db):
    """Built while public, its logs must not stay readable by anyone once it is private."""
    public, = enqueue(db, request(sha="1" * 40))
    other, = enqueue(db, request(sha="2" * 40, repo="acme/other"))
    enqueue(db, request(sha="3" * 40, visibility="private"))

    def visibility(build_id: int) -> str:
        return db.read_sync(lambda c: c.execute(select(builds.c.visibility).where(builds.c.id == build_id)).scalar_one())

    assert (visibility(public), visibility(other)) == ("private", "public")


def test_a_repository_that_went_private_again_hides_what_it_built_while_public(db):
    """Only the newest earlier build is looked at (one indexed row on the hot path), so the
    rule must hold across flips: public, private, public again, then private."""
    def visibility(build_id: int) -> str:
        return db.read_sync(lambda c: c.execute(select(builds.c.visibility).where(builds.c.id == build_id)).scalar_one())

    first, = enqueue(db, request(sha="1" * 40))
    enqueue(db, request(sha="2" * 40, visibility="private"))
    public_again, = enqueue(db, request(sha="3" * 40))
    assert (visibility(first), visibility(public_again)) == ("private", "public")
    enqueue(db, request(sha="4" * 40, visibility="private"))
    assert visibility(public_again) == "private"
