"""Hostile repositories against a real ``imagebot serve`` (with its worker): an alias-bomb
.imagebot.yml, a Dockerfile of a million blank lines, a .dockerignore that is /dev/zero.
Each build must fail fast with its kind while ``/healthz`` keeps answering: nothing of it
may run on the event loop or read without bound."""

from __future__ import annotations

import shutil
import time
import uuid

import httpx
import pytest

from bot import queue
from bot.db import Database
from bot.models import BuildKind, utcnow
from tests.standins.git_http import GitHTTPServer, make_repo
from tests.support import GITHUB_SECRET, BotProcess, free_port, infra
from tests.test_pipeline_config import alias_list_bomb, merge_key_bomb

pytestmark = pytest.mark.e2e

#: /healthz must answer each probe within this (the bench measures the real figure, ~ms)
HEALTH_DEADLINE = 2.0


@pytest.fixture(scope="module")
def bot(tmp_path_factory, sqlite_template):
    """One bot process for all hostile builds: SQLite, the Docker runtime, amd64 only."""
    infra("docker", "dev-registry", "dev-base-image")
    work = tmp_path_factory.mktemp("hostile")
    path = work / "bot.db"
    shutil.copy(sqlite_template, path)
    url = f"sqlite:///{path}"
    port = free_port()
    env = {"IMAGEBOT_DATABASE_URL": url, "IMAGEBOT_GITHUB_WEBHOOK_SECRET": GITHUB_SECRET,
           "IMAGEBOT_POLL_SECONDS": "0.1", "IMAGEBOT_PLATFORMS": "linux/amd64", "IMAGEBOT_CONCURRENCY": "1"}
    process = BotProcess(["serve", "--port", str(port)], env, work / "bot.log").start()
    base = f"http://127.0.0.1:{port}"
    try:
        process.wait_healthy(base)
        yield base, Database(url), work, process
    finally:
        process.stop()


def hostile(name: str) -> dict[str, str | bytes]:
    files: dict[str, str | bytes] = {"Dockerfile": "FROM scratch\nLABEL a=b\n"}
    if name == "merge-key-bomb":
        files[".imagebot.yml"] = merge_key_bomb()
    elif name == "alias-list-bomb":
        files[".imagebot.yml"] = alias_list_bomb()
    elif name == "blank-lines":
        files["Dockerfile"] = "\n" * 1_000_000 + "FROM scratch\nRUN true\n"  # no shell in scratch
    return files


@pytest.mark.parametrize(("name", "kind"), [
    ("merge-key-bomb", "config"), ("alias-list-bomb", "config"), ("blank-lines", "build"),
    ("dockerignore-dev-zero", "config")])
def test_a_hostile_build_fails_fast_while_healthz_keeps_answering(bot, tmp_path, name, kind):
    base, db, _, process = bot
    repo_name = f"evil/{name}"
    repo = make_repo(tmp_path / "srv", repo_name, hostile(name))
    if name == "dockerignore-dev-zero":
        symlink_commit(repo, ".dockerignore", "/dev/zero")
    root = tmp_path / "srv"
    with GitHTTPServer(root) as server:
        build_id = enqueue(db, server.repo_url(repo_name), repo_name, repo.head())
        started = time.monotonic()
        slowest, build = 0.0, {}
        while time.monotonic() - started < 60:
            probe = time.monotonic()
            response = httpx.get(f"{base}/healthz", timeout=HEALTH_DEADLINE)
            slowest = max(slowest, time.monotonic() - probe)
            assert response.status_code == 200
            build = httpx.get(f"{base}/api/builds/{build_id}", timeout=HEALTH_DEADLINE).json()
            if build["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.05)  # probing a condition with a deadline
        took = time.monotonic() - started
    error = build.get("error") or {}
    assert (build.get("status"), error.get("kind")) == ("failed", kind), (build, process.log()[-2000:])
    assert took < 30 and slowest < HEALTH_DEADLINE, (took, slowest)


def enqueue(db: Database, clone_url: str, repo: str, sha: str) -> int:
    request = queue.BuildRequest(provider="github", repo=repo, clone_url=clone_url, ref="refs/heads/main",
                                 sha=sha, kind=BuildKind.branch, trigger="push", default_branch="main",
                                 visibility="public")  # read anonymously below
    info = queue.DeliveryInfo("github", uuid.uuid4().hex, "push", None, repo)
    return db.write_sync(lambda c: queue.record_delivery(c, info, request, ["linux/amd64"], utcnow())).build_id


def symlink_commit(repo, path: str, target: str) -> None:
    """Commit ``path`` as a symlink to ``target`` (mode 120000, as git stores one)."""
    when = "1700000000 +0000"
    script = (f"commit refs/heads/{repo.default_branch}\ncommitter Evil <evil@example.com> {when}\n"
              f"data 9\na symlink\nfrom {repo.head()}\nM 120000 inline {path}\n"
              f"data {len(target)}\n{target}\ndone\n")
    repo.git("fast-import", "--quiet", "--done", "--force", input=script.encode())
