"""The pipeline end to end against the real Docker engine, the real registry (htpasswd auth)
and real git over HTTP: two platforms built, pushed, joined by a manifest list, and run."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import docker
import httpx
import pytest

from bot import queue, telemetry
from bot.db import Database
from bot.models import Build, BuildKind, builds
from bot.pipeline.run import Pipeline
from bot.telemetry import Telemetry
from tests.standins.git_http import GitHTTPServer, make_repo, multiarch_fixture_files
from tests.support import infra, make_settings
from sqlalchemy import select

PLATFORMS = ["linux/amd64", "linux/arm64"]


@pytest.fixture(scope="module")
def services() -> dict[str, str]:
    return infra("docker", "registry", "binfmt", "base-image")


@pytest.fixture
def forge(tmp_path, services):
    repo = make_repo(tmp_path / "srv", "acme/app", multiarch_fixture_files(services["IMAGEBOT_TEST_BASE_IMAGE"]))
    with GitHTTPServer(tmp_path / "srv") as server:
        yield server, repo


def settings_for(services, db: Database, **overrides):
    values = dict(
        registry=f"{services['IMAGEBOT_TEST_REGISTRY']}/it{uuid.uuid4().hex[:8]}",
        registry_username=services["IMAGEBOT_TEST_REGISTRY_USERNAME"],
        registry_password=services["IMAGEBOT_TEST_REGISTRY_PASSWORD"],
        platforms=PLATFORMS, push_retries=2, retry_initial_seconds=0.1, retry_max_seconds=0.5,
    )
    values.update(overrides)
    return make_settings(db.url, **values)


def new_build(db: Database, server, repo, **kw) -> Build:
    request = queue.BuildRequest(
        provider="github", repo="acme/app", clone_url=server.repo_url("acme/app"),
        ref=kw.pop("ref", "refs/heads/main"), sha=kw.pop("sha", repo.head()),
        kind=kw.pop("kind", BuildKind.branch), trigger="push", default_branch="main", **kw,
    )
    info = queue.DeliveryInfo("github", uuid.uuid4().hex, "push", None, "acme/app")
    from bot.models import utcnow

    build_id = db.write_sync(lambda c: queue.record_delivery(c, info, request, PLATFORMS, utcnow())).build_id
    row = db.read_sync(lambda c: c.execute(select(builds).where(builds.c.id == build_id)).one())
    return Build.model_validate(row._asdict())


def run(settings, db, build):
    async def go():
        pipeline = Pipeline(settings, Telemetry(db))
        try:
            return await pipeline(build)
        finally:
            await pipeline.aclose()
    return asyncio.run(go())


def events(db, build):
    return db.read_sync(lambda c: telemetry.events_of(c, build.id))


def registry_get(services, path, accept):
    auth = (services["IMAGEBOT_TEST_REGISTRY_USERNAME"], services["IMAGEBOT_TEST_REGISTRY_PASSWORD"])
    return httpx.get(f"http://{services['IMAGEBOT_TEST_REGISTRY']}{path}", auth=auth, headers={"Accept": accept})


def run_image(services, image: str, platform: str) -> str:
    client = docker.from_env()
    auth = {"username": services["IMAGEBOT_TEST_REGISTRY_USERNAME"], "password": services["IMAGEBOT_TEST_REGISTRY_PASSWORD"]}
    repository, _, tag = image.rpartition(":")
    client.images.pull(repository, tag=tag, platform=platform, auth_config=auth)
    output = client.containers.run(image, platform=platform, remove=True)
    return output.decode().strip()


def test_two_platform_build_push_and_manifest_list(services, database, forge):
    server, repo = forge
    settings = settings_for(services, database)
    build = new_build(database, server, repo)
    outcome = run(settings, database, build)
    assert outcome.status.value == "succeeded", outcome
    assert outcome.platforms == tuple(PLATFORMS) and not outcome.partial

    seen = events(database, build)
    names = [e["name"] for e in seen]
    assert names[0] == "fetch_succeeded" and names[-1] == "manifest_published"
    for platform in PLATFORMS:
        mine = [e["name"] for e in seen if e["platform"] == platform]
        assert mine == ["build_platform_started", "build_platform_succeeded", "tag_started", "tag_succeeded",
                        "push_started", "push_succeeded"]
    published = seen[-1]["data"]
    sha7 = build.sha[:7]
    assert published["tags"] == ["main", f"sha-{sha7}", "latest"]
    assert published["platforms"] == PLATFORMS and published["partial"] is False

    image = f"{settings.registry}/acme/app"
    repository = image.split("/", 1)[1]
    listing = registry_get(services, f"/v2/{repository}/manifests/main",
                           "application/vnd.docker.distribution.manifest.list.v2+json")
    assert listing.status_code == 200
    body = listing.json()
    assert body["mediaType"] == "application/vnd.docker.distribution.manifest.list.v2+json"
    assert [(m["platform"]["os"], m["platform"]["architecture"]) for m in body["manifests"]] == [
        ("linux", "amd64"), ("linux", "arm64")]
    assert listing.headers["docker-content-digest"] == published["digest"]
    pushed = {e["platform"]: e["data"]["digest"] for e in seen if e["name"] == "push_succeeded"}
    assert [m["digest"] for m in body["manifests"]] == [pushed[p] for p in PLATFORMS]

    assert run_image(services, f"{image}:main", "linux/amd64") == "x86_64"
    assert run_image(services, f"{image}:main", "linux/arm64") == "aarch64"
    log = database.read_sync(lambda c: telemetry.log_of(c, build.id))
    assert any("Step" in line["line"] and line["platform"] == "linux/arm64" for line in log)
    assert settings.registry_password.get_secret_value() not in json.dumps(log) + json.dumps(seen)


def _sleepers(client) -> list:
    """Running containers of the `RUN sleep 300` step (one list call: no per-container inspect
    that could race with the engine removing them)."""
    return [c for c in client.api.containers() if "sleep 300" in c.get("Command", "")]


def test_a_superseded_running_build_stops_its_docker_work(services, database, tmp_path):
    """Superseding a build stuck in a long RUN step stops the engine's work within seconds."""
    import time

    from bot.models import utcnow
    from bot.worker import Worker
    from tests.support import wait_until

    repo = make_repo(tmp_path / "srv", "acme/slow", {
        # a unique step, so no earlier run's cache can skip it
        "Dockerfile": f"FROM {services['IMAGEBOT_TEST_BASE_IMAGE']}\nRUN echo {uuid.uuid4().hex} && sleep 300\n"})
    client = docker.from_env()
    with GitHTTPServer(tmp_path / "srv") as server:
        request = queue.BuildRequest(
            provider="github", repo="acme/slow", clone_url=server.repo_url("acme/slow"), ref="refs/heads/main",
            sha=repo.head(), kind=BuildKind.branch, trigger="push", default_branch="main")
        info = queue.DeliveryInfo("github", "slow-1", "push", None, "acme/slow")
        first = database.write_sync(lambda c: queue.record_delivery(c, info, request, ["linux/amd64"], utcnow()))
        settings = settings_for(services, database, platforms=["linux/amd64"])
        hub = Telemetry(database)

        async def go():
            worker = Worker(database, settings, Pipeline(settings, hub), bus=hub.bus)
            task = asyncio.create_task(worker.run_one(first.build_id))
            async with asyncio.timeout(300):
                while not _sleepers(client):
                    assert not task.done(), f"the build ended before its RUN step: {task.result()}"
                    await asyncio.sleep(0.1)  # polling the engine for the step to start
            newer = queue.DeliveryInfo("github", "slow-2", "push", None, "acme/slow")
            second = database.write_sync(lambda c: queue.record_delivery(
                c, newer, request, ["linux/amd64"], utcnow()))
            assert second.superseded == [first.build_id]
            stopped_at = time.monotonic()
            worker.stop_builds(second.superseded)
            outcome = await task
            return outcome, time.monotonic() - stopped_at

        outcome, took = asyncio.run(go())
    assert outcome.status.value == "superseded" and took < 10
    wait_until(lambda: not _sleepers(client), 30, "the engine to abandon the RUN step")
    names = [e["name"] for e in database.read_sync(lambda c: telemetry.events_of(c, first.build_id))]
    assert names[-1] == "build_cancelled" and "build_platform_succeeded" not in names


def _amd64_only_repo(tmp_path, services, config: str):
    files = {
        "Dockerfile": f"FROM {services['IMAGEBOT_TEST_BASE_IMAGE']}\n"
                      f"RUN echo {uuid.uuid4().hex} && [ \"$(uname -m)\" = x86_64 ]\nCMD [\"uname\", \"-m\"]\n",
    }
    if config:
        files[".imagebot.yml"] = config
    return make_repo(tmp_path / "srv", "acme/app", files)


@pytest.mark.parametrize("allow_partial", [True, False])
def test_a_failing_platform_fails_the_build_unless_partial_is_allowed(services, database, tmp_path, allow_partial):
    repo = _amd64_only_repo(tmp_path, services, "allow_partial: true\n" if allow_partial else "")
    with GitHTTPServer(tmp_path / "srv") as server:
        settings = settings_for(services, database)
        build = new_build(database, server, repo)
        outcome = run(settings, database, build)
    seen = events(database, build)
    failed = [e for e in seen if e["name"] == "build_platform_failed"]
    assert [e["platform"] for e in failed] == ["linux/arm64"]
    assert "returned a non-zero code" in failed[0]["data"]["message"]
    if allow_partial:
        assert outcome.status.value == "succeeded" and outcome.partial
        assert outcome.platforms == ("linux/amd64",)
        published = next(e for e in seen if e["name"] == "manifest_published")["data"]
        assert published["platforms"] == ["linux/amd64"] and published["partial"] is True
    else:
        assert (outcome.status.value, outcome.step, outcome.error_kind) == ("failed", "build", "build")
        assert outcome.error_message.startswith("linux/arm64: ")
        assert not [e for e in seen if e["name"].startswith("manifest_")]


def test_oci_image_index(services, database, forge):
    server, repo = forge
    settings = settings_for(services, database, manifest_format="oci")
    build = new_build(database, server, repo)
    assert run(settings, database, build).status.value == "succeeded"
    published = events(database, build)[-1]["data"]
    assert published["media_type"] == "application/vnd.oci.image.index.v1+json"
    repository = f"{settings.registry}/acme/app".split("/", 1)[1]
    index = registry_get(services, f"/v2/{repository}/manifests/main", "application/vnd.oci.image.index.v1+json")
    assert index.status_code == 200 and index.headers["content-type"] == "application/vnd.oci.image.index.v1+json"
    assert [m["platform"]["architecture"] for m in index.json()["manifests"]] == ["amd64", "arm64"]
    assert index.headers["docker-content-digest"] == published["digest"]
    assert run_image(services, f"{settings.registry}/acme/app:main", "linux/arm64") == "aarch64"


def test_the_registry_password_is_stored_nowhere(services, database, tmp_path):
    # (operator build secrets: tests/test_pipeline_build_secrets.py)
    repo = make_repo(tmp_path / "srv", "acme/app", {
        "Dockerfile": f"FROM {services['IMAGEBOT_TEST_BASE_IMAGE']}\nRUN echo \"built {uuid.uuid4().hex}\"\n",
        ".imagebot.yml": "platforms: [linux/amd64]\n",
    })
    with GitHTTPServer(tmp_path / "srv") as server:
        settings = settings_for(services, database)
        build = new_build(database, server, repo)
        assert run(settings, database, build).status.value == "succeeded"
    stored = Path(database.url.removeprefix("sqlite:///"))
    database.close()
    raw = b"".join(p.read_bytes() for p in stored.parent.glob(stored.name + "*"))
    assert settings.registry_password.get_secret_value().encode() not in raw
