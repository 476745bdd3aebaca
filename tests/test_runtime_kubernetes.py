"""The Kubernetes runtime against a real single-node cluster (scripts/k8s), the real registry
and real git over HTTP: the same pipeline as the Docker runtime, each platform a Job."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bot.runtimes.kubernetes import REGISTRY_SECRET, KubernetesRuntime
from tests.k8s_cluster import Cluster, cluster, create_namespace, delete_namespace, expect, poll
from tests.standins.git_http import GitHTTPServer, make_repo, multiarch_fixture_files
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


@pytest.fixture(scope="module")
def k8s() -> Cluster:
    return cluster()


@pytest.fixture(scope="module")
def services(k8s: Cluster) -> dict[str, str]:
    return k8s.env


@pytest.fixture
def namespace(k8s: Cluster) -> Iterator[str]:
    name = create_namespace(k8s, "imagebot-builds")
    yield name
    delete_namespace(k8s, name)


@pytest.fixture
def database(sqlite_template, tmp_path):
    import shutil

    from bot.db import Database

    path = tmp_path / "k.db"
    shutil.copy(sqlite_template, path)
    db = Database(f"sqlite:///{path}")
    yield db
    db.close()


def k8s_settings(k8s: Cluster, services, database, namespace: str, **overrides):
    return settings_for(
        services, database, runtime="kubernetes", k8s_namespace=namespace, k8s_kubeconfig=k8s.kubeconfig,
        k8s_builder_image=k8s.builder_image, k8s_image_pull_policy="Never", k8s_host_network=True,
        k8s_registry_tls_verify=False, k8s_poll_seconds=0.2, **overrides)


def jobs_and_pods(k8s: Cluster, namespace: str) -> tuple[list, list]:
    with k8s.client() as api:
        jobs = expect(api.get(f"/apis/batch/v1/namespaces/{namespace}/jobs"))["items"]
        pods = expect(api.get(f"/api/v1/namespaces/{namespace}/pods"))["items"]
    return jobs, pods


def test_two_platforms_as_jobs_end_like_the_docker_runtime(k8s, services, database, namespace, tmp_path):
    repo = make_repo(tmp_path / "srv", "acme/app", multiarch_fixture_files(services["IMAGEBOT_TEST_BASE_IMAGE"]))
    with GitHTTPServer(tmp_path / "srv") as server:
        settings = k8s_settings(k8s, services, database, namespace)
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
