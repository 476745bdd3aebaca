"""Helpers the tests share: starting real services, settings, signed webhook requests."""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from bot.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
WEBHOOKS = DATA / "webhooks"
GITHUB_SECRET = "test-webhook-secret"
GITLAB_TOKEN = "test-gitlab-token"


# -- real services ----------------------------------------------------------------------------


def infra(*components: str) -> dict[str, str]:
    """Start ``components`` with scripts/infra (idempotent) and return its env file."""
    result = subprocess.run(
        [str(ROOT / "scripts" / "infra"), "up", *components],
        capture_output=True, text=True, timeout=1800,
    )
    if result.returncode != 0:
        pytest.fail(f"scripts/infra up {' '.join(components)} failed:\n{result.stderr[-3000:]}")
    env = subprocess.run(
        [str(ROOT / "scripts" / "infra"), "env"], capture_output=True, text=True, check=True
    ).stdout
    return dict(line.split("=", 1) for line in env.splitlines() if "=" in line)


def make_settings(db_url: str = "sqlite:///:memory:", **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "database_url": db_url,
        "github_webhook_secret": GITHUB_SECRET,
        "gitlab_webhook_token": GITLAB_TOKEN,
        "platforms": ["linux/amd64", "linux/arm64"],
        # GitLab's documented sample payloads (tests/data/webhooks/gitlab) come from this host;
        # their clone URLs must be on IMAGEBOT_GITLAB_URL.
        "gitlab_url": "http://example.com",
        "_env_file": None,
    }
    values.update(overrides)
    return Settings(**values)


# -- webhook payloads -------------------------------------------------------------------------


def github_payload(name: str) -> dict[str, Any]:
    return json.loads((WEBHOOKS / "github" / f"{name}.json").read_text())


def gitlab_payload(name: str) -> dict[str, Any]:
    return json.loads((WEBHOOKS / "gitlab" / f"{name}.json").read_text())


def sign(body: bytes, secret: str = GITHUB_SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def github_headers(event: str, body: bytes, delivery: str, **extra: str) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "x-github-event": event,
        "x-github-delivery": delivery,
        "x-hub-signature-256": sign(body),
        **extra,
    }


def post_github(client: TestClient, event: str, payload: dict[str, Any] | bytes, delivery: str):
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return client.post("/webhooks/github", content=body, headers=github_headers(event, body, delivery))


def post_gitlab(
    client: TestClient, event: str, payload: dict[str, Any], delivery: str | None = None,
    token: str = GITLAB_TOKEN,
):
    headers = {"content-type": "application/json", "x-gitlab-event": event, "x-gitlab-token": token}
    if delivery is not None:
        headers["idempotency-key"] = delivery
    return client.post("/webhooks/gitlab", content=json.dumps(payload).encode(), headers=headers)


# -- the bot as a real process ------------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BotProcess:
    """``imagebot ARGS`` as a child process with its own env and log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        import os
        import sys

        self.args = args
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("IMAGEBOT_")}, **env}
        self.log_path = log_path
        self.command = [sys.executable, "-m", "bot.cli", *args]
        self.proc: subprocess.Popen | None = None

    def start(self) -> BotProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=log, cwd=ROOT)
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, url: str, timeout: float = 30.0) -> None:
        import time

        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                pytest.fail(f"imagebot exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)  # polling a readiness condition with a deadline
        pytest.fail(f"imagebot did not become healthy in {timeout}s:\n{self.log()[-3000:]}")

    def stop(self, sig: int | None = None, timeout: float = 60.0) -> int:
        import signal

        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig or signal.SIGTERM)
        return self.proc.wait(timeout=timeout)


def wait_until(predicate, timeout: float = 30.0, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (a bounded wait on a condition)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


# -- a GitHub App for the GitHub stand-in -------------------------------------------------------


def app_key():
    """A fresh RSA key for a test GitHub App (module-scoped fixtures make one per module)."""
    from cryptography.hazmat.primitives.asymmetric import rsa

    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def private_pem(key) -> str:
    """The App's private key as the bot reads it (IMAGEBOT_GITHUB_PRIVATE_KEY)."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def github_app_standin(key, app_id: int, **kwargs: Any):
    """The GitHub stand-in accepting JWTs of the App ``app_id`` signed with ``key``."""
    from cryptography.hazmat.primitives import serialization

    from tests.standins.github import GitHubStandIn

    public = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return GitHubStandIn(app_id=app_id, public_key=public, **kwargs)
