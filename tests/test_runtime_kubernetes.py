"""The Kubernetes runtime against a real single-node cluster (scripts/k8s), the real registry
and real git over HTTP: the same pipeline as the Docker runtime, each platform a Job."""

from __future__ import annotations

import asyncio
import json
import random
import signal
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bot import telemetry
from bot.runtimes import BuildJob, Source
from bot.runtimes.kubernetes import REGISTRY_KEY, KubernetesRuntime
from tests.k8s_cluster import Cluster, cluster, create_namespace, delete_namespace, expect, kubeconfig_for, poll
from tests.standins.git_http import GitHTTPServer, make_repo, multiarch_fixture_files
from tests.support import infra
from tests.e2e.test_reporting import github, key  # noqa: F401 - fixtures: the GitHub App stand-in
from tests.test_pipeline_run import (
    PLATFORMS,
    events,
    new_build,
    registry_get,
    run,
    run_image,
    settings_for,
)

pytestmark = pytest.mark.timeout(1800)  # the first test may build the cluster (about 5 min)
#: The node has two cores and every helper's test pods on it: requests that always fit (the
#: limits stay IMAGEBOT_BUILD_MEMORY_MB and IMAGEBOT_BUILD_CPUS).
SMALL_REQUESTS = {"requests": {"cpu": "100m", "memory": "128Mi"}}


@pytest.fixture(scope="module")
def k8s() -> Cluster:
    return cluster()


@pytest.fixture(scope="module")
def services(k8s: Cluster) -> dict[str, str]:
    """The env file read afresh once the components these tests use are up (the cluster's own
    snapshot of it predates any component another test started later, e.g. dev-base-image)."""
    return infra("docker", "registry", "binfmt", "base-image", "dev-base-image")


@pytest.fixture
def namespace(k8s: Cluster) -> Iterator[str]:
    name = create_namespace(k8s, "imagebot-builds")
    yield name
    delete_namespace(k8s, name)


@pytest.fixture
def bot_kubeconfig(k8s: Cluster, namespace: str, tmp_path: Path) -> Iterator[Path]:
    """The runtime runs as deploy/kubernetes' ServiceAccount, with exactly its Role's rights
    in the build namespace (the API server authorizes with RBAC): least privilege, proven."""
    from tests.test_deploy import apply_deploy_rbac

    bot_namespace = create_namespace(k8s, "imagebot-bot")
    token = apply_deploy_rbac(k8s, bot_namespace, namespace)
    yield kubeconfig_for(k8s, token, tmp_path / "bot.kubeconfig")
    delete_namespace(k8s, bot_namespace)


def k8s_settings(k8s: Cluster, services, database, namespace: str, kubeconfig: Path, **overrides):
    return settings_for(
        services, database, runtime="kubernetes", k8s_namespace=namespace, k8s_kubeconfig=kubeconfig,
        k8s_builder_image=k8s.builder_image, k8s_image_pull_policy="Never", k8s_host_network=True,
        k8s_registry_tls_verify=False, k8s_poll_seconds=0.2, k8s_resources=SMALL_REQUESTS, **overrides)


def jobs_and_pods(k8s: Cluster, namespace: str) -> tuple[list, list]:
    with k8s.client() as api:
        jobs = expect(api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs"))["items"]
        pods = expect(api.get(f"/api/v1/namespaces/{namespace}/pods"))["items"]
    return jobs, pods


def test_two_platforms_as_jobs_end_like_the_docker_runtime(k8s, services, database, namespace, bot_kubeconfig, tmp_path):
    repo = make_repo(tmp_path / "srv", "acme/app", multiarch_fixture_files(services["IMAGEBOT_TEST_BASE_IMAGE"]))
    with GitHTTPServer(tmp_path / "srv") as server:
        settings = k8s_settings(k8s, services, database, namespace, bot_kubeconfig)
        build = new_build(database, server, repo)
        outcome = run(settings, database, build)
    seen = events(database, build)
    assert outcome.status.value == "succeeded", (outcome.error_message, seen)
    for platform in PLATFORMS:
        mine = [e["name"] for e in seen if e["platform"] == platform]
        assert mine == ["build_platform_started", "build_platform_succeeded", "tag_started", "tag_succeeded",
                        "push_started", "push_succeeded"]
    image = f"{settings.registry}/acme/app"
    repository = image.split("/", 1)[1]
    listing = registry_get(services, f"/v2/{repository}/manifests/main",
                           "application/vnd.docker.distribution.manifest.list.v2+json")
    assert listing.status_code == 200, listing.text
    pushed = {e["platform"]: e["data"]["digest"] for e in seen if e["name"] == "push_succeeded"}
    assert [(m["platform"]["architecture"], m["digest"]) for m in listing.json()["manifests"]] == [
        ("amd64", pushed["linux/amd64"]), ("arm64", pushed["linux/arm64"])]
    assert run_image(services, f"{image}:main", "linux/amd64") == "x86_64"
    assert run_image(services, f"{image}:main", "linux/arm64") == "aarch64"
    poll(lambda: jobs_and_pods(k8s, namespace) == ([], []), 60, "Jobs and pods cleaned up")

    # the pod's log streamed into the build log, per platform, like a Docker build's
    lines = database.read_sync(lambda c: telemetry.log_of(c, build.id))
    for platform in PLATFORMS:
        mine = [line["line"] for line in lines if line["platform"] == platform]
        assert any("RUN uname -m" in line for line in mine), mine[-20:]

    # the telemetry contract: the same events with the same shapes as the Docker runtime's
    with GitHTTPServer(tmp_path / "srv") as server:
        docker_build = new_build(database, server, repo)
        docker_outcome = run(settings_for(services, database), database, docker_build)
    assert docker_outcome.status.value == "succeeded"
    assert shapes(events(database, docker_build)) == shapes(seen)


def shapes(seen: list[dict]) -> dict:
    """Per platform (None: the build as a whole), each event's name and the keys of its data."""
    by_platform: dict = {}
    for event in seen:
        by_platform.setdefault(event["platform"], []).append((event["name"], sorted(event["data"])))
    return by_platform


# -- registries that misbehave (the same cases as the Docker runtime's, tests/test_pipeline_failures.py) --


def run_watching(settings, db, build, on_message):
    """Run the pipeline; ``on_message`` sees every bus message (events and log lines) as published."""
    from bot.pipeline.run import Pipeline
    from bot.telemetry import Telemetry

    async def go():
        hub = Telemetry(db)
        subscription = hub.bus.subscribe(10_000)

        async def watch():
            async for message in subscription:
                await on_message(message)

        watcher = asyncio.create_task(watch())
        pipeline = Pipeline(settings, hub)
        try:
            return await pipeline(build)
        finally:
            watcher.cancel()
            await pipeline.runtime.close()

    return asyncio.run(go())


@pytest.fixture
def htpasswd_registry(tmp_path, services):
    from tests.standins.registry import HtpasswdRegistry
    from tests.test_pipeline_failures import PASSWORD, USER

    with HtpasswdRegistry(tmp_path / "reg", users={USER: PASSWORD}) as registry:
        yield registry


def private_forge(tmp_path, services, registry, *, password=None):
    from tests.test_pipeline_failures import PASSWORD, USER, seed_base

    base = seed_base(services, registry.host, USER, password or PASSWORD)
    repo = make_repo(tmp_path / "srv", "acme/app", multiarch_fixture_files(base))
    return GitHTTPServer(tmp_path / "srv"), repo


def on_registry(k8s, registry, database, namespace, kubeconfig, **overrides):
    from tests.test_pipeline_failures import PASSWORD, USER
    from tests.support import make_settings

    values = dict(registry=f"{registry.host}/it", registry_username=USER, registry_password=PASSWORD,
                  platforms=["linux/amd64"], push_retries=2, retry_initial_seconds=0.2, retry_max_seconds=1.0,
                  runtime="kubernetes", k8s_namespace=namespace, k8s_kubeconfig=kubeconfig,
                  k8s_builder_image=k8s.builder_image, k8s_image_pull_policy="Never", k8s_host_network=True,
                  k8s_registry_tls_verify=False, k8s_poll_seconds=0.2, k8s_resources=SMALL_REQUESTS)
    values.update(overrides)
    return make_settings(database.url, **values)


def secrets_left(k8s: Cluster, namespace: str) -> list[str]:
    """The Secrets of the build namespace: each build's goes with its Job."""
    with k8s.client() as api:
        return [s["metadata"]["name"] for s in expect(api.get(f"/api/v1/namespaces/{namespace}/secrets"))["items"]
                if s["type"] != "kubernetes.io/service-account-token"]


def log_lines(database, build) -> list[str]:
    return [line["line"] for line in database.read_sync(lambda c: telemetry.log_of(c, build.id))]


def test_password_rotated_mid_run_patches_the_secret_and_heals(
        k8s, services, database, namespace, bot_kubeconfig, tmp_path, htpasswd_registry, monkeypatch):
    import os

    from tests.standins.credential_helper import ENV_VAR, CredentialHelper
    from tests.test_pipeline_failures import PASSWORD, USER

    server, repo = private_forge(tmp_path, services, htpasswd_registry)
    helper = CredentialHelper(tmp_path / "creds.json", {htpasswd_registry.host: (USER, PASSWORD)})
    monkeypatch.setenv("PATH", helper.bin_dir + os.pathsep + os.environ["PATH"])
    monkeypatch.setenv(ENV_VAR, str(helper.path))
    pulled: set[str] = set()

    async def chaos(message):
        # once both platforms have pulled their base (they are at the RUN step), and before
        # the second one pushes, the password changes
        if message["type"] == "log" and any("RUN uname" in line for line in message["lines"]) and len(pulled) < 2:
            pulled.add(message["platform"])
            if len(pulled) == 2:
                htpasswd_registry.set_password(USER, "second-password")
                helper.set(htpasswd_registry.host, USER, "second-password")

    settings = on_registry(k8s, htpasswd_registry, database, namespace, bot_kubeconfig, registry_password=None,
                           registry_username=None, registry_credential_helper="imagebot-test")
    with server:
        build = new_build(database, server, repo)
        outcome = run_watching(settings, database, build, chaos)
    seen = events(database, build)
    assert outcome.status.value == "succeeded", (outcome.error_message, seen)
    retries = [e for e in seen if e["name"] == "push_retry"]
    assert retries and all((e["platform"] in PLATFORMS, e["data"]["kind"]) == (True, "auth") for e in retries)
    # a platform may have pushed before the rotation (the trigger waits for both to reach RUN,
    # and the quicker one may be done by then); each that met it refreshed, retried, pushed
    for platform in {e["platform"] for e in retries}:
        mine = [e["name"] for e in seen if e["platform"] == platform]
        assert mine.index("auth_refresh_succeeded") < mine.index("push_retry") < mine.index("push_succeeded"), mine
    assert any(e["data"]["refreshed"] for e in retries)
    refresh = next(e for e in seen if e["name"] == "auth_refresh_succeeded")
    assert refresh["platform"] in PLATFORMS and refresh["data"]["changed"] is True
    # the build's own Secret was patched for the next attempt (the registry now refuses the old
    # password: the push that succeeded had the new one), and went with its Job
    assert "imagebot: registry credentials updated for the next push attempt" in log_lines(database, build)
    poll(lambda: not secrets_left(k8s, namespace), 60, "the per-build Secrets deleted")
    assert "second-password" not in json.dumps(seen) and PASSWORD not in json.dumps(seen)


def test_credentials_that_never_work_fail_with_auth_after_bounded_attempts(
        k8s, services, database, namespace, bot_kubeconfig, tmp_path, htpasswd_registry):
    from tests.test_pipeline_failures import USER

    server, repo = private_forge(tmp_path, services, htpasswd_registry)

    pulled: set[str] = set()

    async def chaos(message):  # as above: after both platforms pulled their base
        if message["type"] == "log" and any("RUN uname" in line for line in message["lines"]) and len(pulled) < 2:
            pulled.add(message["platform"])
            if len(pulled) == 2:
                htpasswd_registry.set_password(USER, "nobody-told-the-bot")

    with server:
        build = new_build(database, server, repo)
        outcome = run_watching(on_registry(k8s, htpasswd_registry, database, namespace, bot_kubeconfig, push_retries=1),
                               database, build, chaos)
    assert (outcome.status.value, outcome.step, outcome.error_kind) == ("failed", "push", "auth")
    # (a platform that pushed before the password changed succeeds; the rest fail)
    failed = [e for e in events(database, build) if e["name"] == "push_failed"]
    assert failed and all((e["platform"] in PLATFORMS, e["data"]["kind"], e["data"]["attempts"]) == (True, "auth", 2)
                          for e in failed)
    assert all("unauthorized" in e["data"]["detail"] for e in failed)
    poll(lambda: jobs_and_pods(k8s, namespace) == ([], []), 60, "the Job deleted after giving up")


def build_denied(k8s, services, database, namespace, bot_kubeconfig, tmp_path, repository: str, action: str):
    """A build on a token registry that denies ``action`` on ``repository``; (outcome, build)."""
    from tests.standins.registry import TokenRegistry
    from tests.test_pipeline_failures import PASSWORD, USER

    with TokenRegistry(tmp_path / "treg", users={USER: PASSWORD}) as registry:
        server, repo = private_forge(tmp_path, services, registry)
        registry.deny(USER, repository, [action])
        with server:
            build = new_build(database, server, repo)
            outcome = run_watching(on_registry(k8s, registry, database, namespace, bot_kubeconfig), database, build,
                                   lambda m: asyncio.sleep(0))
    return outcome, build


def test_a_denied_push_fails_at_once(k8s, services, database, namespace, bot_kubeconfig, tmp_path):
    outcome, build = build_denied(k8s, services, database, namespace, bot_kubeconfig, tmp_path, "it/acme/app", "push")
    assert (outcome.status.value, outcome.error_kind) == ("failed", "denied"), outcome
    seen = events(database, build)
    assert not [e for e in seen if e["name"] == "push_retry"]
    failed = [e for e in seen if e["name"] == "push_failed"]
    assert failed and all((e["data"]["kind"], e["data"]["attempts"]) == ("denied", 1) for e in failed)


def test_each_build_pod_reads_only_its_own_registry_credentials_across_processes(
        k8s, services, database, namespace, bot_kubeconfig):
    """Two bot processes, three trusted builds for two registry hosts, each build's pod made
    by the runtime and read back from the API server: each step reads credentials for its own
    build's host only (one shared Secret held whichever host was written last, and a process
    skipped writing what it believed was there already); each goes with its Job."""
    from pydantic import SecretStr

    from bot.pipeline.credentials import Credentials
    from tests.test_runtime_kubernetes_spec import registry_of

    settings = k8s_settings(k8s, services, database, namespace, bot_kubeconfig)
    first, second = KubernetesRuntime(settings), KubernetesRuntime(settings)

    def job_for(host: str) -> BuildJob:
        root = Path("/checkout")
        build_id = random.randrange(900_000, 1_000_000)
        return BuildJob(root, root / "Dockerfile", "linux/amd64", None, {}, {},
                        pull_credentials={host: Credentials(f"user-{host}", SecretStr(f"password-{host}"))},
                        image=f"{host}/acme/app:{build_id}-linux-amd64", build_id=build_id,
                        source=Source(root, "http://127.0.0.1:9/acme/app.git", "a" * 40, "refs/heads/main", None, ""),
                        push=True, trusted=True)

    async def go() -> dict[str, set[str]]:
        started = []
        for runtime, host in ((first, "a.example"), (second, "b.example"), (first, "a.example")):
            job = job_for(host)
            await runtime._start(f"imagebot-{job.build_id}-linux-amd64", job, lambda lines: asyncio.sleep(0))
            started.append((runtime, job))
        with k8s.client() as api:
            stored = {s["metadata"]["name"]: s for s in expect(api.get(f"/api/v1/namespaces/{namespace}/secrets"))["items"]}
            seen = {}
            for _, job in started:
                name = f"imagebot-{job.build_id}-linux-amd64"
                manifest = expect(api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}"))
                host = next(iter(job.pull_credentials))
                seen[f"{host} {name}"] = registry_of(manifest, stored)
        for runtime, job in started:
            await runtime.release(job.image)
        await first.close()
        await second.close()
        return seen

    for build, steps in asyncio.run(go()).items():
        host = build.split()[0]
        assert steps == {"fetch": set(), "build": {host}, "push": {host}}, (build, steps)
    poll(lambda: not secrets_left(k8s, namespace) and not jobs_and_pods(k8s, namespace)[0], 60,
         "every build's Secret and Job deleted")


# -- the build's base image in the same registry (the Docker runtime's: tests/test_pipeline_failures.py) --


def released(k8s: Cluster, namespace: str) -> bool:
    """The bot let go of everything: no Job is left and every pod is being deleted. (How soon
    the kubelet then removes a pod whose build step failed varies from seconds to a minute on
    this 1.20 node, independent of the bot; that is the cluster's business.)"""
    jobs, pods = jobs_and_pods(k8s, namespace)
    return not jobs and all(p["metadata"].get("deletionTimestamp") for p in pods)


def test_password_rotated_before_the_base_image_pull_patches_the_secret_and_builds_again(
        k8s, services, database, namespace, bot_kubeconfig, tmp_path, htpasswd_registry, monkeypatch):
    from tests.standins.credential_helper import CredentialHelper
    from tests.test_pipeline_failures import FROM_HELPER, PASSWORD, USER, rotate_once_the_bot_has_read, use_helper

    server, repo = private_forge(tmp_path, services, htpasswd_registry)
    helper = CredentialHelper(tmp_path / "creds.json", {htpasswd_registry.host: (USER, PASSWORD)})
    use_helper(helper, monkeypatch)
    settings = on_registry(k8s, htpasswd_registry, database, namespace, bot_kubeconfig, **FROM_HELPER)
    htpasswd_registry.freeze()  # the pods' pulls wait until the password has changed
    started = {"done": False}

    async def chaos(message):
        if message["type"] == "event" and message["event"]["name"] == "build_platform_started" and not started["done"]:
            started["done"] = True
            await asyncio.to_thread(rotate_once_the_bot_has_read, htpasswd_registry, helper, "second-password")

    with server:
        build = new_build(database, server, repo)
        outcome = run_watching(settings, database, build, chaos)
    seen = events(database, build)
    assert outcome.status.value == "succeeded", (outcome.error_message, seen)
    retries = [e for e in seen if e["name"] == "build_platform_retry"]
    assert retries and all((e["platform"] in PLATFORMS, e["data"]["kind"], e["data"]["refreshed"]) == (True, "auth", True)
                           for e in retries)
    assert "unauthorized" in retries[0]["data"]["detail"]
    names = [e["name"] for e in seen]
    assert names.index("auth_refresh_succeeded") < names.index("build_platform_retry") < names.index("push_succeeded")
    assert next(e for e in seen if e["name"] == "auth_refresh_succeeded")["data"]["changed"] is True
    assert not [e for e in seen if e["name"] == "push_retry"]  # the push ran with the new credentials
    assert "imagebot: registry credentials updated for the next build run" in log_lines(database, build)
    assert "second-password" not in json.dumps(seen) and PASSWORD not in json.dumps(seen)
    poll(lambda: jobs_and_pods(k8s, namespace) == ([], []), 60, "Jobs and pods cleaned up")
    assert not secrets_left(k8s, namespace)


def test_a_denied_base_image_fails_the_build_at_once_with_auth(
        k8s, services, database, namespace, bot_kubeconfig, tmp_path):
    outcome, build = build_denied(k8s, services, database, namespace, bot_kubeconfig, tmp_path, "base/busybox", "pull")
    seen = events(database, build)
    assert (outcome.status.value, outcome.step, outcome.error_kind) == ("failed", "build", "auth"), outcome
    assert "requested access to the resource is denied" in outcome.error_message
    failed = [e for e in seen if e["name"] == "build_platform_failed"]
    assert failed and all(e["data"]["kind"] == "auth" for e in failed)
    assert not [e for e in seen if e["name"] in ("build_platform_retry", "auth_refresh_succeeded",
                                                 "auth_refresh_failed", "push_started")]
    poll(lambda: released(k8s, namespace), 60, "the Jobs deleted after giving up")


def test_a_failing_run_step_is_the_builds_failure_whatever_it_prints(
        k8s, services, database, namespace, bot_kubeconfig, tmp_path):
    files = {"Dockerfile": f"FROM {services['IMAGEBOT_TEST_BASE_IMAGE']}\n"
                           "RUN echo 'unauthorized: authentication required' && exit 3\n",
             ".imagebot.yml": "platforms: [linux/amd64]\n"}
    repo = make_repo(tmp_path / "srv", "acme/app", files)
    settings = k8s_settings(k8s, services, database, namespace, bot_kubeconfig)
    with GitHTTPServer(tmp_path / "srv") as server:
        build = new_build(database, server, repo)
        outcome = run(settings, database, build)
    assert (outcome.status.value, outcome.step, outcome.error_kind) == ("failed", "build", "build"), outcome
    assert "the build step exited 3" in outcome.error_message and "RUN echo" in outcome.error_message
    assert not [e for e in events(database, build) if e["name"] == "build_platform_retry"]
    poll(lambda: released(k8s, namespace), 60, "the Jobs deleted")


def test_a_platform_no_node_can_run_fails_clearly_in_time(k8s, services, database, namespace, bot_kubeconfig, tmp_path):
    repo = make_repo(tmp_path / "srv", "acme/app", multiarch_fixture_files(services["IMAGEBOT_TEST_BASE_IMAGE"]))
    settings = k8s_settings(k8s, services, database, namespace, bot_kubeconfig, platforms=["linux/arm64"],
                            k8s_node_selectors={"linux/arm64": {"kubernetes.io/arch": "arm64"}},
                            k8s_schedule_timeout_seconds=3)
    with GitHTTPServer(tmp_path / "srv") as server:
        build = new_build(database, server, repo)
        started = asyncio.get_event_loop_policy().new_event_loop().time()
        outcome = run(settings, database, build)
    assert (outcome.status.value, outcome.step, outcome.error_kind) == ("failed", "build", "unschedulable")
    assert "no node runs linux/arm64" in outcome.error_message and "node(s) didn't match" in outcome.error_message
    assert started is not None
    poll(lambda: jobs_and_pods(k8s, namespace) == ([], []), 60, "the Job deleted")


def test_a_cancelled_build_leaves_no_job_or_pod(k8s, services, database, namespace, bot_kubeconfig, tmp_path):
    from bot.pipeline.run import Pipeline
    from bot.telemetry import Telemetry

    files = {"Dockerfile": f"FROM {services['IMAGEBOT_TEST_BASE_IMAGE']}\nRUN sleep 300\n"}
    repo = make_repo(tmp_path / "srv", "acme/app", files)
    settings = k8s_settings(k8s, services, database, namespace, bot_kubeconfig, platforms=["linux/amd64"])

    async def go():
        pipeline = Pipeline(settings, Telemetry(database))
        task = asyncio.create_task(pipeline(build))
        def building(pod) -> bool:
            return any(s["name"] == "build" and (s.get("state") or {}).get("running")
                       for s in pod["status"].get("initContainerStatuses") or [])

        while not any(building(p) for p in jobs_and_pods(k8s, namespace)[1]):
            assert not task.done(), task.result()
            await asyncio.sleep(0.2)  # polling the cluster for the pod to run
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await pipeline.runtime.close()

    with GitHTTPServer(tmp_path / "srv") as server:
        build = new_build(database, server, repo)
        asyncio.run(go())
    poll(lambda: jobs_and_pods(k8s, namespace) == ([], []), 30, "the Job and its pod gone")


# -- a worker restart adopts the Jobs in flight ----------------------------------------------------


def test_kill_9_mid_build_then_restart_adopts_the_jobs_and_reports(
        k8s, services, namespace, bot_kubeconfig, tmp_path, github, key):
    """Served, with GitHub App reporting: a kill -9 mid-build, a restart that adopts the Jobs,
    and the commit's statuses and check run carrying the per-platform telemetry."""
    import threading

    from tests.e2e.test_reporting import app_env, deliver, push_payload, statuses
    from tests.support import BotProcess, free_port, wait_until

    files = {"Dockerfile": f"FROM {services['IMAGEBOT_TEST_BASE_IMAGE']}\nRUN sleep 4 && uname -m > /arch\n"}
    repo = make_repo(tmp_path / "srv", "acme/app", files)
    seen: dict[str, set[str]] = {}
    watching = threading.Event()

    def watch() -> None:  # every Job ever created in the namespace, by name and uid
        while not watching.is_set():
            for job in jobs_and_pods(k8s, namespace)[0]:
                seen.setdefault(job["metadata"]["name"], set()).add(job["metadata"]["uid"])
            watching.wait(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with GitHTTPServer(tmp_path / "srv") as git:
        env = {
            **app_env(tmp_path, key, github, f"sqlite:///{tmp_path / 'bot.db'}"),
            "IMAGEBOT_PLATFORMS": "linux/amd64,linux/arm64",
            "IMAGEBOT_REGISTRY": f"{services['IMAGEBOT_TEST_REGISTRY']}/kill{free_port()}",
            "IMAGEBOT_REGISTRY_USERNAME": services["IMAGEBOT_TEST_REGISTRY_USERNAME"],
            "IMAGEBOT_REGISTRY_PASSWORD": services["IMAGEBOT_TEST_REGISTRY_PASSWORD"],
            "IMAGEBOT_RUNTIME": "kubernetes", "IMAGEBOT_K8S_NAMESPACE": namespace,
            "IMAGEBOT_K8S_KUBECONFIG": str(bot_kubeconfig), "IMAGEBOT_K8S_BUILDER_IMAGE": k8s.builder_image,
            "IMAGEBOT_K8S_IMAGE_PULL_POLICY": "Never", "IMAGEBOT_K8S_HOST_NETWORK": "true",
            "IMAGEBOT_K8S_REGISTRY_TLS_VERIFY": "false", "IMAGEBOT_K8S_POLL_SECONDS": "0.2",
            "IMAGEBOT_K8S_RESOURCES": json.dumps(SMALL_REQUESTS),
            "IMAGEBOT_GITHUB_URL": git.url,  # the forge the delivery's clone URL must be on
        }
        bot = BotProcess(["serve", "--port", str(port)], env, tmp_path / "bot.log").start()
        try:
            bot.wait_healthy(url)
            answer = deliver(url, "push", push_payload(git.repo_url("acme/app"), repo.head()), "k8s-kill-1")
            build_id = answer.json()["build_id"]
            wait_until(lambda: len(seen) == 2, timeout=60, what="both platforms' Jobs")
            bot.stop(signal.SIGKILL)
        finally:
            bot.stop()
        bot = BotProcess(["serve", "--port", str(port)], env, tmp_path / "bot2.log").start()
        try:
            bot.wait_healthy(url)
            done = wait_until(lambda: (b := httpx.get(f"{url}/api/builds/{build_id}").json())["status"]
                              in ("succeeded", "failed") and b, timeout=300, what="the build to end")
            run = wait_until(lambda: next((r for r in github.check_runs.values() if r["status"] == "completed"),
                                          None), what="the completed check run")
            pushed = {e["platform"]: e["data"]["digest"] for e in
                      httpx.get(f"{url}/api/builds/{build_id}/events").json()["events"] if e["name"] == "push_succeeded"}
        finally:
            bot.stop()
    poll(lambda: jobs_and_pods(k8s, namespace) == ([], []), 60, "Jobs and pods cleaned up")
    watching.set()
    watcher.join()
    assert done["status"] == "succeeded" and done["attempts"] == 2, (done, bot.log()[-3000:])
    assert sorted(seen) == [f"imagebot-{build_id}-linux-amd64", f"imagebot-{build_id}-linux-arm64"]
    assert all(len(uids) == 1 for uids in seen.values()), seen  # adopted, never started again
    from bot import telemetry
    from bot.db import Database

    db = Database(f"sqlite:///{tmp_path / 'bot.db'}")
    try:
        lines = [line["line"] for line in db.read_sync(lambda c: telemetry.log_of(c, build_id))]
    finally:
        db.close()
    assert sum("adopting Job" in line for line in lines) == 2
    assert [state for state, _ in statuses(github, repo.head())] == ["pending", "pending", "pending", "success"]
    assert run["conclusion"] == "success" and len(github.check_runs) == 1
    for platform in ("linux/amd64", "linux/arm64"):
        row = next(line for line in run["output"]["summary"].splitlines() if line.startswith(f"| `{platform}`"))
        assert pushed[platform] in row and "pushed" in row


# -- the layer cache (IMAGEBOT_K8S_LAYER_CACHE_DIR) -------------------------------------------------


def tree(root: Path) -> set[str]:
    """Every path below ``root``: anything buildah writes into its storage adds some."""
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_a_rebuild_reuses_cached_layers_and_a_fork_neither_reads_nor_writes_them(
        k8s, services, database, namespace, bot_kubeconfig, tmp_path):
    files = {"Dockerfile": f"FROM {services['IMAGEBOT_DEV_BASE_IMAGE']}\nARG TARGETARCH\n"
                           "RUN date +%s%N > /stamp && echo \"$TARGETARCH\" > /arch\n"
                           "COPY version.txt /version.txt\n",
             "version.txt": "1\n", ".imagebot.yml": "platforms: [linux/amd64]\n"}
    repo = make_repo(tmp_path / "srv", "acme/app", files)
    cache = tmp_path / "layer-cache"  # on the node: the kubelet runs on this machine
    settings = k8s_settings(k8s, services, database, namespace, bot_kubeconfig, platforms=["linux/amd64"],
                            k8s_layer_cache_dir=str(cache))
    repository = f"{settings.registry}/acme/app".split("/", 1)[1]

    def build_once(**kw):
        with GitHTTPServer(tmp_path / "srv") as server:
            build = new_build(database, server, repo, **kw)
            outcome = run(settings, database, build)
        assert outcome.status.value == "succeeded", (outcome.error_message, events(database, build))
        lines = [line["line"] for line in database.read_sync(lambda c: telemetry.log_of(c, build.id))]
        return build, lines

    def step_cached(lines: list[str], step: str) -> bool:
        at = next(i for i, line in enumerate(lines) if "STEP " in line and step in line)
        following = next((line for line in lines[at + 1:] if line.startswith("--> ") or "STEP " in line), "")
        return following.startswith("--> Using cache")

    def layers(build) -> list[str]:
        digest = next(e["data"]["digest"] for e in events(database, build) if e["name"] == "push_succeeded")
        manifest = registry_get(services, f"/v2/{repository}/manifests/{digest}",
                                "application/vnd.oci.image.manifest.v1+json")
        assert manifest.status_code == 200, manifest.text
        return [layer["digest"] for layer in manifest.json()["layers"]]

    cold, cold_log = build_once()
    assert not any("Using cache" in line for line in cold_log), cold_log
    assert [p.name for p in cache.iterdir()] == [Path(KubernetesRuntime(settings).layer_cache_path(
        BuildJob(Path("."), Path("Dockerfile"), "linux/amd64", None, {}, {}, push=True,
                 image=f"{settings.registry}/acme/app:x",  # the key: the repository, not the image
                 source=Source(Path("."), "http://127.0.0.1:1/acme/app.git", "", "", None, "")))).name]

    # the same repository again, with only the last layer's input changed: every step before
    # it is a cache hit, and the RUN that writes a timestamp gives the very same layer
    repo.commit({"version.txt": "2\n"})
    warm, warm_log = build_once()
    assert step_cached(warm_log, "RUN date") and not step_cached(warm_log, "COPY version.txt"), warm_log
    before, after = layers(cold), layers(warm)
    assert len(before) == len(after) and before[:-1] == after[:-1] and before[-1] != after[-1]

    # a fork's pull request: its pod (unprivileged, no token, no credentials, no secrets)
    # builds from empty storage, and leaves the cache as it was
    untouched = tree(cache)
    repo.commit({"version.txt": "3\n", "Dockerfile": files["Dockerfile"] + "RUN cat /proc/self/uid_map\n"})
    with GitHTTPServer(tmp_path / "srv") as server:
        fork_log = build_as_a_fork(k8s, namespace, settings, server, repo)
    assert any("COPY version.txt" in line for line in fork_log), fork_log
    assert not any("Using cache" in line for line in fork_log), fork_log
    assert tree(cache) == untouched
    # its RUN steps ran as root of buildah's user namespace only: uid 100000 of the node
    assert any(line.split() == ["0", "100000", "65536"] for line in fork_log), fork_log
    poll(lambda: jobs_and_pods(k8s, namespace) == ([], []), 60, "Jobs and pods cleaned up")


FORK_TOKEN = "ghs_forkNeverSeesThisToken0000000000000"
FORK_SECRET = "an-operator-build-secret-a-fork-never-gets"


def build_as_a_fork(k8s: Cluster, namespace: str, settings, server, repo) -> list[str]:
    """A fork's pull request, built by the very Job and Secret the runtime makes for it, with one
    change: host network. This node's pods have no other network (its CNI is loopback only), and
    the runtime never puts a fork there; on a real cluster the pod network takes its place. The
    runtime is handed a token and a build secret anyway, to show it drops them. The build log."""
    from pydantic import SecretStr

    from bot.runtimes import Source

    root = Path("/checkout")
    job = BuildJob(root, root / "Dockerfile", "linux/amd64", None, {"TARGETARCH": "amd64"}, {},
                   image=f"{settings.registry}/acme/app:fork-linux-amd64", build_id=random.randrange(900_000, 1_000_000),
                   source=Source(root, server.repo_url("acme/app"), repo.head(), "refs/heads/main",
                                 SecretStr(FORK_TOKEN), "x-access-token"),
                   push=False, trusted=False, secrets={"NPM_TOKEN": FORK_SECRET})
    runtime = KubernetesRuntime(settings)
    name = f"imagebot-fork-{job.build_id}"
    secret, manifest = runtime.job_secret(name, job), runtime.job_manifest(name, job)
    pod_spec = manifest["spec"]["template"]["spec"]
    assert pod_spec["hostNetwork"] is False  # what the runtime asks for (settings say true)
    pod_spec["hostNetwork"] = True  # what this node needs for any network at all
    with k8s.client() as api:
        expect(api.post(f"/api/v1/namespaces/{namespace}/secrets", json=secret), 201)
        expect(api.post(f"/apis/batch/v1/namespaces/{namespace}/jobs", json=manifest), 201)
        done = poll(lambda: (j := expect(api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")))
                    ["status"].get("succeeded") or j["status"].get("failed"), 180, "the fork's Job to end")
        pod = expect(api.get(f"/api/v1/namespaces/{namespace}/pods", params={"labelSelector": f"job-name={name}"}))
        pod = pod["items"][0]
        log = api.get(f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}/log",
                      params={"container": "build"}).text.splitlines()
        stored = expect(api.get(f"/api/v1/namespaces/{namespace}/secrets/{name}"))["data"]
        expect(api.delete(f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}",
                          params={"propagationPolicy": "Background"}))
        expect(api.delete(f"/api/v1/namespaces/{namespace}/secrets/{name}"))
    assert done and pod["status"]["phase"] == "Succeeded", (pod["status"], log[-20:])
    # what the cluster ran: no token, credentials or secrets anywhere, nothing privileged
    assert not [k for k in stored if k.startswith(("GIT_", "secret."))]
    text = json.dumps([pod["spec"], stored])
    assert FORK_TOKEN not in text and FORK_SECRET not in text and REGISTRY_KEY not in text
    for container in pod["spec"]["initContainers"] + pod["spec"]["containers"]:
        context = container["securityContext"]
        assert context["privileged"] is False and context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"]
        assert not [e for e in container.get("env", []) if "valueFrom" in e] and not container.get("envFrom")
    return log


# -- limits: deadlines and memory (issue 13, items 1 and 3) ----------------------------------------


def test_deadlines_end_a_build_timeout_and_memory_past_the_limit_fails_it_out_of_memory(
        k8s, services, database, namespace, bot_kubeconfig, tmp_path):
    base = services["IMAGEBOT_TEST_BASE_IMAGE"]

    def build(dockerfile: str, **limits):
        root = tmp_path / f"srv-{len(list(tmp_path.glob('srv-*')))}"
        repo = make_repo(root, "acme/app", {"Dockerfile": f"FROM {base}\n{dockerfile}",
                                            ".imagebot.yml": "platforms: [linux/amd64]\n"})
        settings = k8s_settings(k8s, services, database, namespace, bot_kubeconfig, **limits)
        with GitHTTPServer(root) as server:
            outcome = run(settings, database, new_build(database, server, repo))
        poll(lambda: jobs_and_pods(k8s, namespace) == ([], []), 60, "the Job and its pod deleted")
        return outcome

    # the whole build's deadline is the Job's activeDeadlineSeconds
    late = build("RUN sleep 300\n", build_deadline_seconds=12)
    assert (late.status.value, late.step, late.error_kind) == ("failed", "build", "timeout"), late
    # the Job's activeDeadlineSeconds, or the pipeline's whole-build deadline a moment before it
    assert "12" in late.error_message and "deadline" in late.error_message.lower(), late.error_message
    # one build run's own deadline: pulls and build (the Job's is later)
    slow = build("RUN sleep 301\n", build_timeout_seconds=4, pull_timeout_seconds=4)
    assert (slow.status.value, slow.step, slow.error_kind) == ("failed", "build", "timeout"), slow
    assert "did not finish in 8 s" in slow.error_message and "RUN sleep 301" in slow.error_message
    # memory: the container's limit, and the kernel's OOM killer past it
    hungry = build("RUN x=$(head -c 600000000 /dev/zero | tr '\\0' a) && echo ${#x}\n", build_memory_mb=256)
    assert (hungry.status.value, hungry.step, hungry.error_kind) == ("failed", "build", "build"), hungry
    assert "out of memory" in hungry.error_message and "256 MiB" in hungry.error_message, hungry.error_message


def test_a_trusted_build_mounts_operator_build_secrets_as_files_and_no_credential_is_in_its_env(
        k8s, services, database, namespace, bot_kubeconfig, tmp_path):
    """BuildJob.secrets reach a trusted build's RUN --mount=type=secret (buildah --secret, files of
    the per-build Secret), and neither they nor the token are in the build step's environment."""
    from pydantic import SecretStr

    from bot.runtimes import Source

    import hashlib

    value = "operator-secret-for-RUN-mount-only"
    digest = hashlib.sha256(value.encode()).hexdigest()
    files = {"Dockerfile": f"FROM {services['IMAGEBOT_DEV_BASE_IMAGE']}\n"
                           "RUN --mount=type=secret,id=NPM_TOKEN test \"$(sha256sum < /run/secrets/NPM_TOKEN | cut -c1-64)\" = "
                           f"{digest} && ! env | grep -q -f /run/secrets/NPM_TOKEN -e ghs_ -e Authorization "
                           "&& echo secret-seen\n"}
    repo = make_repo(tmp_path / "srv", "acme/app", files)
    settings = k8s_settings(k8s, services, database, namespace, bot_kubeconfig, platforms=["linux/amd64"])
    root = Path("/checkout")
    lines: list[str] = []

    async def sink(batch: list[str]) -> None:
        lines.extend(batch)

    async def go(job: BuildJob) -> str:
        runtime = KubernetesRuntime(settings)
        try:
            return await runtime.build(job, sink)
        finally:
            await runtime.release(job.image)
            await runtime.close()

    with GitHTTPServer(tmp_path / "srv") as server:
        job = BuildJob(root, root / "Dockerfile", "linux/amd64", None, {}, {}, trusted=True,
                       image=f"{settings.registry}/acme/app:secret-linux-amd64", build_id=random.randrange(10**6, 10**7),
                       source=Source(root, server.repo_url("acme/app"), repo.head(), "refs/heads/main",
                                     SecretStr("ghs_" + "t" * 36), "x-access-token"),
                       secrets={"NPM_TOKEN": value})
        assert asyncio.run(go(job)) == job.image
    assert "secret-seen" in lines, lines[-20:]
    assert not any(value in line for line in lines)
    poll(lambda: jobs_and_pods(k8s, namespace) == ([], []), 60, "the Job and its pod deleted")
