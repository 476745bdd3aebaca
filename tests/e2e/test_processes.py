"""Full flows with real ``imagebot`` processes over HTTP, on SQLite and PostgreSQL:
a ``kill -9`` mid-build loses nothing, SIGTERM is graceful, and the worker runs on its own."""

from __future__ import annotations

import json
import signal

import httpx
import pytest
from sqlalchemy import select

from bot.db import Database
from bot.models import builds

from tests.support import (
    GITHUB_SECRET,
    BotProcess,
    free_port,
    github_headers,
    github_payload,
    wait_until,
)

pytestmark = pytest.mark.e2e


def bot_env(db_url: str, **overrides: str) -> dict[str, str]:
    env = {
        "IMAGEBOT_DATABASE_URL": db_url,
        "IMAGEBOT_GITHUB_WEBHOOK_SECRET": GITHUB_SECRET,
        "IMAGEBOT_LEASE_SECONDS": "2",
        "IMAGEBOT_POLL_SECONDS": "0.1",
        "IMAGEBOT_PLACEHOLDER_BUILD_SECONDS": "0.2",
        "IMAGEBOT_SHUTDOWN_GRACE_SECONDS": "0",
    }
    env.update(overrides)
    return env


def push(url: str, delivery: str) -> int:
    body = json.dumps(github_payload("push.payload.4")).encode()
    response = httpx.post(f"{url}/webhooks/github", content=body, headers=github_headers("push", body, delivery))
    assert response.status_code == 201, response.text
    return response.json()["build_id"]


def build(url: str, build_id: int) -> dict:
    return httpx.get(f"{url}/api/builds/{build_id}").json()


def events(url: str, build_id: int) -> list[str]:
    return [e["name"] for e in httpx.get(f"{url}/api/builds/{build_id}/events").json()["events"]]


def test_kill_9_mid_build_then_restart_finishes_the_build(db_url, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["serve", "--port", str(port)]
    first = BotProcess(serve, bot_env(db_url, IMAGEBOT_PLACEHOLDER_BUILD_SECONDS="600"), tmp_path / "bot.log")
    first.start().wait_healthy(url)
    build_id = push(url, "crash-1")
    wait_until(lambda: build(url, build_id)["status"] == "running", what="the build to run")
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL

    second = BotProcess(serve, bot_env(db_url), tmp_path / "bot.log").start()
    try:
        second.wait_healthy(url)
        done = wait_until(
            lambda: (b := build(url, build_id))["status"] in ("succeeded", "failed") and b,
            what="the recovered build to finish",
        )
        recorded = httpx.get(f"{url}/api/builds/{build_id}/events").json()["events"]
        story = [e["name"] for e in recorded]
        attempts = [e["data"].get("attempt") for e in recorded]
    finally:
        second.stop()
    assert done["status"] == "succeeded" and done["attempts"] == 2
    log = second.log()
    assert f"requeued [{build_id}]" in log
    # the telemetry tells the story: two starts, the first without an end
    assert story == ["build_started", "build_started", "build_succeeded"]
    assert attempts[:2] == [1, 2]


def test_sigterm_gives_the_running_build_back(db_url, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    serve = ["serve", "--port", str(port)]
    bot = BotProcess(serve, bot_env(db_url, IMAGEBOT_PLACEHOLDER_BUILD_SECONDS="600"), tmp_path / "bot.log")
    bot.start().wait_healthy(url)
    build_id = push(url, "term-1")
    wait_until(lambda: build(url, build_id)["status"] == "running", what="the build to run")
    # uvicorn re-raises the signal it handled, so the exit status says "SIGTERM"
    assert bot.stop(signal.SIGTERM, timeout=30) in (0, -signal.SIGTERM)
    assert "given back to the queue at shutdown" in bot.log()
    assert "Application shutdown complete" in bot.log()
    database = Database(db_url)
    row = database.read_sync(lambda c: c.execute(select(builds).where(builds.c.id == build_id)).one())
    database.close()
    assert (row.status, row.attempts, row.lease_owner) == ("queued", 0, None)

    again = BotProcess(serve, bot_env(db_url), tmp_path / "bot.log").start()
    try:
        again.wait_healthy(url)
        done = wait_until(lambda: (b := build(url, build_id))["status"] == "succeeded" and b, what="success")
    finally:
        again.stop()
    assert done["attempts"] == 1  # a graceful hand-back does not count as an attempt


def test_no_worker_server_and_a_separate_worker(db_url, tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = BotProcess(["serve", "--port", str(port), "--no-worker"], bot_env(db_url), tmp_path / "s.log")
    server.start().wait_healthy(url)
    worker = None
    try:
        build_id = push(url, "split-1")
        assert build(url, build_id)["status"] == "queued"
        worker = BotProcess(["worker"], bot_env(db_url), tmp_path / "w.log").start()
        wait_until(lambda: build(url, build_id)["status"] == "succeeded", what="the worker to build")
    finally:
        if worker:
            assert worker.stop(signal.SIGTERM) == 0
        server.stop()
    assert "worker" in worker.log() and "stopped" in worker.log()


def test_readme_run_command_with_only_a_webhook_secret(tmp_path):
    """`./scripts/run` as the README says: only the secret set, defaults for everything else."""
    import os
    import subprocess

    from tests.support import ROOT

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBOT_")}
    env["IMAGEBOT_GITHUB_WEBHOOK_SECRET"] = GITHUB_SECRET
    log = open(tmp_path / "run.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(ROOT / "scripts" / "run"), "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=log, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _healthy(url) or proc.poll() is not None, timeout=300, what="scripts/run to serve")
        assert proc.poll() is None, (tmp_path / "run.log").read_text()
        response = httpx.post(f"{url}/webhooks/github", content=b'{"zen": "hi", "hook_id": 1}',
                              headers=github_headers("ping", b'{"zen": "hi", "hook_id": 1}', "run-1"))
        assert response.status_code == 200 and response.json()["outcome"] == "ping"
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    assert (tmp_path / "imagebot.db").exists()  # the default SQLite database, in the caller's directory
    assert "using the local registry 127.0.0.1:5000" in (tmp_path / "run.log").read_text()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_concurrent_deliveries_with_redeliveries(db_url, tmp_path):
    """64 connections' worth of deliveries at once, a fifth of them redelivered: group commits
    keep every answer consistent, and each ref ends with exactly one queued build."""
    import asyncio
    import random

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = BotProcess(["serve", "--port", str(port), "--no-worker"], bot_env(db_url), tmp_path / "s.log")
    server.start().wait_healthy(url)
    rng = random.Random(7)
    refs = ("refs/heads/a", "refs/heads/b")
    bodies = {}  # each push its own commit: the same body under another id would be a replay
    for n in range(160):
        payload = github_payload("push.payload.4")
        payload["ref"], payload["after"] = rng.choice(refs), f"{n:040x}"
        bodies[f"c-{n}"] = json.dumps(payload).encode()
    sends = [(delivery, json.loads(body)["ref"]) for delivery, body in bodies.items()]
    sends += [rng.choice(sends[:160]) for _ in range(40)]
    rng.shuffle(sends)

    async def fire():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
            async def one(delivery, ref):
                body = bodies[delivery]
                response = await client.post("/webhooks/github", content=body,
                                             headers=github_headers("push", body, delivery))
                return delivery, ref, response.status_code, response.json()
            return await asyncio.gather(*(one(d, r) for d, r in sends))

    try:
        answers = asyncio.run(fire())
        builds_by_id = {b["id"]: b for b in httpx.get(f"{url}/api/builds?limit=200").json()["builds"]}
    finally:
        server.stop()
    firsts = {}
    for delivery, ref, status, body in answers:
        if not body["duplicate"]:
            assert status == 201 and delivery not in firsts
            firsts[delivery] = body["build_id"]
    assert len(firsts) == 160 and len(set(firsts.values())) == 160
    for delivery, _, status, body in answers:
        if body["duplicate"]:
            assert status == 200 and body["build_id"] == firsts[delivery]
    assert len(builds_by_id) == 160
    for ref in refs:
        statuses = [b["status"] for b in builds_by_id.values() if b["ref"] == ref]
        assert statuses.count("queued") == 1 and set(statuses) <= {"queued", "superseded"}


def test_webhook_to_published_image(tmp_path):
    """A signed push webhook to a real server: the worker fetches, builds both platforms, pushes
    and publishes; the API then shows the build and its telemetry."""
    from tests.standins.git_http import GitHTTPServer, make_repo, multiarch_fixture_files
    from tests.support import infra

    services = infra("docker", "registry", "binfmt", "base-image")
    repo = make_repo(tmp_path / "srv", "acme/app", multiarch_fixture_files(services["IMAGEBOT_TEST_BASE_IMAGE"]))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with GitHTTPServer(tmp_path / "srv") as git:
        env = bot_env(f"sqlite:///{tmp_path / 'bot.db'}", IMAGEBOT_PLACEHOLDER_BUILD_SECONDS="0",
                      IMAGEBOT_PLATFORMS="linux/amd64,linux/arm64",
                      IMAGEBOT_REGISTRY=f"{services['IMAGEBOT_TEST_REGISTRY']}/e2e{free_port()}",
                      IMAGEBOT_REGISTRY_USERNAME=services["IMAGEBOT_TEST_REGISTRY_USERNAME"],
                      IMAGEBOT_REGISTRY_PASSWORD=services["IMAGEBOT_TEST_REGISTRY_PASSWORD"],
                      IMAGEBOT_GITHUB_URL=git.url)
        bot = BotProcess(["serve", "--port", str(port)], env, tmp_path / "bot.log").start()
        try:
            bot.wait_healthy(url)
            payload = github_payload("push.payload.4")  # derived: our repo, our commit
            payload["repository"]["clone_url"] = git.repo_url("acme/app")
            payload["repository"]["full_name"] = "acme/app"
            payload["after"] = repo.head()
            payload["ref"] = "refs/heads/main"
            payload["repository"]["default_branch"] = "main"
            body = json.dumps(payload).encode()
            answer = httpx.post(f"{url}/webhooks/github", content=body, headers=github_headers("push", body, "e2e-1"))
            assert answer.status_code == 201, answer.text
            build_id = answer.json()["build_id"]
            done = wait_until(lambda: (b := build(url, build_id))["status"] in ("succeeded", "failed") and b,
                              timeout=300, what="the build to finish")
            names = events(url, build_id)
        finally:
            bot.stop()
    assert done["status"] == "succeeded", (done, bot.log()[-3000:])
    assert names[0] == "build_started" and names[-2:] == ["manifest_published", "build_succeeded"]
    assert names.count("push_succeeded") == 2
    assert services["IMAGEBOT_TEST_REGISTRY_PASSWORD"] not in bot.log()
