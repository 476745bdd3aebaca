"""What a build's events add up to (bot.summary): pure, so no database here."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from bot import summary

T0 = datetime(2026, 11, 24, 8, 0, tzinfo=UTC)
AMD, ARM = "linux/amd64", "linux/arm64"
DIGEST = "sha256:" + "c" * 64


def events(*specs: tuple) -> list[dict]:
    """(seconds after T0, name, platform, data) -> events in the stored shape, ids in order."""
    return [
        {"id": n, "build_id": 7, "name": name, "platform": platform,
         "ts": (T0 + timedelta(seconds=at)).isoformat().replace("+00:00", "Z"), "data": data}
        for n, (at, name, platform, data) in enumerate(specs, start=1)
    ]


def pushed(platform: str, start: float, *, retry: bool = False) -> list[tuple]:
    tag = f"r/acme/app:sha-aaaaaaa-{platform.replace('/', '-')}"
    steps = [
        (start, "build_platform_started", platform, {"image": tag}),
        (start + 10, "build_platform_succeeded", platform, {"duration_s": 10.0, "image_id": "sha256:" + "b" * 64}),
        (start + 10, "tag_started", platform, {"image_id": "sha256:" + "b" * 64, "tag": tag}),
        (start + 10.5, "tag_succeeded", platform, {"tag": tag}),
        (start + 10.5, "push_started", platform, {"tag": tag}),
    ]
    if retry:
        steps += [
            (start + 11, "push_retry", platform, {"tag": tag, "attempt": 1, "delay_s": 1.0, "kind": "auth",
                                                  "refreshed": True, "detail": "unauthorized"}),
            (start + 11, "auth_refresh_succeeded", platform, {"registry": "r", "source": "password_file",
                                                              "changed": True}),
        ]
    steps.append((start + 14.5, "push_succeeded", platform, {
        "tag": tag, "digest": DIGEST, "size": 528, "duration_s": 4.0,
        "attempts": 2 if retry else 1, "retries": 1 if retry else 0,
    }))
    return steps


def whole_build() -> list[dict]:
    return events(
        (0, "build_started", None, {"attempt": 1}),
        (1, "fetch_succeeded", None, {"duration_s": 0.8, "sha": "a" * 40, "method": "sha"}),
        *pushed(ARM, 1), *pushed(AMD, 2, retry=True),
        (17, "manifest_started", None, {"tags": ["main", "latest"], "platforms": [AMD, ARM], "media_type": "m"}),
        (18, "manifest_published", None, {"digest": "sha256:" + "d" * 64, "tags": ["main", "latest"],
                                          "platforms": [AMD, ARM], "media_type": "m", "partial": False}),
        (18, "build_succeeded", None, {"duration_s": 18.0, "platforms": [AMD, ARM], "partial": False}),
    )


def test_results_per_platform_in_the_builds_order():
    amd, arm = summary.platform_results([AMD, ARM], whole_build())
    assert (amd["platform"], arm["platform"]) == (AMD, ARM)
    assert amd["status"] == arm["status"] == "pushed"
    assert amd["digest"] == DIGEST and amd["size"] == 528 and amd["tag"].endswith("linux-amd64")
    assert (amd["push_attempts"], arm["push_attempts"]) == (2, 1)
    assert (amd["credential_refreshes"], arm["credential_refreshes"]) == (1, 0)
    assert amd["build_duration_s"] == 10.0 and amd["push_duration_s"] == 4.0 and amd["error"] is None


def test_a_failed_platform_says_where_and_why_and_an_unfinished_one_stopped():
    seen = events(
        (0, "build_started", None, {"attempt": 1}),
        (1, "build_platform_started", ARM, {"image": "i"}),
        (2, "build_platform_started", AMD, {"image": "i"}),
        (3, "build_platform_failed", ARM, {"kind": "build", "message": "RUN false", "duration_s": 2.0}),
        (4, "build_failed", None, {"duration_s": 4.0, "error_kind": "build", "error_message": "x", "step": "build"}),
    )
    amd, arm = summary.platform_results([AMD, ARM], seen)
    assert arm["status"] == "failed" and arm["error"] == {"step": "build", "kind": "build", "message": "RUN false"}
    assert amd["status"] == "stopped"
    assert summary.manifest_result(seen) is None


def test_pushes_skipped_are_built_not_stopped():
    seen = events(
        (0, "build_started", None, {"attempt": 1}),
        (1, "build_platform_started", AMD, {"image": "i"}),
        (2, "build_platform_succeeded", AMD, {"duration_s": 1.0, "image_id": "sha256:1"}),
        (2, "push_skipped", AMD, {"reason": "a pull request from a fork is built but never pushed"}),
        (3, "build_succeeded", None, {"duration_s": 3.0, "platforms": [AMD], "partial": False}),
    )
    (amd, arm) = summary.platform_results([AMD, ARM], seen)
    assert amd["status"] == "built" and "fork" in amd["push_skipped"]
    assert arm["status"] == "not_built"  # the repo's .imagebot.yml chose fewer platforms


def test_only_the_latest_attempt_counts():
    first = whole_build()[:5]  # the worker died while arm64 was building
    retried = events((30, "build_started", None, {"attempt": 2}))
    amd, arm = summary.platform_results([AMD, ARM], first + retried)
    assert amd["status"] == arm["status"] == "pending" and arm["image"] is None
    assert summary.timeline([AMD, ARM], first + retried, T0 + timedelta(seconds=31)).attempt == 2


def test_manifest_list():
    manifest = summary.manifest_result(whole_build())
    assert manifest["status"] == "published" and manifest["tags"] == ["main", "latest"]
    assert manifest["digest"] == "sha256:" + "d" * 64 and manifest["partial"] is False
    failing = events(
        (0, "manifest_started", None, {"tags": ["main"], "platforms": [AMD], "media_type": "m"}),
        (1, "manifest_retry", None, {"attempt": 1, "delay_s": 0.5, "kind": "registry", "refreshed": False,
                                     "detail": "502"}),
        (2, "manifest_failed", None, {"kind": "denied", "message": "denied", "attempts": 2}),
    )
    assert summary.manifest_result(failing) == {
        "status": "failed", "digest": None, "tags": ["main"], "platforms": [AMD], "media_type": "m",
        "partial": None, "retries": 1, "error": {"kind": "denied", "message": "denied"},
    }


def test_timeline_has_a_lane_per_platform_with_timed_steps():
    line = summary.timeline([AMD, ARM], whole_build(), now=T0 + timedelta(hours=1))
    assert [lane.name for lane in line.lanes] == ["build", AMD, ARM]
    assert line.total == 18.0  # the build's end, not "now"
    build, amd, arm = line.lanes
    assert [(s.kind, s.start, s.duration, s.outcome) for s in build.spans] == [
        ("fetch", 0.0, 1.0, "ok"), ("manifest", 17.0, 1.0, "ok"),
    ]
    assert [s.kind for s in amd.spans] == ["build", "tag", "push", "retry", "auth"]
    push = amd.spans[2]
    assert (push.start, push.duration, push.outcome) == (12.5, 4.0, "ok") and "1 retry" in push.detail
    retry = amd.spans[3]
    assert (retry.start, retry.duration, retry.outcome) == (13.0, 1.0, "waiting") and "auth" in retry.detail
    assert amd.spans[4].detail == "password_file: new credentials"
    assert [s.kind for s in arm.spans] == ["build", "tag", "push"]


def test_timeline_of_a_running_build_runs_to_now():
    seen = whole_build()[:3]  # fetched, arm64 building
    line = summary.timeline([AMD, ARM], seen, now=T0 + timedelta(seconds=5))
    assert line.total == 5.0
    (span,) = line.lanes[2].spans
    assert (span.kind, span.start, span.duration, span.outcome) == ("build", 1.0, 4.0, "running")
    assert line.lanes[1].spans == []


def test_timeline_of_a_stopped_build_marks_what_was_running():
    seen = whole_build()[:3] + events((6, "build_cancelled", None, {"duration_s": 6.0, "reason": "superseded"}))
    line = summary.timeline([AMD, ARM], seen, now=T0 + timedelta(hours=1))
    assert line.total == 6.0
    assert [(s.kind, s.duration, s.outcome) for s in line.lanes[2].spans] == [("build", 5.0, "stopped")]


def test_nothing_yet():
    line = summary.timeline([AMD], [], now=T0)
    assert (line.total, [lane.name for lane in line.lanes]) == (0.0, ["build", AMD])
    assert summary.platform_results([AMD], [])[0]["status"] == "pending"


def test_a_build_that_pulls_its_base_image_again_shows_the_refresh_and_the_retry():
    seen = events(
        (0, "build_started", None, {"attempt": 1}),
        (1, "build_platform_started", AMD, {"image": "i"}),
        (3, "auth_refresh_succeeded", AMD, {"registry": "r", "source": "credential_helper", "changed": True}),
        (3, "build_platform_retry", AMD, {"attempt": 1, "delay_s": 0.0, "kind": "auth", "refreshed": True,
                                          "detail": "unauthorized: authentication required"}),
    )
    (amd,) = summary.platform_results([AMD], seen)
    assert (amd["status"], amd["credential_refreshes"], amd["push_attempts"]) == ("building", 1, 0)
    assert (amd["build_retry_kinds"], amd["retry_kinds"]) == (["auth"], [])  # a build retry, not a push's
    lane = summary.timeline([AMD], seen, now=T0 + timedelta(seconds=4)).lanes[1]
    assert [(s.kind, s.outcome) for s in lane.spans] == [("build", "running"), ("auth", "ok"), ("retry", "waiting")]
    assert "attempt 1 failed (auth): unauthorized" in lane.spans[2].detail
