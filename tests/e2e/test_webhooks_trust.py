"""Hostile deliveries against a real ``imagebot serve`` (issue 12, items 2 and 7).

* Clone URLs a signed delivery may carry that once reached ``git fetch`` (an option that runs a
  command, a local repository, another host): 400, no build, and no git process at all; git is
  observed through a wrapper first on the server's PATH that logs every invocation, and a
  good delivery afterwards, built by the same worker, shows the wrapper works.
* A GitLab delivery with a wrong token and a 20 MiB body: answered 401 before a byte of the
  body is sent (the token is a header; nothing obliges the bot to buffer what follows).
"""

from __future__ import annotations

import json
import shutil
import socket

import httpx
import pytest

from tests.e2e.test_processes import bot_env, build
from tests.standins.git_http import GitHTTPServer, make_repo
from tests.support import GITLAB_TOKEN, BotProcess, free_port, github_headers, github_payload, wait_until

pytestmark = pytest.mark.e2e


def _git_wrapper(tmp_path) -> tuple[str, object]:
    """A directory with a ``git`` that logs its arguments and runs the real git."""
    real = shutil.which("git")
    assert real is not None
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "git.log"
    wrapper = bin_dir / "git"
    wrapper.write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> "{log}"\nexec "{real}" "$@"\n')
    wrapper.chmod(0o755)
    return str(bin_dir), log


def _push(clone_url: str, sha: str) -> bytes:
    payload = github_payload("push.payload.4")  # derived: our repository, commit and URL
    payload["repository"].update(clone_url=clone_url, full_name="acme/app", default_branch="main")
    payload["after"], payload["ref"] = sha, "refs/heads/main"
    return json.dumps(payload).encode()


def test_bad_clone_urls_are_refused_before_any_git_process(tmp_path):
    import os

    # A repository whose build fails at its config, right after the fetch: no Docker needed.
    repo = make_repo(tmp_path / "srv", "acme/app", {".imagebot.yml": "nonsense_key: 1\n"})
    marker = tmp_path / "pwned"
    bin_dir, git_log = _git_wrapper(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with GitHTTPServer(tmp_path / "srv") as git:
        env = bot_env(f"sqlite:///{tmp_path / 'bot.db'}", IMAGEBOT_PLACEHOLDER_BUILD_SECONDS="0",
                      IMAGEBOT_GITHUB_URL=git.url, PATH=f"{bin_dir}:{os.environ['PATH']}")
        bot = BotProcess(["serve", "--port", str(port)], env, tmp_path / "bot.log").start()
        try:
            bot.wait_healthy(url)
            bad = {
                "option": f"--upload-pack=touch {marker}",
                "file": f"file://{tmp_path / 'srv' / 'acme' / 'app.git'}",
                "other host": "https://attacker.example/acme/app.git",
            }
            for which, clone_url in bad.items():
                body = _push(clone_url, repo.head())
                answer = httpx.post(f"{url}/webhooks/github", content=body,
                                    headers=github_headers("push", body, f"bad-{which}"))
                assert answer.status_code == 400, (which, answer.text)
                assert answer.json()["error"].endswith(
                    f"is not on {git.url}, the forge's URL (IMAGEBOT_GITHUB_URL)"), answer.text
            assert httpx.get(f"{url}/api/builds").json()["builds"] == []
            body = _push(git.repo_url("acme/app"), repo.head())
            answer = httpx.post(f"{url}/webhooks/github", content=body, headers=github_headers("push", body, "good"))
            assert answer.status_code == 201, answer.text
            done = wait_until(lambda: (b := build(url, answer.json()["build_id"]))["status"] == "failed" and b,
                              timeout=120, what="the good build to fail at its config")
        finally:
            bot.stop()
    assert done["error"]["kind"] == "config", done
    invocations = git_log.read_text().splitlines()
    assert any(git.repo_url("acme/app") in line for line in invocations), invocations
    for line in invocations:
        assert "upload-pack" not in line and "file:" not in line and "attacker" not in line, line
    assert not marker.exists()


def test_gitlab_wrong_token_is_refused_before_the_body_is_read(tmp_path):
    """20 MiB announced, none sent: the answer comes anyway, so the bot never waited for it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = bot_env(f"sqlite:///{tmp_path / 'bot.db'}", IMAGEBOT_GITLAB_WEBHOOK_TOKEN=GITLAB_TOKEN)
    bot = BotProcess(["serve", "--port", str(port), "--no-worker"], env, tmp_path / "bot.log").start()
    try:
        bot.wait_healthy(url)
        size = 20 * 1024 * 1024
        head = (f"POST /webhooks/gitlab HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {size}\r\n"
                f"X-Gitlab-Event: Push Hook\r\nX-Gitlab-Token: wrong\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
            sock.sendall(head)  # and not one byte of the body
            answer = b""
            while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
                chunk = sock.recv(65536)  # a server waiting for the body times this out
                if not chunk:
                    break
                answer += chunk
    finally:
        bot.stop()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 401 Unauthorized", answer
    assert json.loads(rest.partition(b"\r\n\r\n")[2]) == {"error": "X-Gitlab-Token is wrong", "kind": "token"}
