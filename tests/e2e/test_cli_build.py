"""`imagebot build` as a user runs it: a real process, real git over HTTP, the real engine
and registry; progress on stdout, a non-zero exit on failure."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest

from tests.standins.git_http import GitHTTPServer, make_repo, multiarch_fixture_files
from tests.support import ROOT, infra

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def services():
    return infra("docker", "registry", "binfmt", "base-image")


@pytest.fixture
def forge(tmp_path, services):
    repo = make_repo(tmp_path / "srv", "acme/app", multiarch_fixture_files(services["IMAGEBOT_TEST_BASE_IMAGE"]))
    with GitHTTPServer(tmp_path / "srv") as server:
        yield server, repo


def imagebot_build(services, tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBOT_")}
    env.update({
        "IMAGEBOT_DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "IMAGEBOT_REGISTRY": f"{services['IMAGEBOT_TEST_REGISTRY']}/cli{uuid.uuid4().hex[:6]}",
        "IMAGEBOT_REGISTRY_USERNAME": services["IMAGEBOT_TEST_REGISTRY_USERNAME"],
        "IMAGEBOT_REGISTRY_PASSWORD": services["IMAGEBOT_TEST_REGISTRY_PASSWORD"],
    })
    return subprocess.run([sys.executable, "-m", "bot.cli", "build", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_build_a_branch_for_two_platforms(services, forge, tmp_path):
    server, repo = forge
    result = imagebot_build(services, tmp_path, server.repo_url("acme/app"), "main",
                            "--platform", "linux/amd64,linux/arm64")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert out.splitlines()[0].startswith(f"build 1: acme/app refs/heads/main @ {repo.head()}")
    for platform in ("linux/amd64", "linux/arm64"):
        assert f"[{platform}] push_succeeded" in out
    assert "manifest_published" in out and "tags=['main', 'sha-" in out
    assert out.rstrip().endswith("build 1 succeeded (linux/amd64, linux/arm64)")
    assert services["IMAGEBOT_TEST_REGISTRY_PASSWORD"] not in out + result.stderr


def test_build_a_sha_without_pushing(services, forge, tmp_path):
    server, repo = forge
    first = repo.head()
    repo.commit({"hello.txt": "moved on\n"}, "second")
    result = imagebot_build(services, tmp_path, server.repo_url("acme/app"), first, "--no-push",
                            "--platform", "linux/amd64", "-v")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"@ {first}" in result.stdout and "push_skipped  reason=--no-push was given" in result.stdout
    assert "push_started" not in result.stdout
    assert "Step 1/" in result.stdout  # -v shows the build log


def test_a_failing_build_exits_1_with_the_reason(services, forge, tmp_path):
    server, repo = forge
    repo.commit({"Dockerfile": f"FROM {services['IMAGEBOT_TEST_BASE_IMAGE']}\nRUN exit 3\n"}, "broken")
    result = imagebot_build(services, tmp_path, server.repo_url("acme/app"), "main", "--platform", "linux/amd64")
    assert result.returncode == 1
    assert "build_platform_failed" in result.stdout
    assert "failed: build: build: linux/amd64: The command '/bin/sh -c exit 3' returned a non-zero code: 3" in result.stderr
    assert "Traceback" not in result.stderr


def test_an_unknown_ref_is_a_clear_error(services, forge, tmp_path):
    server, _ = forge
    result = imagebot_build(services, tmp_path, server.repo_url("acme/app"), "no-such-branch")
    assert result.returncode == 1
    assert "'no-such-branch' is neither a branch nor a tag" in result.stderr and "Traceback" not in result.stderr


def test_a_bad_platform_is_a_settings_error(services, forge, tmp_path):
    server, _ = forge
    result = imagebot_build(services, tmp_path, server.repo_url("acme/app"), "main", "--platform", "arm64")
    assert result.returncode == 2 and "IMAGEBOT_PLATFORMS: not os/arch[/variant]: arm64" in result.stderr
