"""The sender against the GitHub and GitLab stand-ins (every request validated against the
forges' official API descriptions), on SQLite and PostgreSQL: builds driven through the real
queue, worker transactions and telemetry; reports checked as the forge recorded them."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from bot import queue
from bot.models import Build, BuildKind, BuildStatus, ReportState, builds, reports, utcnow
from bot.reporters import outbox
from bot.reporters.sender import Pace, Sender
from bot.telemetry import Telemetry
from bot.worker import BuildOutcome, _claim_up_to, _finish
from tests.standins.gitlab import GitLabStandIn
from tests.support import make_settings, private_pem
from tests.test_reporters import APP_ID, TOKEN, github, key, running  # noqa: F401 - the App stand-in fixtures

INSTALLATION = 42
GITLAB_TOKEN = "glpat-sender-test"
PLATFORMS = ["linux/amd64", "linux/arm64"]
DIGEST = {"linux/amd64": "sha256:" + "1" * 64, "linux/arm64": "sha256:" + "2" * 64}


@pytest.fixture(scope="module")
def gitlab_running():
    with GitLabStandIn(tokens={GITLAB_TOKEN}, projects={15: "acme/app"}) as standin:
        yield standin


@pytest.fixture
def gitlab(gitlab_running):
    gitlab_running.reset()
    yield gitlab_running
    gitlab_running.assert_no_violations()


FAST = dict(report_retry_initial_seconds=0.02, report_retry_max_seconds=0.1, report_interval_seconds=0,
            poll_seconds=0.05, public_url="https://ci.example")


def app_settings(db, github, key, **kw):
    return make_settings(db.url, github_api_url=github.url, github_app_id=APP_ID,
                         github_private_key=private_pem(key), **{**FAST, **kw})


# -- driving builds through the real transactions ---------------------------------------------------


class Forge:
    """Builds of one test, changed the way ingress and the worker change them."""

    def __init__(self, db, provider="github") -> None:
        self.db = db
        self.provider = provider
        self.telemetry = Telemetry(db, progress_to=outbox.EVERY_FORGE)

    def queue(self, sha: str | None = None, ref="refs/heads/main", kind=BuildKind.branch, **kw) -> int:
        request = queue.BuildRequest(
            provider=self.provider, repo="acme/app", clone_url="https://git.example/acme/app.git", ref=ref,
            sha=sha or uuid.uuid4().hex + "0" * 8, kind=kind, trigger="push",
            installation_id=INSTALLATION if self.provider == "github" else None, **kw)
        info = queue.DeliveryInfo(self.provider, uuid.uuid4().hex, "push", None, "acme/app")
        return self.db.write_sync(lambda c: queue.record_delivery(c, info, request, PLATFORMS, utcnow())).build_id

    def start(self, build_id: int) -> Build:
        [(build, _)] = self.db.write_sync(lambda c: _claim_up_to(c, "w", 1, timedelta(minutes=5), build_id))
        return build

    def finish(self, build: Build, outcome: BuildOutcome) -> None:
        assert self.db.write_sync(lambda c: _finish(c, build, "w", outcome, time.monotonic()))

    async def emit_two_platform_success(self, build_id: int) -> None:
        emit = self.telemetry.emit
        await emit(build_id, "fetch_succeeded", duration_s=0.2, sha="a" * 40, method="sha")
        for platform in PLATFORMS:
            tag = f"registry.example/acme/app:main-{platform.split('/')[1]}"
            await emit(build_id, "build_platform_started", platform, image="registry.example/acme/app")
            await emit(build_id, "build_platform_succeeded", platform, duration_s=3.0, image_id="sha256:" + "9" * 64)
            await emit(build_id, "tag_succeeded", platform, tag=tag)
            retries = 1 if platform == "linux/arm64" else 0
            if retries:
                await emit(build_id, "push_retry", platform, tag=tag, attempt=1, delay_s=0.1, kind="network",
                           refreshed=False, detail="connection reset by peer")
                await emit(build_id, "auth_refresh_succeeded", platform, registry="registry.example",
                           source="credential_helper", changed=True)
            await emit(build_id, "push_succeeded", platform, duration_s=1.5, tag=tag, digest=DIGEST[platform],
                       size=2_500_000, attempts=1 + retries, retries=retries)
        await emit(build_id, "manifest_started", tags=["registry.example/acme/app:main",
                                                       "registry.example/acme/app:sha-aaaaaaa"],
                   platforms=PLATFORMS, media_type="application/vnd.docker.distribution.manifest.list.v2+json")
        await emit(build_id, "manifest_published", digest="sha256:" + "3" * 64,
                   tags=["registry.example/acme/app:main", "registry.example/acme/app:sha-aaaaaaa"],
                   platforms=PLATFORMS, media_type="application/vnd.docker.distribution.manifest.list.v2+json",
                   partial=False)
        await self.telemetry.log_lines(build_id, "linux/arm64", ["Step 2/2 : RUN uname -m", "aarch64"])


async def until_sent(db, timeout: float = 20.0) -> None:
    """Wait (bounded) until the outbox holds nothing pending."""
    deadline = time.monotonic() + timeout
    while await db.read(outbox.pending_count):
        assert time.monotonic() < deadline, "reports still pending"
        await asyncio.sleep(0.02)


def report_rows(db) -> list:
    return db.read_sync(lambda c: c.execute(select(reports).order_by(reports.c.id)).all())


# -- GitHub App mode: statuses and a check run ----------------------------------------------------


def build_and_report(db, settings) -> Build:
    """A two-platform build, queued, run and ended with a running sender; every report sent."""
    forge = Forge(db)

    async def go():
        sender = Sender(db, settings)
        sending = asyncio.create_task(sender.run())
        build_id = forge.queue()
        await until_sent(db)
        build = forge.start(build_id)
        await forge.emit_two_platform_success(build_id)
        forge.finish(build, BuildOutcome(BuildStatus.succeeded, platforms=tuple(PLATFORMS)))
        await until_sent(db)
        sender.stop()
        await sending
        return build

    return asyncio.run(go())


def test_a_two_platform_build_reports_pending_then_success_and_a_check_run(db, github, key):
    build = build_and_report(db, app_settings(db, github, key))
    statuses = github.statuses[("acme", "app", build.sha)]
    assert [(s["state"], s["description"]) for s in statuses] == [
        ("pending", "Queued: linux/amd64, linux/arm64"),
        ("pending", "Building linux/amd64, linux/arm64"),
        ("success", "Built linux/amd64, linux/arm64"),
    ]
    assert {s["context"] for s in statuses} == {"imagebot"}
    assert {s["target_url"] for s in statuses} == {f"https://ci.example/builds/{build.id}"}

    [(run_id, run)] = github.check_runs.items()
    history = [h["status"] for h in github.check_run_history[run_id]]
    assert history[0] == "queued" and history[-1] == "completed" and "in_progress" in history
    assert run["conclusion"] == "success" and run["name"] == "imagebot" and run["head_sha"] == build.sha
    assert run["external_id"] == str(build.id) and run["details_url"] == f"https://ci.example/builds/{build.id}"
    summary = run["output"]["summary"]
    for platform in PLATFORMS:
        row = next(line for line in summary.splitlines() if line.startswith(f"| `{platform}`"))
        assert DIGEST[platform] in row and "pushed" in row
    arm = next(line for line in summary.splitlines() if line.startswith("| `linux/arm64`"))
    amd = next(line for line in summary.splitlines() if line.startswith("| `linux/amd64`"))
    assert "| 2 | 1 (network) | succeeded (new credentials) |" in arm
    assert "| 1 | 0 | — |" in amd
    assert "**Manifest list** `sha256:" + "3" * 64 + "`" in summary
    assert "`registry.example/acme/app:sha-aaaaaaa`" in summary
    assert "[linux/arm64] aarch64" in run["output"]["text"]
    assert db.read_sync(lambda c: c.execute(select(builds.c.check_run_id)).scalar_one()) == run_id
    assert {r.state for r in report_rows(db)} <= {"sent", "coalesced"}


def test_a_failing_push_names_the_error_kind(db, github, key):
    forge = Forge(db)
    sender = Sender(db, app_settings(db, github, key))

    async def go():
        build_id = forge.queue()
        build = forge.start(build_id)
        tag = "registry.example/acme/app:main-amd64"
        await forge.telemetry.emit(build_id, "push_failed", "linux/amd64", tag=tag, kind="auth", attempts=2,
                                   retries=1, detail="unauthorized: authentication required")
        forge.finish(build, BuildOutcome(BuildStatus.failed, "auth", "linux/amd64: unauthorized: authentication "
                                         "required", step="push"))
        sending = asyncio.create_task(sender.run())
        await until_sent(db)
        sender.stop()
        await sending
        return build

    build = asyncio.run(go())
    [run] = github.check_runs.values()
    assert run["conclusion"] == "failure"
    assert run["output"]["title"].startswith("Failed (auth): linux/amd64: unauthorized")
    summary = run["output"]["summary"]
    assert "**Failed** at step `push`, error kind `auth`" in summary
    assert "push auth\\: unauthorized\\: authentication required" in summary  # escaped: shown as text
    assert github.statuses[("acme", "app", build.sha)][-1]["state"] == "error"
    final = github.check_run_history[run["id"]][-1]
    assert final["status"] == "completed"
    # the Retry button comes back as a requested_action with identifier "retry"
    create_or_update = [r.json for r in github.requests if r.operation_id in ("checks/update", "checks/create")]
    assert create_or_update[-1]["actions"][0]["identifier"] == "retry"


def test_a_pull_request_reports_under_its_own_context(db, github, key):
    forge = Forge(db)
    sha = "c" * 40
    forge.queue(sha=sha)
    forge.queue(sha=sha, ref="refs/pull/3/head", kind=BuildKind.pull_request, pr_number=3)
    sender = Sender(db, app_settings(db, github, key))

    async def go():
        sending = asyncio.create_task(sender.run())
        await until_sent(db)
        sender.stop()
        await sending

    asyncio.run(go())
    assert sorted(s["context"] for s in github.statuses[("acme", "app", sha)]) == [
        "imagebot", "imagebot (pull_request)"]
    assert sorted(r["name"] for r in github.check_runs.values()) == ["imagebot", "imagebot (pull_request)"]


# -- never lost: faults, restarts, order, once ----------------------------------------------------


def test_faults_and_a_restart_deliver_every_report_in_order_once(db, github, key):
    settings = app_settings(db, github, key)
    forge = Forge(db)
    sha = "d" * 40
    github.server_error(502, path_regex="/statuses/", count=2)
    github.secondary_rate_limit(retry_after=1, path_regex="/check-runs", count=1)
    github.too_many_requests(retry_after=1, path_regex="/statuses/", count=1)

    async def go():
        first = Sender(db, settings, lease=timedelta(seconds=1))
        sending = asyncio.create_task(first.run())
        a = forge.queue(sha=sha)
        build = forge.start(a)
        forge.finish(build, BuildOutcome(BuildStatus.failed, "build", "RUN failed", step="build"))
        b = forge.queue(sha=sha)  # the same commit again: its reports queue behind a's
        await asyncio.sleep(0)  # let the first sender take its first round
        first.stop()  # a restart in the middle, with reports still owed
        await sending
        assert await db.read(outbox.pending_count) > 0
        second = Sender(db, settings, lease=timedelta(seconds=1))
        sending = asyncio.create_task(second.run())
        build_b = forge.start(b)
        forge.finish(build_b, BuildOutcome(BuildStatus.succeeded, platforms=tuple(PLATFORMS)))
        await until_sent(db, timeout=30)
        second.stop()
        await sending
        return a, b

    a, b = asyncio.run(go())
    accepted = github.statuses[("acme", "app", sha)]
    assert [(s["state"], s["target_url"].rsplit("/", 1)[1]) for s in accepted] == [
        ("pending", str(a)), ("pending", str(a)), ("failure", str(a)),
        ("pending", str(b)), ("pending", str(b)), ("success", str(b)),
    ]
    faulted = [r for r in github.requests if r.faulted]
    assert len(faulted) == 4  # every fault was met, and retried past
    runs = sorted(github.check_runs.values(), key=lambda r: r["id"])
    assert [(r["external_id"], r["conclusion"]) for r in runs] == [(str(a), "failure"), (str(b), "success")]
    assert all(r.state == ReportState.sent for r in report_rows(db))


def test_a_check_run_created_before_its_answer_was_lost_is_updated_not_made_again(db, github, key):
    """GitHub made the run but the bot never heard (a 502 after the fact; a crash between the
    create and storing its id ends the same way): the retry finds it by external id."""
    github.lost_answer(502, method="POST", path_regex="/check-runs$")
    build_id = build_and_report(db, app_settings(db, github, key)).id
    (run,) = github.check_runs.values()
    assert (run["external_id"], run["status"], run["conclusion"]) == (str(build_id), "completed", "success")
    assert db.read_sync(lambda c: c.execute(select(builds.c.check_run_id).where(builds.c.id == build_id))
                        .scalar_one()) == run["id"]
    calls = [r.operation_id for r in github.requests if r.operation_id != "apps/create-installation-access-token"]
    assert calls.count("checks/create") == 1 and calls.count("checks/list-for-ref") == 1
    # looked up after the lost answer, before the first update
    assert calls.index("checks/create") < calls.index("checks/list-for-ref") < calls.index("checks/update")


def test_a_refused_report_is_dropped_and_does_not_block_the_next(db, github, key):
    github.inject("POST", "/statuses/", 422, count=1, body={"message": "Validation Failed"})
    forge = Forge(db)
    sha = "e" * 40
    settings = app_settings(db, github, key)

    async def go():
        sending = asyncio.create_task(Sender(db, settings).run())
        forge.queue(sha=sha)
        forge.queue(sha=sha)  # supersedes: the first build's end, the second's queued
        await until_sent(db)
        sending.cancel()

    asyncio.run(go())
    states = [(r.status, r.state, r.last_error) for r in report_rows(db)]
    assert states[0][:2] == ("queued", "dead") and states[0][2].startswith("invalid")
    assert [s[:2] for s in states[1:]] == [("superseded", "sent"), ("queued", "sent")]
    assert [s["state"] for s in github.statuses[("acme", "app", sha)]] == ["error", "pending"]


def test_interim_updates_are_coalesced_to_one_patch_per_interval(db, github, key):
    settings = app_settings(db, github, key, report_interval_seconds=30)
    forge = Forge(db)

    async def go():
        sender = Sender(db, settings)
        build_id = forge.queue()
        build = forge.start(build_id)
        await sender.send_round()  # queued, then running (one per round: same key)
        await sender.send_round()
        await forge.emit_two_platform_success(build_id)  # eleven events that show in the check run
        await sender.send_round()
        await sender.send_round()
        pending = await db.read(outbox.pending_count)
        forge.finish(build, BuildOutcome(BuildStatus.succeeded, platforms=tuple(PLATFORMS)))
        await until_sent_by(sender)
        return pending

    pending = asyncio.run(go())
    assert pending == 1  # the newest interim update waits for the interval; the rest were coalesced
    [run_id] = github.check_runs
    assert [h["status"] for h in github.check_run_history[run_id]] == ["queued", "in_progress", "completed"]
    rows = report_rows(db)
    assert [r.state for r in rows if r.status == "progress"].count("sent") == 0


async def until_sent_by(sender: Sender, rounds: int = 20) -> None:
    for _ in range(rounds):
        if not await sender.db.read(outbox.pending_count):
            return
        await sender.send_round()
    raise AssertionError("reports still pending")


def token_settings(db, github, **kw):
    return make_settings(db.url, github_api_url=github.url, github_token=TOKEN, **{**FAST, **kw})


def refused_then_more(db, github, settings, more: int) -> list[int]:
    """One build's report is sent (and refused, as the test arranged); once the answer is in,
    ``more`` builds are queued. All are reported; their ids."""
    forge = Forge(db)

    async def go():
        sender = Sender(db, settings)
        sending = asyncio.create_task(sender.run())
        first = forge.queue(ref="refs/heads/b0")
        await until(lambda: github.requests and github.requests[0].status is not None)
        later = [forge.queue(ref=f"refs/heads/b{n}") for n in range(1, more + 1)]
        sender.wake()
        await until_sent(db)
        sender.stop()
        await sending
        return [first, *later]

    return asyncio.run(go())


def test_a_rate_limit_holds_off_every_report_to_that_forge(db, github):
    """GitHub's rate limits are per principal, not per request: once told to wait, the sender
    sends nothing to GitHub before the time is up (GitHub may ban an integration that keeps
    asking), then everything."""
    github.secondary_rate_limit(retry_after=2, path_regex="/statuses/", count=1)
    build_ids = refused_then_more(db, github, token_settings(db, github), more=2)
    limited, *after = github.requests
    assert limited.status == 403 and [r.status for r in after] == [201, 201, 201]
    assert min(r.at for r in after) - limited.at >= 2.0
    reported = sorted(int(s["target_url"].rsplit("/", 1)[1]) for s in itertools.chain(*github.statuses.values()))
    assert reported == build_ids


def test_a_failing_forge_gets_one_probe_at_a_time_until_it_answers(db, github):
    """During an outage the sender holds the forge off, backing off, and then probes it with
    one report, not a batch of doomed requests; once one is answered, the rest go."""
    github.server_error(502, path_regex="/statuses/", count=3)
    settings = token_settings(db, github, report_retry_initial_seconds=0.2, report_retry_max_seconds=1.0)
    build_ids = refused_then_more(db, github, settings, more=5)
    failed, answered = github.requests[:3], github.requests[3:]
    assert [r.status for r in failed] == [502] * 3 and [r.status for r in answered] == [201] * 6
    # each probe came alone, after the hold (at least the lower half of the backoff, 0.1 s)
    gaps = [round(later.at - earlier.at, 3) for earlier, later in zip(failed, failed[1:] + answered[:1])]
    assert min(gaps) >= 0.1, gaps
    reported = sorted(int(s["target_url"].rsplit("/", 1)[1]) for s in itertools.chain(*github.statuses.values()))
    assert reported == build_ids


async def until(condition, timeout: float = 10.0) -> None:
    """Wait (bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.01)


def test_token_mode_reports_statuses_only(db, github):
    settings = token_settings(db, github)
    forge = Forge(db)
    build_id = forge.queue()

    async def go():
        sender = Sender(db, settings)
        build = forge.start(build_id)
        await forge.emit_two_platform_success(build_id)
        forge.finish(build, BuildOutcome(BuildStatus.succeeded, platforms=tuple(PLATFORMS)))
        await until_sent_by(sender)
        await sender.github.aclose()

    asyncio.run(go())
    assert not github.check_runs
    assert [s["state"] for statuses in github.statuses.values() for s in statuses] == ["pending", "pending", "success"]


def test_an_unconfigured_forge_drops_its_reports_with_a_note(db):
    forge = Forge(db)
    forge.queue()

    async def go():
        await until_sent_by(Sender(db, make_settings(db.url, **FAST)))

    asyncio.run(go())
    [row] = report_rows(db)
    assert (row.state, row.last_error) == ("dead", "github reporting is not configured")


# -- GitLab -----------------------------------------------------------------------------------


def test_gitlab_statuses_follow_the_build_even_when_it_is_requeued(db, gitlab):
    settings = make_settings(db.url, gitlab_url=gitlab.url, gitlab_api_token=GITLAB_TOKEN, lease_seconds=1, **FAST)
    forge = Forge(db, provider="gitlab")
    sha = "f" * 40

    async def go():
        sender = Sender(db, settings)
        build_id = forge.queue(sha=sha)
        [(lost, _)] = db.write_sync(lambda c: _claim_up_to(c, "dead", 1, timedelta(seconds=-1), build_id))
        db.write_sync(lambda c: queue.recover(c, 3, utcnow()))  # the worker died: queued again
        build = forge.start(build_id)  # running, a second time
        forge.finish(build, BuildOutcome(BuildStatus.succeeded, platforms=tuple(PLATFORMS)))
        await until_sent_by(sender)
        await sender.gitlab.aclose()

    asyncio.run(go())
    assert gitlab.history("acme/app", sha, "imagebot") == ["pending", "running", "success"]
    assert [r.state for r in report_rows(db)] == ["sent"] * 4  # running twice: the second said nothing new


def test_gitlab_merge_request_builds_report_without_a_branch_ref(db, gitlab):
    settings = make_settings(db.url, gitlab_url=gitlab.url, gitlab_api_token=GITLAB_TOKEN, **FAST)
    forge = Forge(db, provider="gitlab")
    sha = "0" * 39 + "1"

    async def go():
        sender = Sender(db, settings)
        forge.queue(sha=sha, ref="refs/merge-requests/7/head", kind=BuildKind.pull_request, pr_number=7)
        await until_sent_by(sender)
        await sender.gitlab.aclose()

    asyncio.run(go())
    assert gitlab.history("acme/app", sha, "imagebot (pull_request)") == ["pending"]


# -- pacing -----------------------------------------------------------------------------------


def test_pace_keeps_a_forge_under_its_requests_per_minute():
    pace = Pace(per_minute=5)
    assert [pace.take("github", 2, now=t) for t in (0.0, 1.0)] == [0.0, 0.0]
    assert pace.take("github", 2, now=2.0) == pytest.approx(58.0)  # 4 sent; 2 more needs the first to age out
    assert pace.take("gitlab", 2, now=2.0) == 0.0  # each forge has its own budget
    assert pace.take("github", 1, now=2.0) == 0.0
    assert pace.take("github", 1, now=30.0) == pytest.approx(30.0)
    assert pace.take("github", 2, now=60.5) == 0.0  # the first two aged out


def test_pace_keeps_a_forge_under_its_requests_per_hour_too():
    pace = Pace(per_minute=4, per_hour=6)
    assert [pace.take("github", 2, now=t) for t in (0.0, 61.0, 122.0)] == [0.0, 0.0, 0.0]
    assert pace.take("github", 1, now=183.0) == pytest.approx(3417.0)  # the minute has room, the hour not
    assert pace.room("github", now=183.0) == 0 and pace.room("github", now=3601.0) == 2


def test_interim_updates_leave_a_reserve_for_statuses_and_final_updates():
    pace = Pace(per_minute=8, per_hour=100)  # interim updates may use 6 a minute
    assert pace.take("github", 6, now=0.0, low=True) == 0.0
    assert pace.take("github", 1, now=1.0, low=True) == pytest.approx(59.0)
    assert pace.take("github", 2, now=1.0) == 0.0  # the reserve: a status and a final update go at once
    assert pace.take("github", 1, now=2.0) == pytest.approx(58.0)  # and then the whole budget is used


def test_a_burst_of_builds_is_paced_not_failed(db, github, key):
    settings = app_settings(db, github, key, report_requests_per_minute=4)
    forge = Forge(db)
    for n in range(3):
        forge.queue(ref=f"refs/heads/b{n}")  # three builds: six requests (status + check run each)

    async def go():
        sender = Sender(db, settings)
        await sender.send_round()
        await sender.github.aclose()

    asyncio.run(go())
    rows = report_rows(db)
    assert [r.state for r in rows] == ["sent", "sent", "pending"]
    assert rows[2].attempts == 0 and rows[2].last_error is None  # waiting is not failing
    assert len([r for r in github.requests if r.operation_id != "apps/create-installation-access-token"]) == 4


def test_gitlab_faults_are_retried_in_order_once(db, gitlab):
    settings = make_settings(db.url, gitlab_url=gitlab.url, gitlab_api_token=GITLAB_TOKEN, **FAST)
    forge = Forge(db, provider="gitlab")
    sha = "9" * 40
    gitlab.server_error(502, count=2)
    gitlab.too_many_requests(retry_after=1, count=1)

    async def go():
        sending = asyncio.create_task(Sender(db, settings).run())
        build = forge.start(forge.queue(sha=sha))
        forge.finish(build, BuildOutcome(BuildStatus.failed, "build", "RUN exited 1", step="build"))
        await until_sent(db)
        sending.cancel()

    asyncio.run(go())
    assert gitlab.history("acme/app", sha, "imagebot") == ["pending", "running", "failed"]
    assert [r.attempts for r in report_rows(db)] == [4, 1, 1]  # 502, 502, 429, then accepted


def test_pace_room():
    pace = Pace(per_minute=3)
    pace.take("github", 2, now=0.0)
    assert (pace.room("github", now=1.0), pace.room("github", now=61.0), pace.room("gitlab", now=1.0)) == (1, 3, 3)
