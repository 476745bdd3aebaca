"""Reporting with real ``imagebot serve`` processes and the GitHub stand-in (every request
checked against GitHub's official schemas): a real two-platform build reported as statuses and
a check run, secrets found nowhere, a ``kill -9`` with reports owed, and re-runs."""

from __future__ import annotations

import json
import signal
import uuid
from pathlib import Path

import httpx
import pytest

from tests.standins.git_http import GitHTTPServer, make_repo
from tests.support import (
    GITHUB_SECRET,
    BotProcess,
    app_key,
    free_port,
    github_headers,
    github_app_standin,
    github_payload,
    infra,
    private_pem,
    wait_until,
)

pytestmark = pytest.mark.e2e

APP_ID = 4711
INSTALLATION = 777


@pytest.fixture(scope="module")
def key():
    return app_key()


@pytest.fixture
def github(key):
    with github_app_standin(key, APP_ID) as standin:
        yield standin
        standin.assert_no_violations()


def app_env(tmp_path: Path, key, github, db_url: str, **extra: str) -> dict[str, str]:
    key_file = tmp_path / "app.pem"
    key_file.write_text(private_pem(key))
    return {
        "IMAGEBOT_DATABASE_URL": db_url,
        "IMAGEBOT_GITHUB_WEBHOOK_SECRET": GITHUB_SECRET,
        "IMAGEBOT_GITHUB_API_URL": github.url,
        # the web URL the deliveries' clone URLs are on (the first test's is its git server)
        "IMAGEBOT_GITHUB_URL": "https://github.example",
        "IMAGEBOT_GITHUB_APP_ID": str(APP_ID),
        "IMAGEBOT_GITHUB_PRIVATE_KEY_PATH": str(key_file),
        "IMAGEBOT_PUBLIC_URL": "https://imagebot.example",
        "IMAGEBOT_POLL_SECONDS": "0.1",
        "IMAGEBOT_LEASE_SECONDS": "2",
        "IMAGEBOT_SHUTDOWN_GRACE_SECONDS": "0",
        "IMAGEBOT_REPORT_RETRY_INITIAL_SECONDS": "0.05",
        "IMAGEBOT_REPORT_RETRY_MAX_SECONDS": "0.3",
        "IMAGEBOT_REPORT_INTERVAL_SECONDS": "1",
        **extra,
    }


def push_payload(clone_url: str, sha: str, ref: str = "refs/heads/main") -> dict:
    payload = github_payload("push.payload.4")
    payload["repository"].update(clone_url=clone_url, full_name="acme/app", default_branch="main")
    payload["after"], payload["ref"] = sha, ref
    payload["installation"] = {"id": INSTALLATION, "node_id": "MDIzOkludGVncmF0aW9uSW5zdGFsbGF0aW9uNzc3"}
    return payload


def deliver(url: str, event: str, payload: dict, delivery: str) -> httpx.Response:
    body = json.dumps(payload).encode()
    return httpx.post(f"{url}/webhooks/github", content=body, headers=github_headers(event, body, delivery))


def statuses(github, sha: str) -> list[tuple[str, str]]:
    return [(s["state"], s["target_url"].rsplit("/", 1)[1]) for s in github.statuses.get(("acme", "app", sha), [])]


def test_a_real_two_platform_build_is_reported_and_no_secret_leaks(tmp_path, github, key):
    services = infra("docker", "registry", "binfmt", "base-image")
    build_arg = "build-arg-secret-6c1f0e"
    base = services["IMAGEBOT_TEST_BASE_IMAGE"]
    files = {
        # the operator's build secret is used in an earlier stage only (the final image's history
        # must not carry it); the step is unique, so the layer cache never hides its output
        "Dockerfile": (f"FROM {base} AS uses-secret\nARG TOKEN\n"
                       f"RUN echo \"{uuid.uuid4().hex} token is $TOKEN\"\n"
                       f"FROM {base}\nRUN uname -m > /arch\n"
                       "CMD [\"cat\", \"/arch\"]\n"),
        ".imagebot.yml": "secrets: [TOKEN]\n",
    }
    secrets_file = tmp_path / "build-secrets.yml"
    secrets_file.write_text(f"acme/app: {{TOKEN: {build_arg}}}\n")
    repo = make_repo(tmp_path / "srv", "acme/app", files)
    issued = lambda token: token in github.installation_tokens  # noqa: E731 - the App's own tokens only
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    db_path = tmp_path / "bot.db"
    with GitHTTPServer(tmp_path / "srv", username="x-access-token", password=issued) as git:
        env = app_env(tmp_path, key, github, f"sqlite:///{db_path}",
                      IMAGEBOT_PLATFORMS="linux/amd64,linux/arm64",
                      IMAGEBOT_REGISTRY=f"{services['IMAGEBOT_TEST_REGISTRY']}/rep{free_port()}",
                      IMAGEBOT_REGISTRY_USERNAME=services["IMAGEBOT_TEST_REGISTRY_USERNAME"],
                      IMAGEBOT_REGISTRY_PASSWORD=services["IMAGEBOT_TEST_REGISTRY_PASSWORD"],
                      IMAGEBOT_BUILD_SECRETS_FILE=str(secrets_file), IMAGEBOT_GITHUB_URL=git.url)
        bot = BotProcess(["serve", "--port", str(port)], env, tmp_path / "bot.log").start()
        try:
            bot.wait_healthy(url)
            answer = deliver(url, "push", push_payload(git.repo_url("acme/app"), repo.head()), "rep-1")
            assert answer.status_code == 201, answer.text
            build_id = answer.json()["build_id"]
            wait_until(lambda: statuses(github, repo.head())[-1:] in ([("success", str(build_id))],
                                                                     [("failure", str(build_id))],
                                                                     [("error", str(build_id))]),
                       timeout=300, what="the final status")
            run = wait_until(lambda: next((r for r in github.check_runs.values() if r["status"] == "completed"), None),
                             what="the completed check run")
            events = httpx.get(f"{url}/api/builds/{build_id}/events").json()["events"]
            api = json.dumps([httpx.get(f"{url}{path}").json() for path in (
                "/api/builds", f"/api/builds/{build_id}", f"/api/builds/{build_id}/events")])
        finally:
            bot.stop()
    log = bot.log()
    assert [s for s, _ in statuses(github, repo.head())] == ["pending", "pending", "success"], log[-3000:]
    assert run["conclusion"] == "success" and run["head_sha"] == repo.head()
    summary = run["output"]["summary"]
    pushed = {e["platform"]: e["data"] for e in events if e["name"] == "push_succeeded"}
    for platform in ("linux/amd64", "linux/arm64"):
        row = next(line for line in summary.splitlines() if line.startswith(f"| `{platform}`"))
        assert pushed[platform]["digest"] in row and "| 1 | 0 |" in row  # one attempt, no retries
    published = next(e["data"] for e in events if e["name"] == "manifest_published")
    assert f"`{published['digest']}`" in summary
    assert "token is ***" in run["output"]["text"]  # the log tail, masked
    # git fetched with an installation token of the App, never anonymously
    assert git.requests and all(r.auth_present and r.username == "x-access-token" for r in git.requests
                                if r.status == 200)

    secrets = {
        "webhook secret": GITHUB_SECRET,
        "build secret": build_arg,
        "registry password": services["IMAGEBOT_TEST_REGISTRY_PASSWORD"],
        "private key": private_pem(key).splitlines()[1],
        **{f"installation token {n}": t for n, t in enumerate(github.installation_tokens)},
    }
    reported = json.dumps([r.json for r in github.requests])
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("bot.db*"))
    for name, secret in secrets.items():
        assert secret not in reported, f"{name} reached GitHub"
        assert secret not in log, f"{name} reached the log"
        assert secret.encode() not in stored, f"{name} reached the database"
        assert secret not in api, f"{name} reached the API"
    assert secrets.keys() >= {"installation token 0"}


def test_kill_9_with_reports_owed_then_restart_delivers_each_once_in_order(db_url, tmp_path, github, key):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = app_env(tmp_path, key, github, db_url, IMAGEBOT_PLACEHOLDER_BUILD_SECONDS="0.1")
    shas = [f"{n:x}" * 40 for n in (10, 11, 12)]
    outage = [github.server_error(503, path_regex="/statuses/|/check-runs", count=10**6),
              github.too_many_requests(retry_after=1, path_regex="/statuses/", count=2)]
    bot = BotProcess(["serve", "--port", str(port)], env, tmp_path / "bot.log").start()
    try:
        bot.wait_healthy(url)
        ids = []
        for n, sha in enumerate(shas):
            answer = deliver(url, "push", push_payload("https://github.example/acme/app.git", sha,
                                                      f"refs/heads/b{n}"), f"kill-{n}")
            ids.append(answer.json()["build_id"])
        wait_until(lambda: all(httpx.get(f"{url}/api/builds/{i}").json()["status"] == "succeeded" for i in ids),
                   what="the builds to end")
        wait_until(lambda: sum(r.faulted for r in github.requests) >= 6, what="reports retried in the outage")
        bot.stop(signal.SIGKILL)
    finally:
        bot.stop()
    assert not github.statuses and not github.check_runs  # nothing got through before the kill
    outage[0].remaining = 0  # the outage ends; a 429 with retry-after is still to come
    bot = BotProcess(["serve", "--port", str(port)], env, tmp_path / "bot2.log").start()
    try:
        bot.wait_healthy(url)
        wait_until(lambda: all(len(statuses(github, sha)) == 3 for sha in shas), timeout=60,
                   what="every status delivered")
        wait_until(lambda: sum(r["status"] == "completed" for r in github.check_runs.values()) == 3,
                   what="every check run completed")
    finally:
        bot.stop()
    for build_id, sha in zip(ids, shas, strict=True):
        assert statuses(github, sha) == [("pending", str(build_id)), ("pending", str(build_id)),
                                         ("success", str(build_id))]
    assert len(github.check_runs) == 3  # one per build: none created twice
    assert sum(r.status == 429 for r in github.requests) == 2


def test_rerequested_and_retry_build_again_on_a_fresh_check_run(tmp_path, github, key):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = app_env(tmp_path, key, github, f"sqlite:///{tmp_path / 'bot.db'}",
                  IMAGEBOT_PLACEHOLDER_BUILD_SECONDS="0.1")
    sha = "ab" * 20
    bot = BotProcess(["serve", "--port", str(port)], env, tmp_path / "bot.log").start()
    try:
        bot.wait_healthy(url)
        assert deliver(url, "push", push_payload("https://github.example/acme/app.git", sha), "rr-0").status_code == 201
        first = wait_until(lambda: next((r for r in github.check_runs.values() if r["status"] == "completed"), None),
                           what="the first check run")
        rerun = github_payload("check_run.rerequested.7")
        rerun["check_run"].update(head_sha=sha, id=first["id"])
        rerun["check_run"]["check_suite"].update(head_sha=sha, head_branch="main", pull_requests=[])
        rerun["repository"].update(full_name="acme/app", clone_url="https://github.example/acme/app.git")
        rerun["installation"] = {"id": INSTALLATION}
        assert deliver(url, "check_run", rerun, "rr-1").status_code == 201
        retry = github_payload("check_run.requested_action.6")
        retry["check_run"].update(head_sha=sha, id=first["id"])
        retry["check_run"]["check_suite"].update(head_sha=sha, head_branch="main", pull_requests=[])
        retry["repository"].update(full_name="acme/app", clone_url="https://github.example/acme/app.git")
        retry["installation"] = {"id": INSTALLATION}
        retry["requested_action"] = {"identifier": "retry"}
        wait_until(lambda: sum(r["status"] == "completed" for r in github.check_runs.values()) == 2,
                   what="the re-run's check run")
        assert deliver(url, "check_run", retry, "rr-2").status_code == 201
        wait_until(lambda: sum(r["status"] == "completed" for r in github.check_runs.values()) == 3,
                   what="the retry's check run")
        builds = httpx.get(f"{url}/api/builds?sha={sha}").json()["builds"]
    finally:
        bot.stop()
    assert sorted(b["trigger"] for b in builds) == ["check_run", "check_run", "push"]
    runs = sorted(github.check_runs.values(), key=lambda r: r["id"])
    assert [r["external_id"] for r in runs] == [str(b["id"]) for b in sorted(builds, key=lambda b: b["id"])]
    assert all(r["conclusion"] == "success" and r["head_sha"] == sha for r in runs)
