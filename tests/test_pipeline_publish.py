"""Who may publish what, end to end: the real Docker engine, the real registry (htpasswd auth),
real git over HTTP, and a recording server on another host (tests/standins/recorder.py) that
logs every Authorization header it is sent.

Each test is a way a repository (or an old build) could turn the bot's registry keys against
the operator: naming another host or another team's image, a pull request naming release tags,
a branch called ``latest``, a rebuild of an old commit, a superseded build still publishing.
"""

from __future__ import annotations

import asyncio
import uuid

import httpx
import pytest

from bot import queue
from bot.db import Database
from bot.models import BuildKind, BuildStatus, utcnow
from bot.pipeline.run import Pipeline
from bot.telemetry import Telemetry
from tests.standins.git_http import GitHTTPServer, make_repo
from tests.standins.recorder import Recorder
from tests.support import infra, make_settings
from tests.test_pipeline_run import events, new_build, run

DOCKERFILE = "FROM {base}\nRUN echo built > /built\n"
LIST = "application/vnd.docker.distribution.manifest.list.v2+json"


@pytest.fixture(scope="module")
def services() -> dict[str, str]:
    return infra("docker", "registry", "base-image")


def settings_for(services, db, **overrides):
    values = dict(
        registry=f"{services['IMAGEBOT_TEST_REGISTRY']}/pub{uuid.uuid4().hex[:8]}",
        registry_username=services["IMAGEBOT_TEST_REGISTRY_USERNAME"],
        registry_password=services["IMAGEBOT_TEST_REGISTRY_PASSWORD"],
        platforms=["linux/amd64"], push_retries=1, retry_initial_seconds=0.1, retry_max_seconds=0.2,
    )
    values.update(overrides)
    return make_settings(db.url, **values)


def forge(tmp_path, services, config: str = "", dockerfile: str | None = None):
    files = {"Dockerfile": dockerfile or DOCKERFILE.format(base=services["IMAGEBOT_TEST_BASE_IMAGE"]),
             ".imagebot.yml": config + "platforms: [linux/amd64]\n", "hello.txt": "hello\n"}
    repo = make_repo(tmp_path / "srv", "acme/app", files)
    return GitHTTPServer(tmp_path / "srv"), repo


def registry_tags(services, settings, name: str = "acme/app") -> list[str]:
    """The tags of ``{registry}/{name}`` as the registry lists them."""
    repository = f"{settings.registry.split('/', 1)[1]}/{name}"
    auth = (services["IMAGEBOT_TEST_REGISTRY_USERNAME"], services["IMAGEBOT_TEST_REGISTRY_PASSWORD"])
    answer = httpx.get(f"http://{services['IMAGEBOT_TEST_REGISTRY']}/v2/{repository}/tags/list", auth=auth)
    return [] if answer.status_code == 404 else sorted(answer.json()["tags"] or [])


def list_digest(services, settings, tag: str) -> str | None:
    repository = f"{settings.registry.split('/', 1)[1]}/acme/app"
    auth = (services["IMAGEBOT_TEST_REGISTRY_USERNAME"], services["IMAGEBOT_TEST_REGISTRY_PASSWORD"])
    answer = httpx.head(f"http://{services['IMAGEBOT_TEST_REGISTRY']}/v2/{repository}/manifests/{tag}",
                        auth=auth, headers={"Accept": LIST})
    return answer.headers.get("docker-content-digest") if answer.status_code == 200 else None


def withheld(db, build) -> list[dict]:
    return [e["data"] for e in events(db, build) if e["name"] == "tags_withheld"]


# -- where images may go ----------------------------------------------------------------------


def test_an_image_on_another_host_fails_config_and_that_host_sees_no_credentials(services, database, tmp_path):
    with Recorder(headers={"WWW-Authenticate": 'Basic realm="other"'}) as other:
        # FROM scratch: nothing to pull, so on a bot without the policy the build gets as far
        # as pushing to the other host, which challenges for and receives the password
        server, repo = forge(tmp_path, services, f"image: {other.host}/acme/app\n",
                             "FROM scratch\nCOPY hello.txt /hello.txt\n")
        with server:
            settings = settings_for(services, database)
            build = new_build(database, server, repo)
            outcome = run(settings, database, build)
        assert other.authorizations == [] and other.requests == []  # nothing was even built
        assert outcome.status is BuildStatus.failed and outcome.error_kind == "config", outcome
        assert other.host in outcome.error_message and f"{settings.registry}/acme/app" in outcome.error_message
    assert not [e for e in events(database, build) if e["name"].startswith("build_platform")]


def test_a_host_the_policy_allows_gets_no_credentials_unless_the_operator_gave_it_some(
        services, database, tmp_path):
    with Recorder(headers={"WWW-Authenticate": 'Basic realm="other"'}) as other:
        server, repo = forge(tmp_path, services, f"image: {other.host}/acme/app\n",
                             "FROM scratch\nCOPY hello.txt /hello.txt\n")
        with server:
            settings = settings_for(services, database, image_policy={"acme/app": [f"{other.host}/acme"]})
            outcome = run(settings, database, new_build(database, server, repo))
        assert other.requests and other.authorizations == []  # it was pushed to, without a key
    assert outcome.status is BuildStatus.failed and outcome.error_kind == "auth", outcome


def test_another_teams_image_is_refused(services, database, tmp_path):
    server, repo = forge(tmp_path, services, "image: otherteam/app\n")
    with server:
        settings = settings_for(services, database)
        outcome = run(settings, database, new_build(database, server, repo))
    assert outcome.error_kind == "config" and "otherteam/app" in outcome.error_message, outcome
    assert registry_tags(services, settings, "otherteam/app") == []


# -- moving tags ------------------------------------------------------------------------------


def test_a_pull_request_with_tags_latest_publishes_only_pr_n(services, database, tmp_path):
    server, repo = forge(tmp_path, services, "tags: [latest, '1.2.3']\npush: true\n")
    repo.git("update-ref", "refs/pull/7/head", repo.head())
    with server:
        settings = settings_for(services, database)
        build = new_build(database, server, repo, kind=BuildKind.pull_request, ref="refs/pull/7/head",
                          pr_number=7)
        assert run(settings, database, build).status is BuildStatus.succeeded
    tags = registry_tags(services, settings)
    assert "pr-7" in tags and "latest" not in tags and "1.2.3" not in tags, tags
    assert [e for e in events(database, build) if e["name"] == "manifest_published"][0]["data"]["tags"] == ["pr-7"]


def test_a_branch_called_latest_publishes_no_latest_and_says_why(services, database, tmp_path):
    server, repo = forge(tmp_path, services)
    repo.branch("latest")
    with server:
        settings = settings_for(services, database)
        build = new_build(database, server, repo, ref="refs/heads/latest")
        assert run(settings, database, build).status is BuildStatus.succeeded
    tags = registry_tags(services, settings)
    assert "latest" not in tags and f"sha-{build.sha[:7]}" in tags, tags
    assert any("reserved" in w["reason"] for w in withheld(database, build))


def test_a_rebuild_of_an_old_commit_moves_only_immutable_tags(services, database, tmp_path):
    server, repo = forge(tmp_path, services)
    old = repo.head()
    with server:
        settings = settings_for(services, database)
        first = new_build(database, server, repo)
        assert run(settings, database, first).status is BuildStatus.succeeded
        main_before = list_digest(services, settings, "main")
        sha_before = list_digest(services, settings, f"sha-{old[:7]}")
        repo.commit({"later.txt": "the branch moved on\n"})
        again = new_build(database, server, repo, sha=old)  # a re-run / Retry / admin rebuild
        assert run(settings, database, again).status is BuildStatus.succeeded
    assert list_digest(services, settings, "main") == main_before  # neither moved back
    assert list_digest(services, settings, "latest") == main_before
    assert list_digest(services, settings, f"sha-{old[:7]}") != sha_before  # the rebuild's own
    held = withheld(database, again)
    assert held and held[0]["tags"] == ["main", "latest"] and "no longer the head" in held[0]["reason"]


def test_a_release_below_a_published_one_moves_neither_latest_nor_its_major(services, database, tmp_path):
    server, repo = forge(tmp_path, services)
    newer = repo.tag("v1.3.0", message="1.3.0")  # annotated: the head check peels it
    older = repo.tag("v1.2.5", repo.commit({"fix.txt": "a backport\n"}, branch="release-1.2", parent=newer))
    with server:
        settings = settings_for(services, database)
        for ref, sha in (("refs/tags/v1.3.0", newer), ("refs/tags/v1.2.5", older)):
            build = new_build(database, server, repo, ref=ref, sha=sha, kind=BuildKind.tag)
            assert run(settings, database, build).status is BuildStatus.succeeded
    digest = {tag: list_digest(services, settings, tag) for tag in ("1.3.0", "1.2.5", "latest", "1", "1.2", "1.3")}
    assert digest["latest"] == digest["1"] == digest["1.3"] == digest["1.3.0"] != digest["1.2.5"]
    assert digest["1.2"] == digest["1.2.5"]  # no 1.2.x above 1.2.5: that alias moves
    held = withheld(database, build)
    assert held[0]["tags"] == ["1", "latest"] and "above 1.2.5" in held[0]["reason"]


class FailLsRemote(Telemetry):
    """Real telemetry that breaks the git server (every request answers 500) once the push is
    done, so the head check before publishing cannot be answered."""

    def __init__(self, db, server: GitHTTPServer) -> None:
        super().__init__(db)
        self.server = server

    async def emit(self, build_id, name, platform=None, **data):
        if name == "push_succeeded":
            self.server.inject_error(500, count=None)
        return await super().emit(build_id, name, platform, **data)


def test_a_head_check_that_fails_publishes_only_immutable_tags_and_the_build_succeeds(
        services, database, tmp_path):
    server, repo = forge(tmp_path, services)
    with server:
        settings = settings_for(services, database)
        build = new_build(database, server, repo)

        async def go():
            pipeline = Pipeline(settings, FailLsRemote(database, server))
            try:
                return await pipeline(build)
            finally:
                await pipeline.aclose()

        outcome = asyncio.run(go())
    assert outcome.status is BuildStatus.succeeded, outcome
    tags = registry_tags(services, settings)
    assert "main" not in tags and "latest" not in tags and f"sha-{build.sha[:7]}" in tags, tags
    held = withheld(database, build)
    assert held[0]["tags"] == ["main", "latest"] and "could not check" in held[0]["reason"]


class SupersedeOnManifestStart(Telemetry):
    """Real telemetry that, as the manifest list is about to be published, records a newer
    build of the same ref through a *second* database connection (as another process would),
    which supersedes the running one."""

    def __init__(self, db, other: Database, newer) -> None:
        super().__init__(db)
        self.other, self.newer = other, newer

    async def emit(self, build_id, name, platform=None, **data):
        event = await super().emit(build_id, name, platform, **data)
        if name == "manifest_started":
            await asyncio.to_thread(self.newer, self.other)
        return event


def test_a_superseded_build_never_puts_a_manifest(services, db_url, tmp_path):
    first_db, second_db = Database(db_url), Database(db_url)
    try:
        server, repo = forge(tmp_path, services)
        with server:
            settings = settings_for(services, first_db)
            build = new_build(first_db, server, repo)
            claimed = first_db.write_sync(
                lambda c: queue.claim(c, "worker-1", settings_lease(settings), utcnow(), build.id))
            assert claimed is not None and claimed.lease_owner == "worker-1"

            def newer(db: Database) -> None:
                superseding = new_build(db, server, repo)
                assert superseding.id != build.id

            async def go():
                pipeline = Pipeline(settings, SupersedeOnManifestStart(first_db, second_db, newer))
                try:
                    return await pipeline(claimed)
                finally:
                    await pipeline.aclose()

            outcome = asyncio.run(go())
        tags = registry_tags(services, settings)
        assert tags == [f"sha-{build.sha[:7]}-linux-amd64"], tags  # the platform image only: no list
        assert outcome.status is BuildStatus.cancelled, outcome
        names = [e["name"] for e in events(first_db, build)]
        assert "manifest_published" not in names and "tags_withheld" in names
    finally:
        first_db.close()
        second_db.close()


def settings_lease(settings):
    from datetime import timedelta

    return timedelta(seconds=settings.lease_seconds)


def test_still_current_needs_the_claimed_lease_unexpired_and_the_build_not_superseded(db):
    """The check before each manifest PUT, on SQLite and PostgreSQL, from a second connection."""
    from datetime import timedelta

    from sqlalchemy import update

    from bot.models import builds
    from bot.pipeline.run import still_current
    from tests.test_queue import enqueue, request

    other = Database(db.url)
    try:
        first, = enqueue(db, request(sha="b" * 40), at=utcnow())
        unclaimed = db.read_sync(lambda c: queue_build(c, first))
        assert other.read_sync(lambda c: still_current(c, unclaimed))  # run outside the worker
        claimed = db.write_sync(lambda c: queue.claim(c, "w1", timedelta(seconds=30), utcnow(), first))
        assert other.read_sync(lambda c: still_current(c, claimed))
        stolen = claimed.model_copy(update={"lease_owner": "w2"})
        assert not other.read_sync(lambda c: still_current(c, stolen))
        db.write_sync(lambda c: c.execute(update(builds).where(builds.c.id == first)
                                          .values(lease_expires_at=utcnow() - timedelta(seconds=1))))
        assert not other.read_sync(lambda c: still_current(c, claimed))  # expired: recoverable any moment
        db.write_sync(lambda c: c.execute(update(builds).where(builds.c.id == first)
                                          .values(lease_expires_at=utcnow() + timedelta(seconds=30))))
        assert other.read_sync(lambda c: still_current(c, claimed))
        enqueue(other, request(sha="c" * 40), at=utcnow())  # a newer push of the same ref
        assert not db.read_sync(lambda c: still_current(c, claimed))
        assert not db.read_sync(lambda c: still_current(c, unclaimed))
    finally:
        other.close()


def queue_build(conn, build_id):
    from sqlalchemy import select

    from bot.models import Build, builds

    return Build.model_validate(conn.execute(select(builds).where(builds.c.id == build_id)).one()._asdict())
