"""The pipeline when registries misbehave, against real registries and the real engine:
an outage mid-push, a password rotated mid-run, credentials that never work, a denied push,
a fork's pull request, and zero retries; and the same faults met by the build pulling its
base image from the registry. Faults are triggered by the pipeline's own telemetry (on
``tag_succeeded``, so the registry is down before the push starts)."""

from __future__ import annotations

import asyncio
import os

import docker
import pytest

from bot.models import BuildKind
from bot.pipeline.credentials import RegistryCredentials
from bot.pipeline.manifest import RegistryClient, manifest_list
from bot.pipeline.run import Pipeline
from bot.telemetry import Telemetry
from tests.standins.credential_helper import ENV_VAR, CredentialHelper
from tests.standins.git_http import GitHTTPServer, make_repo, multiarch_fixture_files
from tests.standins.registry import HtpasswdRegistry, TokenRegistry
from tests.support import make_settings, wait_until
from tests.test_pipeline_run import PLATFORMS, events, new_build, services  # noqa: F401 - fixtures

USER, PASSWORD = "bot", "first-password"


def seed_base(services: dict[str, str], host: str, user: str, password: str) -> str:
    """Copy the multi-arch base image into ``host`` (a private registry of the test)."""
    client = docker.from_env()
    source = services["IMAGEBOT_TEST_BASE_IMAGE"].rsplit(":", 1)[0]
    infra_auth = {"username": services["IMAGEBOT_TEST_REGISTRY_USERNAME"],
                  "password": services["IMAGEBOT_TEST_REGISTRY_PASSWORD"]}
    for arch in ("amd64", "arm64"):
        image = client.images.pull(source, tag=arch, platform=f"linux/{arch}", auth_config=infra_auth)
        image.tag(f"{host}/base/busybox", arch)
        for item in client.api.push(f"{host}/base/busybox", arch, stream=True, decode=True,
                                    auth_config={"username": user, "password": password}):
            assert "error" not in item, item

    async def publish():
        settings = make_settings(registry=host, registry_username=user, registry_password=password)
        registry = RegistryClient(host, RegistryCredentials(host, settings))
        try:
            described = [await registry.describe("base/busybox", arch, f"linux/{arch}") for arch in ("amd64", "arm64")]
            body, media_type = manifest_list(described)
            await registry.put_list("base/busybox", "latest", body, media_type)
        finally:
            await registry.aclose()

    asyncio.run(publish())
    return f"{host}/base/busybox:latest"


@pytest.fixture
def htpasswd_registry(tmp_path, services):
    with HtpasswdRegistry(tmp_path / "reg", users={USER: PASSWORD}) as registry:
        yield registry


@pytest.fixture
def token_registry(tmp_path, services):
    with TokenRegistry(tmp_path / "treg", users={USER: PASSWORD}) as registry:
        yield registry


def forge_for(tmp_path, base_image):
    repo = make_repo(tmp_path / "srv", "acme/app", multiarch_fixture_files(base_image))
    return GitHTTPServer(tmp_path / "srv"), repo


def run_with_chaos(settings, db, build, on_event):
    """Run the pipeline; ``on_event(name, event)`` is awaited for each event as it is published."""

    async def go():
        hub = Telemetry(db)
        subscription = hub.bus.subscribe()

        async def watch():
            async for message in subscription:
                if message["type"] == "event":
                    await on_event(message["event"]["name"], message["event"])

        watcher = asyncio.create_task(watch())
        try:
            return await Pipeline(settings, hub)(build)
        finally:
            watcher.cancel()

    return asyncio.run(go())


def settings_on(registry, db, **overrides):
    values = dict(registry=f"{registry.host}/it", registry_username=USER, registry_password=PASSWORD,
                  platforms=PLATFORMS, push_retries=4, retry_initial_seconds=0.2, retry_max_seconds=1.0)
    values.update(overrides)
    return make_settings(db.url, **values)


def test_registry_outage_during_push_is_retried(tmp_path, services, database, htpasswd_registry):
    base = seed_base(services, htpasswd_registry.host, USER, PASSWORD)
    server, repo = forge_for(tmp_path, base)
    state = {"stopped": False, "restarted": False}

    async def chaos(name, event):
        if name == "tag_succeeded" and not state["stopped"]:
            state["stopped"] = True
            htpasswd_registry.stop()
        if name == "push_retry" and not state["restarted"]:
            state["restarted"] = True
            await asyncio.to_thread(htpasswd_registry.start)

    with server:
        build = new_build(database, server, repo)
        outcome = run_with_chaos(settings_on(htpasswd_registry, database), database, build, chaos)
    assert outcome.status.value == "succeeded", outcome
    seen = events(database, build)
    retries = [e for e in seen if e["name"] == "push_retry"]
    assert retries and all(r["data"]["kind"] == "network" for r in retries)
    assert "connection refused" in retries[0]["data"]["detail"]
    pushed = [e for e in seen if e["name"] == "push_succeeded"]
    assert len(pushed) == 2 and max(e["data"]["attempts"] for e in pushed) >= 2
    assert seen[-1]["name"] == "manifest_published"


def test_password_rotated_mid_run_heals_through_the_credential_helper(
        tmp_path, services, database, htpasswd_registry, monkeypatch):
    base = seed_base(services, htpasswd_registry.host, USER, PASSWORD)
    server, repo = forge_for(tmp_path, base)
    helper = CredentialHelper(tmp_path / "creds.json", {htpasswd_registry.host: (USER, PASSWORD)})
    monkeypatch.setenv("PATH", helper.bin_dir + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv(ENV_VAR, str(helper.path))
    rotated = {"done": False}

    async def chaos(name, event):
        if name == "tag_succeeded" and not rotated["done"]:
            rotated["done"] = True
            htpasswd_registry.set_password(USER, "second-password")
            helper.set(htpasswd_registry.host, USER, "second-password")

    settings = settings_on(htpasswd_registry, database, registry_password=None,
                           registry_username=None, registry_credential_helper="imagebot-test")
    with server:
        build = new_build(database, server, repo)
        outcome = run_with_chaos(settings, database, build, chaos)
    assert outcome.status.value == "succeeded", outcome
    seen = events(database, build)
    names = [e["name"] for e in seen]
    assert "auth_refresh_succeeded" in names
    refresh = next(e for e in seen if e["name"] == "auth_refresh_succeeded")
    assert refresh["data"] == {"registry": htpasswd_registry.host, "source": "credential_helper", "changed": True}
    retry = next(e for e in seen if e["name"] == "push_retry")
    assert retry["data"]["kind"] == "auth" and retry["data"]["refreshed"] is True
    assert "second-password" not in str(seen) and PASSWORD not in str(seen)


def test_credentials_that_never_work_fail_with_auth(tmp_path, services, database, htpasswd_registry):
    base = seed_base(services, htpasswd_registry.host, USER, PASSWORD)
    server, repo = forge_for(tmp_path, base)

    async def chaos(name, event):
        if name == "tag_succeeded":
            htpasswd_registry.set_password(USER, "nobody-told-the-bot")

    with server:
        build = new_build(database, server, repo)
        outcome = run_with_chaos(settings_on(htpasswd_registry, database), database, build, chaos)
    assert (outcome.status.value, outcome.step, outcome.error_kind) == ("failed", "push", "auth")
    failed = [e for e in events(database, build) if e["name"] == "push_failed"]
    assert failed and all(e["data"]["kind"] == "auth" and e["data"]["attempts"] == 2 for e in failed)
    assert "unauthorized" in failed[0]["data"]["detail"]
    assert not [e for e in events(database, build) if e["name"].startswith("manifest_")]


def build_denied(tmp_path, services, database, token_registry, repository: str, action: str):
    """A build on the token registry, which denies ``action`` on ``repository``; (outcome, build)."""
    base = seed_base(services, token_registry.host, USER, PASSWORD)
    server, repo = forge_for(tmp_path, base)
    token_registry.deny(USER, repository, [action])
    with server:
        build = new_build(database, server, repo)
        outcome = run_with_chaos(settings_on(token_registry, database), database, build, lambda *a: asyncio.sleep(0))
    return outcome, build


def test_a_denied_push_fails_at_once(tmp_path, services, database, token_registry):
    outcome, build = build_denied(tmp_path, services, database, token_registry, "it/acme/app", "push")
    assert (outcome.status.value, outcome.error_kind) == ("failed", "denied")
    seen = events(database, build)
    assert not [e for e in seen if e["name"] == "push_retry"]
    failed = [e for e in seen if e["name"] == "push_failed"]
    assert failed and all(e["data"]["attempts"] == 1 and e["data"]["retries"] == 0 for e in failed)
    assert "requested access to the resource is denied" in failed[0]["data"]["detail"]


def test_a_fork_pull_request_pushes_nothing_and_never_sees_credentials(tmp_path, services, database, token_registry):
    base = seed_base(services, token_registry.host, USER, PASSWORD)
    server, repo = forge_for(tmp_path, base)
    token_registry.token_server.grant_anonymous("base/*")  # a public base image, like Docker Hub's
    before = len(token_registry.token_server.requests)
    with server:
        build = new_build(database, server, repo, ref="refs/pull/7/head", kind=BuildKind.pull_request,
                          pr_number=7, fork=True)
        outcome = run_with_chaos(settings_on(token_registry, database), database, build, lambda *a: asyncio.sleep(0))
    assert outcome.status.value == "succeeded", outcome
    seen = events(database, build)
    assert sorted(e["platform"] for e in seen if e["name"] == "push_skipped") == PLATFORMS
    assert not [e for e in seen if e["name"] in ("push_started", "tag_started", "manifest_started")]
    during = token_registry.token_server.requests[before:]
    assert during, "the build pulled its base image through the token server"
    assert all(request.user is None for request in during)  # anonymous: no credentials handed over
    assert "fork" in next(e for e in seen if e["name"] == "push_skipped")["data"]["reason"]


def test_zero_retries_means_one_attempt(tmp_path, services, database, htpasswd_registry):
    base = seed_base(services, htpasswd_registry.host, USER, PASSWORD)
    server, repo = forge_for(tmp_path, base)

    async def chaos(name, event):
        if name == "tag_succeeded":
            htpasswd_registry.stop()

    with server:
        build = new_build(database, server, repo)
        outcome = run_with_chaos(settings_on(htpasswd_registry, database, push_retries=0), database, build, chaos)
    assert (outcome.status.value, outcome.error_kind) == ("failed", "network")
    failed = [e for e in events(database, build) if e["name"] == "push_failed"]
    assert failed and all((e["data"]["attempts"], e["data"]["retries"]) == (1, 0) for e in failed)


def test_a_build_against_a_token_auth_registry(tmp_path, services, database, token_registry):
    """Bearer-token auth end to end: the engine's pushes and the bot's own manifest calls both
    get tokens from the realm, scoped to the repository."""
    base = seed_base(services, token_registry.host, USER, PASSWORD)
    server, repo = forge_for(tmp_path, base)
    before = len(token_registry.token_server.requests)
    with server:
        build = new_build(database, server, repo)
        outcome = run_with_chaos(settings_on(token_registry, database), database, build, lambda *a: asyncio.sleep(0))
    assert outcome.status.value == "succeeded", outcome
    assert events(database, build)[-1]["name"] == "manifest_published"
    scopes = [s for r in token_registry.token_server.requests[before:] if r.user == USER for s in r.scopes]
    assert any(s.startswith("repository:it/acme/app:") and "push" in s for s in scopes)


# -- the build's base image, in the same authenticated registry ---------------------------------


def rotate_once_the_bot_has_read(registry, helper, password: str) -> None:
    """The registry's password changes right after the bot read its credentials and before
    the build pulls its base: the registry was frozen (every pull waits for it), so once the
    credential helper has answered the bot, the password rotates, then the registry answers."""
    try:
        wait_until(lambda: any(c["action"] == "get" for c in helper.calls()), what="the bot to read its credentials")
        registry.set_password(USER, password)
        helper.set(registry.host, USER, password)
    finally:
        registry.thaw()


#: Settings that take the registry credentials from the test's credential helper.
FROM_HELPER = dict(registry_password=None, registry_username=None, registry_credential_helper="imagebot-test")


def use_helper(helper, monkeypatch) -> None:
    """Let the bot find ``docker-credential-imagebot-test`` and its file."""
    monkeypatch.setenv("PATH", helper.bin_dir + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv(ENV_VAR, str(helper.path))


def of(seen: list[dict], name: str) -> list[dict]:
    return [e for e in seen if e["name"] == name]


def test_password_rotated_before_the_base_image_pull_refreshes_and_builds_again(
        tmp_path, services, database, htpasswd_registry, monkeypatch):
    base = seed_base(services, htpasswd_registry.host, USER, PASSWORD)
    server, repo = forge_for(tmp_path, base)
    helper = CredentialHelper(tmp_path / "creds.json", {htpasswd_registry.host: (USER, PASSWORD)})
    use_helper(helper, monkeypatch)
    settings = settings_on(htpasswd_registry, database, **FROM_HELPER)
    htpasswd_registry.freeze()
    started = {"done": False}

    async def chaos(name, event):
        if name == "build_platform_started" and not started["done"]:
            started["done"] = True
            await asyncio.to_thread(rotate_once_the_bot_has_read, htpasswd_registry, helper, "second-password")

    with server:
        build = new_build(database, server, repo)
        outcome = run_with_chaos(settings, database, build, chaos)
    seen = events(database, build)
    assert outcome.status.value == "succeeded", (outcome, seen)
    retries = of(seen, "build_platform_retry")
    assert retries and all((r["data"]["kind"], r["data"]["refreshed"], r["data"]["delay_s"]) == ("auth", True, 0.0)
                           for r in retries)
    assert "unauthorized" in retries[0]["data"]["detail"]
    refreshes = of(seen, "auth_refresh_succeeded")
    assert refreshes[0]["platform"] in PLATFORMS
    assert refreshes[0]["data"] == {"registry": htpasswd_registry.host, "source": "credential_helper", "changed": True}
    for platform in {r["platform"] for r in retries}:
        mine = [e["name"] for e in seen if e["platform"] == platform]
        assert mine == ["build_platform_started", "auth_refresh_succeeded", "build_platform_retry",
                        "build_platform_succeeded", "tag_started", "tag_succeeded", "push_started",
                        "push_succeeded"], mine
    assert not of(seen, "push_retry") and seen[-1]["name"] == "manifest_published"
    assert "second-password" not in str(seen) and PASSWORD not in str(seen)


def test_a_denied_base_image_fails_the_build_at_once_with_auth(tmp_path, services, database, token_registry):
    outcome, build = build_denied(tmp_path, services, database, token_registry, "base/busybox", "pull")
    seen = events(database, build)
    assert (outcome.status.value, outcome.step, outcome.error_kind) == ("failed", "build", "auth"), outcome
    assert "requested access to the resource is denied" in outcome.error_message
    failed = of(seen, "build_platform_failed")
    assert sorted(e["platform"] for e in failed) == PLATFORMS
    assert all(e["data"]["kind"] == "auth" and "denied" in e["data"]["message"] for e in failed)
    assert not [e for e in seen if e["name"] in ("build_platform_retry", "auth_refresh_succeeded",
                                                 "auth_refresh_failed", "push_started")]


def test_a_base_image_still_refused_after_the_refresh_fails_at_once_with_auth(
        tmp_path, services, database, htpasswd_registry):
    base = seed_base(services, htpasswd_registry.host, USER, PASSWORD)
    server, repo = forge_for(tmp_path, base)
    htpasswd_registry.set_password(USER, "nobody-told-the-bot")
    with server:
        build = new_build(database, server, repo)
        outcome = run_with_chaos(settings_on(htpasswd_registry, database), database, build,
                                 lambda *a: asyncio.sleep(0))
    seen = events(database, build)
    assert (outcome.status.value, outcome.step, outcome.error_kind) == ("failed", "build", "auth"), outcome
    assert "unauthorized" in outcome.error_message
    refreshes = of(seen, "auth_refresh_succeeded")  # the same credentials again: no point building again
    assert refreshes and all(e["data"]["changed"] is False for e in refreshes)
    assert not of(seen, "build_platform_retry")
    assert all(e["data"]["kind"] == "auth" for e in of(seen, "build_platform_failed"))


def test_a_registry_outage_while_pulling_the_base_image_is_retried(tmp_path, services, database, htpasswd_registry):
    base = seed_base(services, htpasswd_registry.host, USER, PASSWORD)
    server, repo = forge_for(tmp_path, base)
    htpasswd_registry.stop()
    restarted = {"done": False}

    async def chaos(name, event):
        if name == "build_platform_retry" and not restarted["done"]:
            restarted["done"] = True
            await asyncio.to_thread(htpasswd_registry.start)

    with server:
        build = new_build(database, server, repo)
        outcome = run_with_chaos(settings_on(htpasswd_registry, database), database, build, chaos)
    seen = events(database, build)
    assert outcome.status.value == "succeeded", (outcome, seen)
    retries = of(seen, "build_platform_retry")
    assert retries and all((r["data"]["kind"], r["data"]["refreshed"]) == ("network", False) for r in retries)
    assert "connection refused" in retries[0]["data"]["detail"]
    assert not of(seen, "auth_refresh_succeeded") and seen[-1]["name"] == "manifest_published"
