"""The outbox: every build change owes its report in the same transaction, and reports of one
commit and context leave strictly one at a time, in order (SQLite and PostgreSQL)."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy import select

from bot import queue
from bot.models import BuildKind, BuildStatus, ReportState, builds, reports, utcnow
from bot.reporters import outbox
from bot.worker import BuildOutcome, _claim_up_to, _finish

SHA_A = "a" * 40
SHA_B = "b" * 40
LEASE = timedelta(seconds=60)


def request(sha=SHA_A, ref="refs/heads/main", kind=BuildKind.branch, trigger="push", **kw) -> queue.BuildRequest:
    return queue.BuildRequest(provider="github", repo="acme/app", clone_url="https://git.example/acme/app.git",
                              ref=ref, sha=sha, kind=kind, trigger=trigger, **kw)


def deliver(db, decision, delivery_id=None) -> queue.Recorded:
    import uuid

    info = queue.DeliveryInfo("github", delivery_id or uuid.uuid4().hex, "push", None, "acme/app")
    return db.write_sync(lambda c: queue.record_delivery(c, info, decision, ["linux/amd64"], utcnow()))


def owed(db) -> list[tuple[int, str, str]]:
    rows = db.read_sync(lambda c: c.execute(select(reports).order_by(reports.c.id)).all())
    return [(r.build_id, r.status, r.key) for r in rows]


def claim(db, owner="s1", limit=10, now=None):
    return db.write_sync(lambda c: outbox.claim(c, owner, limit, LEASE, now or utcnow()))


def settle(db, report, owner="s1"):
    assert db.write_sync(lambda c: outbox.settle(c, report.id, owner, ["status"], utcnow()))


def test_a_queued_build_owes_a_report_keyed_by_commit_and_context(db):
    push = deliver(db, request())
    pr = deliver(db, request(ref="refs/pull/7/head", kind=BuildKind.pull_request, pr_number=7))
    assert owed(db) == [
        (push.build_id, "queued", f"github:acme/app@{SHA_A}#push:refs/heads/main"),
        (pr.build_id, "queued", f"github:acme/app@{SHA_A}#pull_request:refs/pull/7/head"),
    ]


def test_a_branch_build_and_a_tag_build_of_one_commit_are_keyed_apart(db):
    """A tag pushed at a branch's head is a second build of the same commit: its reports are
    its own, and neither build's wait behind the other's."""
    branch = deliver(db, request())
    tag = deliver(db, request(ref="refs/tags/v1.0.0", kind=BuildKind.tag))
    keys = {build: key for build, _, key in owed(db)}
    assert keys[branch.build_id] != keys[tag.build_id]
    assert keys[tag.build_id] == f"github:acme/app@{SHA_A}#push:refs/tags/v1.0.0"
    assert sorted(h.build_id for h in claim(db)) == [branch.build_id, tag.build_id]  # both first in line


def test_superseding_owes_the_old_builds_end_before_the_new_builds_start(db):
    first = deliver(db, request(sha=SHA_A))
    second = deliver(db, request(sha=SHA_B))
    third = deliver(db, request(sha=SHA_A))  # the same commit again, e.g. a re-run
    assert [(b, s) for b, s, _ in owed(db)] == [
        (first.build_id, "queued"), (first.build_id, "superseded"),
        (second.build_id, "queued"), (second.build_id, "superseded"), (third.build_id, "queued"),
    ]


def test_skipped_cancelled_and_lease_expired_builds_owe_their_final_report(db):
    skipped = deliver(db, request(skip_reason="[skip ci] in the head commit message"))
    queued = deliver(db, request(ref="refs/heads/topic"))
    deliver(db, queue.CancelRef("github", "acme/app", "refs/heads/topic", "branch deleted"))
    stuck = deliver(db, request(ref="refs/heads/other"))
    db.write_sync(lambda c: _claim_up_to(c, "dead-worker", 1, timedelta(seconds=-1)))
    db.write_sync(lambda c: queue.recover(c, max_attempts=1, now=utcnow()))
    assert [(b, s) for b, s, _ in owed(db)] == [
        (skipped.build_id, "skipped"), (queued.build_id, "queued"), (queued.build_id, "cancelled"),
        (stuck.build_id, "queued"), (stuck.build_id, "running"), (stuck.build_id, "failed"),
    ]


def test_the_worker_owes_start_and_end_in_its_own_transactions(db):
    recorded = deliver(db, request())
    [(build, _event)] = db.write_sync(lambda c: _claim_up_to(c, "w", 1, LEASE))
    ended = db.write_sync(lambda c: _finish(c, build, "w", BuildOutcome(BuildStatus.succeeded), time.monotonic()))
    assert ended is not None
    # the end of a build the worker no longer holds owes nothing more
    assert db.write_sync(lambda c: _finish(c, build, "w", BuildOutcome(BuildStatus.failed), time.monotonic())) is None
    assert [s for _, s, _ in owed(db)] == ["queued", "running", "succeeded"]
    assert {b for b, _, _ in owed(db)} == {recorded.build_id}


def test_command_line_builds_report_nowhere(db):
    deliver(db, request(trigger="cli"))
    assert owed(db) == []


def test_one_report_per_key_at_a_time_in_order(db):
    first = deliver(db, request(sha=SHA_A))
    deliver(db, request(sha=SHA_B, ref="refs/heads/b"))
    db.write_sync(lambda c: _claim_up_to(c, "w", 1, LEASE))  # first build: running
    heads = claim(db)
    assert [(h.build_id, h.status) for h in heads] == [(first.build_id, "queued"), (first.build_id + 1, "queued")]
    assert claim(db, owner="s2") == []  # the next of key A waits for its head, leased or not
    settle(db, heads[0])
    [nxt] = claim(db, owner="s2")
    assert (nxt.build_id, nxt.status, nxt.attempts) == (first.build_id, "running", 1)


def test_a_report_due_later_holds_back_its_key_but_not_others(db):
    a = deliver(db, request(sha=SHA_A))
    b = deliver(db, request(sha=SHA_B, ref="refs/heads/b"))
    [ra, rb] = claim(db)
    later = utcnow() + timedelta(hours=1)
    assert db.write_sync(lambda c: outbox.retry_at(c, ra.id, "s1", [], later, "server: 502"))
    settle(db, rb)
    deliver(db, request(sha=SHA_B, ref="refs/heads/b"))  # supersedes b: two more reports of key B
    assert [(h.build_id, h.status) for h in claim(db)] == [(b.build_id, "superseded")]
    assert claim(db, now=later + timedelta(seconds=1))[0].build_id == a.build_id
    row = db.read_sync(lambda c: c.execute(select(reports).where(reports.c.id == ra.id)).one())
    assert row.last_error == "server: 502" and row.attempts == 2


def test_an_expired_lease_is_taken_over(db):
    deliver(db, request())
    [first] = claim(db, owner="crashed")
    assert claim(db, owner="s2") == []
    [again] = claim(db, owner="s2", now=utcnow() + LEASE + timedelta(seconds=1))
    assert again.id == first.id and again.attempts == 2
    assert not db.write_sync(lambda c: outbox.settle(c, first.id, "crashed", ["status"], utcnow()))
    assert db.write_sync(lambda c: outbox.settle(c, again.id, "s2", ["status"], utcnow()))


def test_interim_updates_are_coalesced_by_a_newer_report(db):
    """(When a newer report is owed; one already leased is left to finish.)"""
    recorded = deliver(db, request())
    for _ in range(3):
        db.write_sync(lambda c: outbox.owe_progress(c, recorded.build_id, utcnow(), outbox.EVERY_FORGE))
    [head] = claim(db)
    settle(db, head)
    [progress] = claim(db)  # the last interim update stands: nothing newer
    assert progress.status == outbox.PROGRESS
    states = db.read_sync(lambda c: [r.state for r in c.execute(select(reports).order_by(reports.c.id))])
    assert states == ["sent", "coalesced", "coalesced", "pending"]


def test_check_run_id_is_kept_on_the_build(db):
    recorded = deliver(db, request())
    db.write_sync(lambda c: outbox.set_check_run(c, recorded.build_id, 2**40))
    assert db.read_sync(lambda c: c.execute(select(builds.c.check_run_id)).scalar_one()) == 2**40


def test_dead_reports_do_not_block_their_key(db):
    deliver(db, request())
    [head] = claim(db)
    db.write_sync(lambda c: outbox.settle(c, head.id, "s1", [], utcnow(), ReportState.dead, "invalid: 422"))
    recorded = deliver(db, request())  # supersedes: two more reports
    assert [h.status for h in claim(db)] == ["superseded"]
    assert recorded.superseded


def test_the_key_made_in_python_is_the_key_made_in_sql(db):
    from bot.models import builds as builds_table

    pr = deliver(db, request(ref="refs/pull/7/head", kind=BuildKind.pull_request, pr_number=7))
    push = deliver(db, request(sha=SHA_B))
    tag = deliver(db, request(sha=SHA_B, ref="refs/tags/v1", kind=BuildKind.tag))
    in_sql = db.read_sync(lambda c: dict(c.execute(select(builds_table.c.id, outbox.REPORT_KEY)).all()))
    assert in_sql == {pr.build_id: outbox.report_key("github", "acme/app", SHA_A, "pull_request", "refs/pull/7/head"),
                      push.build_id: outbox.report_key("github", "acme/app", SHA_B, "branch", "refs/heads/main"),
                      tag.build_id: outbox.report_key("github", "acme/app", SHA_B, "tag", "refs/tags/v1")}
    assert len(set(in_sql.values())) == 3
    assert {key for _, _, key in owed(db)} == set(in_sql.values())


def test_an_administrators_cancel_owes_the_final_report(db):
    recorded = deliver(db, request())
    assert db.write_sync(lambda c: queue.cancel(c, recorded.build_id, "cancelled by an administrator", utcnow()))
    assert not db.write_sync(lambda c: queue.cancel(c, recorded.build_id, "again", utcnow()))
    assert [s for _, s, _ in owed(db)] == ["queued", "cancelled"]


def test_a_build_end_coalesces_its_unsent_interim_updates_but_not_one_in_flight(db):
    recorded = deliver(db, request())
    db.write_sync(lambda c: _claim_up_to(c, "w", 1, LEASE))  # running
    for _ in ("queued", "running"):
        [head] = claim(db)
        settle(db, head)
    db.write_sync(lambda c: outbox.owe_progress(c, recorded.build_id, utcnow(), outbox.EVERY_FORGE))
    [in_flight] = claim(db)
    db.write_sync(lambda c: outbox.owe_progress(c, recorded.build_id, utcnow(), outbox.EVERY_FORGE))
    deliver(db, request(sha=SHA_B))  # supersedes the build: its end is owed
    states = db.read_sync(lambda c: [(r.status, r.state) for r in c.execute(
        select(reports).where(reports.c.build_id == recorded.build_id).order_by(reports.c.id))])
    assert states == [("queued", "sent"), ("running", "sent"), ("progress", "pending"), ("progress", "coalesced"),
                      ("superseded", "pending")]
    assert in_flight.status == "progress"


def test_pruning_deletes_ended_reports_past_retention_only(db):
    """Sent, dropped and coalesced reports go once they are old enough, in batches; pending ones
    (however old: a forge's long outage) and recent ones stay."""
    for _ in range(3):
        deliver(db, request(sha=SHA_B))  # each supersedes the last: queued, superseded, ...
    old, recent = utcnow() - timedelta(days=8), utcnow() - timedelta(hours=1)
    rows = db.read_sync(lambda c: c.execute(select(reports.c.id).order_by(reports.c.id)).scalars().all())
    assert len(rows) == 5
    ended = {rows[0]: (ReportState.sent, old), rows[1]: (ReportState.dead, old),
             rows[2]: (ReportState.coalesced, old), rows[3]: (ReportState.sent, recent)}

    def age(c):
        for report_id, (state, at) in ended.items():
            c.execute(reports.update().where(reports.c.id == report_id).values(state=state.value, sent_at=at))
        c.execute(reports.update().where(reports.c.id == rows[4]).values(created_at=old))  # old, still pending
    db.write_sync(age)

    cutoff = utcnow() - timedelta(days=7)
    assert db.write_sync(lambda c: outbox.prune(c, cutoff, limit=2)) == 2  # a batch at most
    assert db.write_sync(lambda c: outbox.prune(c, cutoff, limit=2)) == 1
    assert db.write_sync(lambda c: outbox.prune(c, cutoff, limit=2)) == 0
    left = db.read_sync(lambda c: c.execute(select(reports.c.id, reports.c.state).order_by(reports.c.id)).all())
    assert [tuple(r) for r in left] == [(rows[3], "sent"), (rows[4], "pending")]


def test_a_claim_passes_over_the_forges_held_off(db):
    deliver(db, request())
    gitlab = queue.BuildRequest(provider="gitlab", repo="acme/app", clone_url="https://git.example/acme/app.git",
                                ref="refs/heads/main", sha=SHA_B, kind=BuildKind.branch, trigger="push")
    deliver(db, gitlab)
    only_gitlab = db.write_sync(lambda c: outbox.claim(c, "s1", 10, LEASE, utcnow(), frozenset({"github"})))
    assert [r.key.split(":")[0] for r in only_gitlab] == ["gitlab"]
    assert [r.key.split(":")[0] for r in claim(db)] == ["github"]  # held no more
