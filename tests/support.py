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
