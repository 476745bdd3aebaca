"""Telemetry: schemas are enforced at emission, stored events come back unchanged, the bus
never blocks the publisher and tells a slow consumer to resync."""

from __future__ import annotations

import asyncio

import pytest

from bot import telemetry
from bot.models import utcnow
from tests.test_queue import enqueue, request

pytestmark = pytest.mark.anyio

#: One valid example per event name: the contract tests of the status page reuse these.
EXAMPLES: dict[str, tuple[str | None, dict]] = {
    "build_started": (None, {"attempt": 1}),
    "build_succeeded": (None, {"duration_s": 12.5, "platforms": ["linux/amd64", "linux/arm64"], "partial": False}),
    "build_failed": (None, {"duration_s": 3.0, "error_kind": "denied", "error_message": "push denied", "step": "push"}),
    "build_cancelled": (None, {"duration_s": 1.0, "reason": "superseded by build 9"}),
    "fetch_succeeded": (None, {"duration_s": 0.4, "sha": "a" * 40, "method": "sha"}),
    "fetch_failed": (None, {"kind": "not_found", "message": "repository not found"}),
    "build_platform_started": ("linux/arm64", {"image": "r/acme/app:sha-aaaaaaa-linux-arm64"}),
    "build_platform_retry": ("linux/arm64", {"attempt": 1, "delay_s": 0.0, "kind": "auth", "refreshed": True,
                                             "detail": "unauthorized: authentication required"}),
    "build_platform_succeeded": ("linux/arm64", {"duration_s": 30.1, "image_id": "sha256:" + "b" * 64}),
    "build_platform_failed": ("linux/arm64", {"kind": "build", "message": "RUN failed", "duration_s": 2.0}),
    "tag_started": ("linux/amd64", {"image_id": "sha256:" + "b" * 64, "tag": "r/acme/app:x"}),
    "tag_succeeded": ("linux/amd64", {"tag": "r/acme/app:x"}),
    "tag_failed": ("linux/amd64", {"tag": "r/acme/app:x", "kind": "unknown", "message": "no such image"}),
    "push_started": ("linux/amd64", {"tag": "r/acme/app:x"}),
    "push_skipped": ("linux/amd64", {"reason": "pull request from a fork"}),
    "push_retry": ("linux/amd64", {"tag": "r/acme/app:x", "attempt": 1, "delay_s": 0.5, "kind": "network",
                                   "refreshed": False, "detail": "connection refused"}),
    "push_succeeded": ("linux/amd64", {"tag": "r/acme/app:x", "digest": "sha256:" + "c" * 64, "size": 528,
                                       "duration_s": 1.5, "attempts": 2, "retries": 1}),
    "push_failed": ("linux/amd64", {"tag": "r/acme/app:x", "kind": "auth", "attempts": 3, "retries": 2,
                                    "detail": "unauthorized: authentication required"}),
    "auth_refresh_succeeded": ("linux/amd64", {"registry": "127.0.0.1:5001", "source": "credential_helper",
                                                   "changed": True}),
    "auth_refresh_failed": (None, {"registry": "127.0.0.1:5001", "source": "settings", "kind": "auth",
                                   "message": "credentials unchanged"}),
    "tags_withheld": (None, {"tags": ["main", "latest"], "reason": "aaaaaaa is no longer the head of refs/heads/main"}),
    "manifest_started": (None, {"tags": ["main", "sha-aaaaaaa"], "platforms": ["linux/amd64"],
                                "media_type": "application/vnd.docker.distribution.manifest.list.v2+json"}),
    "manifest_retry": (None, {"attempt": 1, "delay_s": 0.2, "kind": "registry", "refreshed": False,
                              "detail": "502 Bad Gateway"}),
    "manifest_published": (None, {"digest": "sha256:" + "d" * 64, "tags": ["main"], "platforms": ["linux/amd64"],
                                  "media_type": "application/vnd.oci.image.index.v1+json", "partial": False}),
    "manifest_failed": (None, {"kind": "denied", "message": "denied", "attempts": 1}),
    "log_truncated": (None, {"reason": "bytes", "max_bytes": 16777216, "max_lines": 100000,
                             "bytes": 16777300, "lines": 41000}),
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_every_event_name_has_an_example():
    assert set(EXAMPLES) == set(telemetry.SCHEMAS)
    assert telemetry.PLATFORM_EVENTS | telemetry.BUILD_WIDE_EVENTS <= set(telemetry.SCHEMAS)


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_are_valid_and_stored_unchanged(db, name):
    (build_id,) = enqueue(db, request())
    platform, data = EXAMPLES[name]
    emitted = db.write_sync(lambda c: telemetry.record(c, build_id, name, utcnow(), platform, **data))
    (stored,) = db.read_sync(lambda c: telemetry.events_of(c, build_id))
    assert stored == emitted
    assert stored["data"] == data | {k: v for k, v in stored["data"].items() if k not in data}
    assert stored["platform"] == platform


@pytest.mark.parametrize(
    ("name", "platform", "data", "problem"),
    [
        ("build_exploded", None, {}, "unknown telemetry event"),
        ("push_retry", "linux/amd64", {"tag": "t", "attempt": 1}, "Field required"),
        ("push_retry", None, EXAMPLES["push_retry"][1], "needs a platform"),
        ("fetch_succeeded", "linux/amd64", EXAMPLES["fetch_succeeded"][1], "takes no platform"),
        ("build_started", None, {"attempt": "1"}, "valid integer"),
        ("build_started", None, {"attempt": 0}, "greater than or equal to 1"),
        ("push_succeeded", "linux/amd64", {**EXAMPLES["push_succeeded"][1], "extra": 1}, "Extra inputs"),
    ],
)
def test_invalid_events_raise_and_store_nothing(db, name, platform, data, problem):
    (build_id,) = enqueue(db, request())
    with pytest.raises(telemetry.TelemetryError, match=problem):
        db.write_sync(lambda c: telemetry.record(c, build_id, name, utcnow(), platform, **data))
    assert db.read_sync(lambda c: telemetry.events_of(c, build_id)) == []


async def test_emit_stores_then_publishes_the_same_shape(db):
    (build_id,) = enqueue(db, request())
    hub = telemetry.Telemetry(db)
    subscription = hub.bus.subscribe()
    event = await hub.emit(build_id, "fetch_succeeded", duration_s=0.1, sha="a" * 40, method="sha")
    message = await subscription.get()
    assert message == {"type": "event", "event": event}
    assert db.read_sync(lambda c: telemetry.events_of(c, build_id)) == [event]
    with pytest.raises(telemetry.TelemetryError):
        await hub.emit(build_id, "fetch_succeeded", sha="a" * 40)
    assert subscription._queue.empty()


async def test_log_lines_are_stored_and_published(db):
    (build_id,) = enqueue(db, request())
    hub = telemetry.Telemetry(db)
    subscription = hub.bus.subscribe()
    await hub.log_lines(build_id, "linux/arm64", ["Step 1/3 : FROM base", "Step 2/3 : RUN uname -m"])
    # one bus message per call, however many lines: streams read the lines from storage
    assert (await subscription.get())["lines"] == ["Step 1/3 : FROM base", "Step 2/3 : RUN uname -m"]
    assert subscription._queue.empty()
    lines = db.read_sync(lambda c: telemetry.log_of(c, build_id))
    assert [(line["platform"], line["line"]) for line in lines] == [
        ("linux/arm64", "Step 1/3 : FROM base"), ("linux/arm64", "Step 2/3 : RUN uname -m"),
    ]


async def test_a_slow_subscriber_is_told_to_resync_and_never_blocks():
    bus = telemetry.Bus()
    slow, fast = bus.subscribe(maxsize=3), bus.subscribe(maxsize=100)
    for n in range(10):
        bus.publish({"type": "event", "n": n})  # returns at once even though `slow` is full
    assert await slow.get() == {"type": "resync"}
    bus.publish({"type": "event", "n": 10})
    assert await slow.get() == {"type": "event", "n": 10}
    assert [(await fast.get())["n"] for _ in range(11)] == list(range(11))
    slow.close()
    bus.publish({"type": "event", "n": 11})
    assert slow._queue.empty()
    await asyncio.sleep(0)
