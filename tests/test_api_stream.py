"""The live streams (bot.api.stream): replay from storage, resume after Last-Event-ID, wake-ups
by the bus, a slow client told to resync without missing anything; then the same over real
HTTP against a served ``imagebot``, on SQLite and PostgreSQL.

Waits are bounded reads of the stream (a deadline per message), never sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from bot import telemetry
from bot.api.stream import Position, follow
from bot.models import utcnow
from tests.support import GITHUB_SECRET, BotProcess, free_port, github_headers, github_payload
from tests.test_queue import enqueue, request


@dataclass(frozen=True)
class Message:
    event: str
    id: str
    data: dict[str, Any]


# -- the stream as a generator, with a real database and bus -----------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def take(stream: AsyncIterator, count: int, timeout: float = 10.0) -> list[Message]:
    """The next ``count`` messages, or fail after ``timeout`` seconds."""
    out = []
    async with asyncio.timeout(timeout):
        while len(out) < count:
            sse = await anext(stream)
            out.append(Message(sse.event, sse.id, json.loads(sse.data)))
    return out


def stream_of(db, bus, *, build_id=None, position=None, resumed=False, logs=True, poll=60.0, buffer=256):
    """``follow`` as the endpoints run it. A poll of 60 s means: only the bus can wake it."""
    return follow(db.read, bus.subscribe(maxsize=buffer), build_id=build_id, position=position, resumed=resumed,
                  logs=logs, poll_seconds=poll)


def store(db, build_id: int, name: str = "build_platform_started", platform: str | None = "linux/amd64",
          **data) -> dict:
    data = data or {"image": f"r/acme/app:{uuid.uuid4().hex[:6]}"}
    return db.write_sync(lambda c: telemetry.record(c, build_id, name, utcnow(), platform, **data))


def store_lines(db, build_id: int, *lines: str) -> None:
    db.write_sync(lambda c: telemetry._store_log_lines(c, [(build_id, "linux/arm64", utcnow(), list(lines))]))


@pytest.mark.anyio
async def test_a_builds_stream_replays_it_then_follows_the_bus(db):
    build_id, other = enqueue(db, request(), request(ref="refs/heads/other"))
    first = store(db, build_id, "build_started", None, attempt=1)
    store_lines(db, build_id, "fetching")
    store(db, other)  # another build's event is not in this stream
    hub = telemetry.Telemetry(db)
    stream = stream_of(db, hub.bus, build_id=build_id, position=Position())
    replayed = await take(stream, 3)
    assert [m.event for m in replayed] == ["telemetry", "log", "status"]
    assert replayed[0].data == first and replayed[0].id == f"{first['id']}-0"
    assert replayed[1].data["line"] == "fetching" and replayed[1].id.startswith(f"{first['id']}-")
    assert replayed[2].data["id"] == build_id and replayed[2].data["status"] == "queued"

    live = await hub.emit(build_id, "fetch_succeeded", duration_s=0.5, sha="a" * 40, method="sha")
    (message,) = await take(stream, 1)
    assert (message.event, message.data) == ("telemetry", live)
    await hub.log_lines(build_id, None, ["Step 1/2"])
    (message,) = await take(stream, 1)
    assert (message.event, message.data["line"], message.data["platform"]) == ("log", "Step 1/2", None)
    await stream.aclose()


@pytest.mark.anyio
async def test_resuming_after_any_message_misses_nothing_and_repeats_nothing(db):
    (build_id,) = enqueue(db, request())
    for n in range(4):
        store(db, build_id)
        store_lines(db, build_id, f"line {n}")
    bus = telemetry.Bus()
    everything = await take(stream_of(db, bus, build_id=build_id, position=Position()), 9)
    for cut in range(len(everything) - 1):
        resumed_from = everything[cut].id
        event, log = map(int, resumed_from.split("-"))
        rest = await take(stream_of(db, bus, build_id=build_id, position=Position(event, log), resumed=True),
                          len(everything) - cut - 1)
        assert [m.data for m in rest if m.event != "status"] == [
            m.data for m in everything[cut + 1:] if m.event != "status"
        ], f"resumed after {resumed_from}"


@pytest.mark.anyio
async def test_all_builds_stream_starts_now_and_tells_state_changes(db):
    (old,) = enqueue(db, request())
    store(db, old)  # before the stream started: not replayed
    hub = telemetry.Telemetry(db)
    stream = stream_of(db, hub.bus, logs=False)
    pending = asyncio.ensure_future(take(stream, 1))
    # a new build, announced the way the webhook endpoints announce it
    (new,) = enqueue(db, request(ref="refs/heads/new"))
    hub.bus.publish({"type": "builds_changed", "ids": [new]})
    (message,) = await pending
    assert (message.event, message.data["id"], message.data["status"]) == ("status", new, "queued")
    started = await hub.emit(new, "build_started", attempt=1)
    await hub.log_lines(new, None, ["not in a stream without logs"])
    telemetry_message, status = await take(stream, 2)
    assert telemetry_message.data == started
    assert (status.event, status.data["id"]) == ("status", new)
    await stream.aclose()


@pytest.mark.anyio
async def test_a_client_that_falls_behind_is_told_to_resync_and_misses_nothing(db):
    (build_id,) = enqueue(db, request())
    hub = telemetry.Telemetry(db)
    stream = stream_of(db, hub.bus, build_id=build_id, position=Position(), buffer=4)
    (state,) = await take(stream, 1)  # the stream now waits for this client to read on
    assert state.event == "status"
    emitted = [await hub.emit(build_id, "build_platform_started", "linux/amd64", image=f"i{n}") for n in range(30)]
    await hub.log_lines(build_id, "linux/amd64", [f"l{n}" for n in range(10)])
    resync, *rest = await take(stream, 1 + 30 + 10)
    assert resync.event == "resync" and "fell behind" in resync.data["reason"]
    assert [m.data for m in rest if m.event == "telemetry"] == emitted
    assert [m.data["line"] for m in rest if m.event == "log"] == [f"l{n}" for n in range(10)]


@pytest.mark.anyio
async def test_writes_by_another_process_arrive_by_polling(db):
    (build_id,) = enqueue(db, request())
    stream = stream_of(db, telemetry.Bus(), build_id=build_id, position=Position(), poll=0.05)
    await take(stream, 1)
    written = store(db, build_id, "build_started", None, attempt=1)  # stored, never published here
    message, status = await take(stream, 2)
    assert message.data == written and (status.event, status.data["id"]) == ("status", build_id)
    await stream.aclose()


@pytest.mark.anyio
async def test_builds_the_worker_recovers_are_announced(db, db_url):
    from datetime import timedelta

    from bot import queue
    from bot.worker import Worker, placeholder_runner
    from tests.support import make_settings

    (build_id,) = enqueue(db, request())
    db.write_sync(lambda c: queue.claim(c, "a-dead-worker", timedelta(seconds=1), utcnow() - timedelta(hours=1)))
    bus = telemetry.Bus()
    subscription = bus.subscribe()
    settings = make_settings(db_url)
    await Worker(db, settings, placeholder_runner(settings), bus=bus)._recover_if_due()
    assert await asyncio.wait_for(subscription.get(), 10) == {"type": "builds_changed", "ids": [build_id]}


@pytest.mark.parametrize(
    ("path", "headers", "status", "reason"),
    [
        ("/api/events", {"Last-Event-ID": "12"}, 400, "Last-Event-ID '12' is not one this API handed out (<event>-<log>)"),
        ("/api/events?after=a-b", {}, 400, "Last-Event-ID 'a-b' is not one this API handed out (<event>-<log>)"),
        ("/api/events?logs=maybe", {}, 400, "logs must be 1, 0, true or false"),
        ("/api/events?build=1", {}, 400, "unknown query parameter(s): build"),
        ("/api/builds/999/stream", {}, 404, "no build 999"),
        ("/api/builds/x/stream", {}, 404, "no build 'x'"),
    ],
)
def test_stream_errors_are_json(client, path, headers, status, reason):
    response = client.get(path, headers=headers)
    assert response.status_code == status and response.json() == {"error": reason}


# -- over HTTP, against a served imagebot ------------------------------------------------------


class SSEClient:
    """A blocking SSE reader for tests; every read has a deadline (``timeout`` seconds per
    ``take``/``until``, checked at each line, keep-alive comments included)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None, timeout: float = 20.0) -> None:
        self.timeout = timeout
        self._client = httpx.Client(timeout=httpx.Timeout(5.0, read=timeout))
        self._context = self._client.stream("GET", url, headers=headers or {})
        self.response = self._context.__enter__()
        assert self.response.status_code == 200, self.response.read()
        assert self.response.headers["content-type"].startswith("text/event-stream")
        self._lines: Iterator[str] = self.response.iter_lines()

    def next(self, deadline: float) -> Message:
        fields: dict[str, str] = {}
        for line in self._lines:
            if time.monotonic() > deadline:
                raise AssertionError("no complete message before the deadline")
            if not line:
                if "data" in fields:
                    return Message(fields.get("event", "message"), fields.get("id", ""), json.loads(fields["data"]))
                fields = {}  # a comment-only block (ping)
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
        raise AssertionError("the stream ended")

    def take(self, count: int) -> list[Message]:
        deadline = time.monotonic() + self.timeout
        return [self.next(deadline) for _ in range(count)]

    def until(self, predicate) -> list[Message]:
        """Messages up to and including the first that ``predicate`` accepts."""
        deadline, seen = time.monotonic() + self.timeout, []
        while not seen or not predicate(seen[-1]):
            seen.append(self.next(deadline))
        return seen

    def close(self) -> None:
        self._context.__exit__(None, None, None)
        self._client.close()

    def __enter__(self) -> SSEClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def serving(db_url: str, log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """``imagebot serve ARGS`` on ``db_url``; its worker (unless --no-worker) runs 0.2 s
    placeholder builds."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    values = {
        "IMAGEBOT_DATABASE_URL": db_url, "IMAGEBOT_GITHUB_WEBHOOK_SECRET": GITHUB_SECRET,
        "IMAGEBOT_POLL_SECONDS": "0.05", "IMAGEBOT_PLACEHOLDER_BUILD_SECONDS": "0.2",
        "IMAGEBOT_PLATFORMS": "linux/amd64,linux/arm64", "IMAGEBOT_SHUTDOWN_GRACE_SECONDS": "0",
        **(env or {}),
    }
    bot = BotProcess(["serve", "--port", str(port), *args], values, log).start()
    try:
        bot.wait_healthy(url)
        yield url
    finally:
        bot.stop()


@pytest.fixture
def served(db_url, tmp_path) -> Iterator[str]:
    """The API alone (no worker): the test writes the telemetry, as a worker process would."""
    with serving(db_url, tmp_path / "bot.log", "--no-worker") as url:
        yield url


def test_reconnecting_with_last_event_id_misses_nothing(served, db):
    build_id, other = enqueue(db, request(), request(ref="refs/heads/other"))
    stored_events = [store(db, build_id) for _ in range(3)]
    store_lines(db, build_id, "a", "b")
    with SSEClient(f"{served}/api/builds/{build_id}/stream") as first:
        got = first.take(3)
    last_id = got[-1].id
    # meanwhile: more of this build, and another build that must stay out of this stream
    stored_events += [store(db, build_id) for _ in range(2)]
    store_lines(db, build_id, "c")
    store(db, other)
    stored_events.append(store(db, build_id, "build_started", None, attempt=1))
    with SSEClient(f"{served}/api/builds/{build_id}/stream", {"Last-Event-ID": last_id}) as second:
        got += second.until(lambda m: m.event == "telemetry" and m.data["name"] == "build_started")
    assert [m.data for m in got if m.event == "telemetry"] == stored_events
    assert [m.data["line"] for m in got if m.event == "log"] == ["a", "b", "c"]
    assert all(m.data["build_id"] == build_id for m in got if m.event in ("telemetry", "log"))


def test_all_events_resumes_across_builds(served, db):
    (build_id,) = enqueue(db, request())
    with SSEClient(f"{served}/api/events?logs=1") as first:
        store(db, build_id, "build_started", None, attempt=1)
        got = first.until(lambda m: m.event == "status")
    # created now: a resume looks for builds changed since (shortly before) what was sent last
    (later,) = enqueue(db, request(ref="refs/heads/later"), at=utcnow())
    missed = [store(db, later), store(db, build_id)]
    store_lines(db, later, "missed line")
    with SSEClient(f"{served}/api/events?logs=1", {"Last-Event-ID": got[-1].id}) as second:
        resumed = second.until(lambda m: m.event == "status" and m.data["id"] == later)
    assert [m.data for m in resumed if m.event == "telemetry"] == missed
    assert [m.data["line"] for m in resumed if m.event == "log"] == ["missed line"]
    # a build created while the client was away is announced with its state
    assert resumed[-1].data["status"] == "queued"


def test_a_webhook_build_is_followed_live_from_delivery_to_end(db_url, tmp_path):
    with serving(db_url, tmp_path / "bot.log") as served:
        with SSEClient(f"{served}/api/events") as events:
            body = json.dumps(github_payload("push.payload.4")).encode()
            response = httpx.post(f"{served}/webhooks/github", content=body,
                                  headers=github_headers("push", body, uuid.uuid4().hex))
            build_id = response.json()["build_id"]
            seen = events.until(lambda m: m.event == "status" and m.data["status"] == "succeeded")
        stored = httpx.get(f"{served}/api/builds/{build_id}/events").json()["events"]
        build = httpx.get(f"{served}/api/builds/{build_id}").json()
    mine = [m for m in seen if m.data.get("build_id", m.data.get("id")) == build_id]
    # states are read when the stream looks, so a quick step may be seen once or not at all
    states = [m.data["status"] for m in mine if m.event == "status"]
    order = ["queued", "running", "succeeded"]
    assert states == sorted(states, key=order.index) and states[-1] == "succeeded" and len(states) >= 2
    assert [m.data for m in mine if m.event == "telemetry"] == stored
    assert [m.data["name"] for m in mine if m.event == "telemetry"] == ["build_started", "build_succeeded"]
    assert mine[-1].data == {k: v for k, v in build.items() if k not in ("results", "manifest")}


# -- caps: per client, per process ---------------------------------------------------------------


async def _open_streams(url: str, source: str, count: int) -> tuple[httpx.AsyncClient, list[httpx.Response]]:
    """``count`` streams of /api/events opened at once from the address ``source``; their
    responses (the refused ones already read and closed)."""
    transport = httpx.AsyncHTTPTransport(local_address=source, limits=httpx.Limits(max_connections=None))
    client = httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(30.0))

    async def one() -> httpx.Response:
        response = await client.send(client.build_request("GET", f"{url}/api/events"), stream=True)
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
        return response

    return client, list(await asyncio.gather(*(one() for _ in range(count))))


@pytest.mark.anyio
async def test_streams_are_capped_per_client_429_and_per_process_503(db_url, tmp_path):
    caps = {"IMAGEBOT_STREAM_MAX": "12", "IMAGEBOT_STREAM_MAX_PER_CLIENT": "5"}
    with serving(db_url, tmp_path / "bot.log", "--no-worker", env=caps) as url:
        flood, answers = await _open_streams(url, "127.0.0.2", 500)
        statuses = [r.status_code for r in answers]
        assert statuses.count(200) == 5 and statuses.count(429) == 495
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.headers["retry-after"] == "5" and "IMAGEBOT_STREAM_MAX_PER_CLIENT" in refused.json()["error"]

        second, more = await _open_streams(url, "127.0.0.3", 5)
        third, last = await _open_streams(url, "127.0.0.4", 3)
        assert [r.status_code for r in more] == [200] * 5
        assert sorted(r.status_code for r in last) == [200, 200, 503]  # 12 open: the process is full
        full = next(r for r in last if r.status_code == 503)
        assert full.headers["retry-after"] == "5" and "IMAGEBOT_STREAM_MAX" in full.json()["error"]

        for response in answers + more + last:
            await response.aclose()
        for client in (flood, second, third):
            await client.aclose()
        # closed streams give their slots back: the flooding client may open its share again
        deadline = time.monotonic() + 20
        while True:
            again, reopened = await _open_streams(url, "127.0.0.2", 5)
            codes = [r.status_code for r in reopened]
            for response in reopened:
                await response.aclose()
            await again.aclose()
            if codes == [200] * 5:
                break
            assert time.monotonic() < deadline, f"slots were not given back: {codes}"


@pytest.mark.anyio
async def test_a_replay_is_bounded_and_says_what_it_skipped(db):
    from bot.api.stream import MAX_REPLAY

    (build_id,) = enqueue(db, request())
    lines = [f"y {n}" for n in range(MAX_REPLAY + 500)]
    db.write_sync(lambda c: telemetry._store_log_lines(c, [(build_id, "linux/amd64", utcnow(), lines)]))
    stream = stream_of(db, telemetry.Bus(), build_id=build_id, position=Position())
    skipped, *rest = await take(stream, 1 + MAX_REPLAY + 1)  # and the build's status
    assert skipped.event == "skipped" and "/api/builds/{id}/log" in skipped.data["reason"]
    assert [m.data["line"] for m in rest if m.event == "log"] == lines[-MAX_REPLAY:]
    assert [m.event for m in rest].count("status") == 1
    await stream.aclose()
