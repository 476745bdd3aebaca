"""Hostile bodies, validly signed: each gets a 400 with a reason, never a 500 or a reset.

A signature (or GitLab's token) proves who sent a body, not that it is sane: JSON nested
thousands of levels deep, lone surrogates, NUL characters, strings longer than their columns
and integers out of range all reached a 500 before. The named cases run through the app on
SQLite and PostgreSQL; the fuzz tests send seeded mutations of the vendored payloads
(tests/data/webhooks/), through the app on both databases and to a real ``imagebot serve``
over kept-alive connections (a reset needs a real server to show).
"""

from __future__ import annotations

import json
import random
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from starlette.testclient import TestClient

from bot.app import create_app
from bot.models import builds
from tests.support import (GITHUB_SECRET, GITLAB_TOKEN, WEBHOOKS, BotProcess, free_port, github_headers,
                           github_payload, make_settings, wait_until)

PUSH = github_payload("push.payload.4")


def _with(path: str, raw: str) -> bytes:
    """The push payload with the JSON text ``raw`` in place of the field at ``path``."""
    payload = json.loads(json.dumps(PUSH))
    *parents, last = path.split(".")
    target = payload
    for part in parents:
        target = target[part]
    target[last] = "@@HOLE@@"
    return json.dumps(payload).replace('"@@HOLE@@"', raw).encode()


def _post(client: TestClient, body: bytes, event: str = "push", **extra: str):
    return client.post("/webhooks/github", content=body, headers=github_headers(event, body, "d-1", **extra))


@pytest.fixture
def lenient(db, db_url) -> Iterator[TestClient]:
    """The app as a forge sees it: a server error is an answer (500), not an exception."""
    app = create_app(make_settings(db_url), run_worker=False, db=db)
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize(("body", "reason"), [
    (_with("head_commit.message", "[" * 5000 + "]" * 5000), "payload is not valid JSON: depth limit exceeded"),
    (_with("ref", '"refs/heads/\\ud800"'), "payload is not valid JSON: "),
    (_with("ref", '"refs/heads/x"').replace(b"refs/heads/x", b"refs/heads/\xed\xa0\x80"),
     "payload is not valid JSON: "),
    (_with("repository.default_branch", "NaN"), "payload is not valid JSON: "),
    (_with("ref", '"refs/heads/a\\u0000b"'), "payload field ref has a space, control character"),
    (_with("ref", json.dumps("refs/heads/" + "x" * 600)), "payload field ref is 611 bytes long, over the limit of 255"),
    (_with("repository.full_name", json.dumps("a/" + "b" * 300)), "payload field repository.full_name is not a repository path"),
    (_with("installation.id", str(2**40)), "payload field installation.id is out of range"),
    (_with("action", json.dumps("x" * 65)), "payload field action is not an action name"),
], ids=["nested 5000 deep", "escaped lone surrogate", "raw surrogate bytes", "NaN", "NUL in the ref",
        "a 611-character ref", "a 302-character repository", "installation id 2**40", "a 65-character action"])
def test_hostile_bodies_get_a_400_naming_why(lenient, db, body, reason):
    response = _post(lenient, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"].startswith(reason) and response.json()["kind"] in ("bad_request", "payload")
    assert db.read_sync(lambda c: c.execute(select(func.count()).select_from(builds)).scalar_one()) == 0


@pytest.mark.parametrize(("value", "column", "problem"), [
    ("refs/heads/main", "ref", None), ("a\x00b", "ref", "contains a NUL character"),
    ("\ud800", None, "is not valid Unicode text (a lone surrogate)"), ("x" * 513, "ref", "is longer than 512 characters"),
    ("x" * 513, None, None), (2**31 - 1, "pr_number", None), (2**31, "pr_number", "is out of range"),
    (-(2**31) - 1, "installation_id", "is out of range"), (2**40, "check_run_id", None), (True, "fork", None),
])
def test_what_a_column_cannot_hold(value, column, problem):
    from bot.webhooks.ingress import unstorable

    assert unstorable(value, builds.c[column] if column else None) == problem


def test_an_event_header_longer_than_its_column_gets_a_400(lenient):
    body = json.dumps(PUSH).encode()
    response = lenient.post("/webhooks/github", content=body, headers=github_headers("x" * 100, body, "d-2"))
    assert response.status_code == 400 and "is not an event name" in response.json()["error"]


# -- seeded mutations of the vendored payloads ------------------------------------------------------

#: Values a mutation puts somewhere in a payload, as JSON text (some are not valid JSON at all).
HOSTILE_VALUES = [
    "[" * 3000 + "]" * 3000, '{"a":' * 2000 + "1" + "}" * 2000, '"\\ud800"', '"\\udfff x"', '"a\\u0000b"',
    json.dumps("x" * 700), json.dumps("y" * 70), str(2**40), str(2**70), "-1", "1e400", "NaN", "0.5",
    "true", "null", "[]", "{}", '""', '"  "', json.dumps("[x](https://evil.example) <img src=x>"),
    json.dumps("refs/heads/" + "../" * 50), json.dumps("--upload-pack=touch /tmp/pwned"),
]


def _vendored() -> list[tuple[str, str, Any]]:
    """(forge, event, payload) of every vendored payload."""
    found = []
    for entry in json.loads((WEBHOOKS / "github" / "index.json").read_text()):
        found.append(("github", entry["event"], json.loads((WEBHOOKS / "github" / entry["file"]).read_text())))
    for name, event in (("push", "Push Hook"), ("tag_push", "Tag Push Hook"), ("merge_request", "Merge Request Hook")):
        found.append(("gitlab", event, json.loads((WEBHOOKS / "gitlab" / f"{name}.json").read_text())))
    return found


def _paths(value: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from _paths(child, (*prefix, key))
    elif isinstance(value, list):
        for i, child in enumerate(value[:3]):
            yield from _paths(child, (*prefix, i))


def mutate(rng: random.Random, payload: Any) -> bytes:
    """One mutation of ``payload``, serialised: a field replaced by a hostile value or deleted,
    or the serialised text itself damaged (truncated, a byte flipped, invalid UTF-8)."""
    payload = json.loads(json.dumps(payload))
    path = rng.choice([p for p in _paths(payload) if p])
    *parents, last = path
    target = payload
    for part in parents:
        target = target[part]
    roll = rng.random()
    if roll < 0.15 and isinstance(target, dict):
        del target[last]
        return json.dumps(payload).encode()
    target[last] = "@@HOLE@@"
    body = json.dumps(payload).replace('"@@HOLE@@"', rng.choice(HOSTILE_VALUES)).encode()
    if roll > 0.9:
        at = rng.randrange(len(body))
        body = rng.choice([body[:at], body[:at] + bytes([rng.randrange(256)]) + body[at + 1:],
                           body[:at] + b"\xed\xa0\x80" + body[at:], b"\xef\xbb\xbf" + body])
    return body


def signed_requests(seed: int, count: int) -> list[tuple[str, dict[str, str], bytes]]:
    """``count`` mutated deliveries (path, headers, body), validly signed, each with its own id."""
    rng = random.Random(seed)
    vendored = _vendored()
    made = []
    for n in range(count):
        forge, event, payload = rng.choice(vendored)
        body = mutate(rng, payload)
        if forge == "github":
            made.append(("/webhooks/github", github_headers(event, body, f"fuzz-{seed}-{n}"), body))
        else:
            made.append(("/webhooks/gitlab", {"content-type": "application/json", "x-gitlab-event": event,
                                              "x-gitlab-token": GITLAB_TOKEN, "idempotency-key": f"fuzz-{seed}-{n}"},
                         body))
    return made


def test_mutated_payloads_never_get_a_5xx_through_the_app(lenient):
    answers: dict[int, int] = {}
    for path, headers, body in signed_requests(seed=12, count=250):
        response = lenient.post(path, content=body, headers=headers)
        assert response.status_code < 500, (response.status_code, response.text, body[:300])
        if response.status_code >= 400:
            assert response.json()["error"], body[:300]
        answers[response.status_code] = answers.get(response.status_code, 0) + 1
    assert answers.get(400, 0) > 50 and set(answers) - {400}, answers  # both refusals and accepted ones


# -- a real server: no 5xx, no reset, and a client that hangs up is not an error ----------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("hostile")
    port = free_port()
    env = {"IMAGEBOT_DATABASE_URL": f"sqlite:///{tmp / 'bot.db'}", "IMAGEBOT_GITHUB_WEBHOOK_SECRET": GITHUB_SECRET,
           "IMAGEBOT_GITLAB_WEBHOOK_TOKEN": GITLAB_TOKEN, "IMAGEBOT_SHUTDOWN_GRACE_SECONDS": "0"}
    log = tmp / "bot.log"
    bot = BotProcess(["serve", "--port", str(port), "--no-worker", "--log-level", "debug"], env, log).start()
    url = f"http://127.0.0.1:{port}"
    try:
        bot.wait_healthy(url)
        yield url, log
    finally:
        bot.stop()


def test_mutated_payloads_never_get_a_5xx_or_a_reset_from_a_real_server(server):
    url, log = server
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=10) as client:  # one kept-alive connection for all of them
        for path, headers, body in signed_requests(seed=7, count=300):
            try:
                response = client.post(path, content=body, headers=headers)
            except httpx.TransportError as exc:  # a reset, or a connection closed under a request
                pytest.fail(f"{type(exc).__name__} for {body[:200]!r}: {exc}")
            assert response.status_code < 500, (response.status_code, response.text, body[:300])
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    assert statuses.get(400, 0) > 50, statuses
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "unhandled error" not in text and "Exception in ASGI" not in text


def test_a_client_that_hangs_up_mid_body_is_one_debug_line(server):
    url, log = server
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps(PUSH).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in github_headers("push", body, "gone-1").items())
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST /webhooks/github HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n{head}\r\n"
                     .encode() + body[: len(body) // 2])
    wait_until(lambda: "client went away during POST /webhooks/github" in log.read_text(errors="replace"),
               what="the bot to notice the client went away")
    text = log.read_text(errors="replace")
    line = next(ln for ln in text.splitlines() if "client went away" in ln)
    assert " DEBUG " in line
    assert "Traceback" not in text and "unhandled error" not in text
