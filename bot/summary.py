"""What a build's telemetry adds up to: per-platform results, the manifest list, a timeline.

Pure functions of the stored events (``bot.telemetry.as_dict`` shape, in id order), so the REST
API, the dashboard and the tests read one interpretation of the event stream, and a change to
it is tested without a database. Only the latest attempt counts: a build whose worker died
starts again with a second ``build_started``, and what the first attempt did is void.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bot.telemetry import latest_attempt

Event = dict[str, Any]

#: Per-platform status after each event about that platform.
_PLATFORM_STATUS = {
    "build_platform_started": "building",
    "build_platform_retry": "building",
    "build_platform_succeeded": "built",
    "build_platform_failed": "failed",
    "tag_started": "tagging",
    "tag_succeeded": "tagged",
    "tag_failed": "failed",
    "push_started": "pushing",
    "push_retry": "pushing",
    "push_skipped": "built",
    "push_succeeded": "pushed",
    "push_failed": "failed",
}
#: Platform statuses that say nothing more will happen to the platform.
_PLATFORM_FINAL = frozenset({"pushed", "failed"})
_BUILD_ENDS = frozenset({"build_succeeded", "build_failed", "build_cancelled"})


def platform_results(platforms: list[str], events: list[Event]) -> list[dict[str, Any]]:
    """One result per platform: status, image, tag, digest, size, push attempts, durations.

    ``platforms`` gives the order (the build's platforms); a platform that only appears in the
    events (the repo's ``.imagebot.yml`` chose others) is added after them.
    """
    events = latest_attempt(events)
    order = list(dict.fromkeys([*platforms, *(e["platform"] for e in events if e["platform"])]))
    results = {p: _empty_result(p) for p in order}
    ended = any(e["name"] in _BUILD_ENDS for e in events)
    for event in events:
        result = results.get(event["platform"]) if event["platform"] else None
        if result is None:
            continue
        name, data = event["name"], event["data"]
        if name in _PLATFORM_STATUS:
            result["status"] = _PLATFORM_STATUS[name]
        if name == "build_platform_started":
            result["image"] = data["image"]
        elif name == "build_platform_succeeded":
            result["image_id"] = data["image_id"]
            result["build_duration_s"] = data["duration_s"]
        elif name == "build_platform_failed":
            result["build_duration_s"] = data["duration_s"]
            result["error"] = {"step": "build", "kind": data["kind"], "message": data["message"]}
        elif name == "tag_failed":
            result["error"] = {"step": "tag", "kind": data["kind"], "message": data["message"]}
        elif name in ("push_started", "tag_started"):
            result["tag"] = data["tag"]
        elif name == "push_skipped":
            result["push_skipped"] = data["reason"]
        elif name == "push_retry":
            result["push_attempts"] = data["attempt"] + 1
            result["retry_kinds"].append(data["kind"])
        elif name == "build_platform_retry":
            result["build_retry_kinds"].append(data["kind"])
        elif name == "push_succeeded":
            result.update(tag=data["tag"], digest=data["digest"], size=data["size"],
                          push_attempts=data["attempts"], push_duration_s=data["duration_s"])
        elif name == "push_failed":
            result["push_attempts"] = data["attempts"]
            result["error"] = {"step": "push", "kind": data["kind"], "message": data["detail"]}
        elif name in ("auth_refresh_succeeded", "auth_refresh_failed"):
            result["credential_refreshes"] += 1
            result["refresh_outcomes"].append("failed" if name == "auth_refresh_failed"
                                              else "changed" if data["changed"] else "unchanged")
    for result in results.values():
        if ended and result["status"] not in _PLATFORM_FINAL and result["push_skipped"] is None:
            result["status"] = "stopped" if result["status"] != "pending" else "not_built"
    return list(results.values())


def _empty_result(platform: str) -> dict[str, Any]:
    return {
        "platform": platform, "status": "pending", "image": None, "image_id": None, "tag": None,
        "digest": None, "size": None, "push_attempts": 0, "push_skipped": None, "retry_kinds": [],
        "build_retry_kinds": [], "credential_refreshes": 0, "refresh_outcomes": [], "build_duration_s": None, "push_duration_s": None,
        "error": None,
    }


def manifest_result(events: list[Event]) -> dict[str, Any] | None:
    """The manifest list (or OCI index) of the latest attempt; None if it never started."""
    manifest: dict[str, Any] | None = None
    for event in latest_attempt(events):
        name, data = event["name"], event["data"]
        if name == "manifest_started":
            manifest = {"status": "publishing", "digest": None, "tags": data["tags"],
                        "platforms": data["platforms"], "media_type": data["media_type"],
                        "partial": None, "retries": 0, "error": None}
        elif manifest is None:
            continue
        elif name == "manifest_retry":
            manifest["retries"] += 1
        elif name == "manifest_published":
            manifest.update(status="published", digest=data["digest"], tags=data["tags"],
                            platforms=data["platforms"], media_type=data["media_type"],
                            partial=data["partial"])
        elif name == "manifest_failed":
            manifest.update(status="failed", error={"kind": data["kind"], "message": data["message"]})
    return manifest


# -- the timeline -----------------------------------------------------------------------------


@dataclass
class Span:
    """One step on a lane: ``start`` and ``duration`` in seconds from the attempt's start."""

    kind: str  # fetch, build, tag, push, retry, auth, manifest
    label: str
    start: float
    duration: float | None  # None: still running
    outcome: str  # ok, failed, running, waiting (a retry's backoff), info
    detail: str = ""


@dataclass
class Lane:
    name: str  # "build" (the whole build's steps) or a platform
    spans: list[Span] = field(default_factory=list)


@dataclass
class Timeline:
    lanes: list[Lane]
    #: Seconds from the attempt's start to its end (or to ``now`` while it runs).
    total: float
    attempt: int


#: step -> (the event that starts it, the events that end it, whether the end means failure)
_STEPS = {
    "build": ("build_platform_started", {"build_platform_succeeded": "ok", "build_platform_failed": "failed"}),
    "tag": ("tag_started", {"tag_succeeded": "ok", "tag_failed": "failed"}),
    "push": ("push_started", {"push_succeeded": "ok", "push_failed": "failed"}),
    "manifest": ("manifest_started", {"manifest_published": "ok", "manifest_failed": "failed"}),
}
_STARTS = {start: step for step, (start, _) in _STEPS.items()}
_ENDS = {end: (step, outcome) for step, (_, ends) in _STEPS.items() for end, outcome in ends.items()}


def _time(event: Event) -> datetime:
    return datetime.fromisoformat(event["ts"].replace("Z", "+00:00"))


def timeline(platforms: list[str], events: list[Event], now: datetime) -> Timeline:
    """Lanes of spans, one for the build's own steps (fetch, manifest) and one per platform.

    Steps that have not ended run until ``now`` (or the build's end, if it ended meanwhile);
    a retry is the backoff it waited, a credential refresh an instant.
    """
    events = latest_attempt(events)
    order = list(dict.fromkeys([*platforms, *(e["platform"] for e in events if e["platform"])]))
    lanes = {name: Lane(name) for name in ["build", *order]}
    if not events:
        return Timeline(list(lanes.values()), 0.0, 0)
    t0 = _time(events[0])
    end = next((_time(e) for e in events if e["name"] in _BUILD_ENDS), None)
    horizon = end or max(now, _time(events[-1]))
    at = lambda event: max((_time(event) - t0).total_seconds(), 0.0)  # noqa: E731
    open_spans: dict[tuple[str, str], Span] = {}
    attempt = events[0]["data"].get("attempt", 1) if events[0]["name"] == "build_started" else 1

    for event in events:
        name, data = event["name"], event["data"]
        lane = lanes[event["platform"] or "build"]
        if name == "build_started":
            open_spans[("build", "fetch")] = _add(lane, Span("fetch", "fetch", 0.0, None, "running"))
        elif name in ("fetch_succeeded", "fetch_failed"):
            span = open_spans.pop(("build", "fetch"), None) or _add(lane, Span("fetch", "fetch", 0.0, None, "running"))
            span.duration = at(event) - span.start
            span.outcome = "ok" if name == "fetch_succeeded" else "failed"
            span.detail = f"{data['method']} {data['sha'][:12]}" if name == "fetch_succeeded" else _failure(data)
        elif name in _STARTS:
            step = _STARTS[name]
            label = f"{step} {_short(data['tag'])}" if step in ("tag", "push") else step
            open_spans[(lane.name, step)] = _add(lane, Span(step, label, at(event), None, "running"))
        elif name in _ENDS:
            step, outcome = _ENDS[name]
            span = open_spans.pop((lane.name, step), None)
            if span is None:
                continue
            span.duration = at(event) - span.start
            span.outcome = outcome
            span.detail = _failure(data) if outcome == "failed" else _success_detail(name, data)
        elif name in ("build_platform_retry", "push_retry", "manifest_retry"):
            _add(lane, Span("retry", f"retry {data['attempt']}", at(event), data["delay_s"], "waiting",
                            f"attempt {data['attempt']} failed ({data['kind']}): {data['detail']}"))
        elif name in ("auth_refresh_succeeded", "auth_refresh_failed"):
            ok = name == "auth_refresh_succeeded"
            detail = (f"{data['source']}: {'new' if data['changed'] else 'same'} credentials" if ok
                      else _failure(data))
            _add(lane, Span("auth", "credential refresh", at(event), 0.0, "ok" if ok else "failed", detail))

    total = max((horizon - t0).total_seconds(), 0.0)
    for span in open_spans.values():
        span.duration = max(total - span.start, 0.0)
        if end is not None:
            span.outcome = "stopped"
    for lane in lanes.values():
        for span in lane.spans:
            if span.duration is not None and span.outcome != "running":
                total = max(total, span.start + span.duration)
    return Timeline(list(lanes.values()), total, attempt)


def _add(lane: Lane, span: Span) -> Span:
    lane.spans.append(span)
    return span


def _short(reference: str) -> str:
    return reference.rsplit(":", 1)[-1]


def _failure(data: dict[str, Any]) -> str:
    return f"{data['kind']}: {data.get('message') or data.get('detail') or ''}".strip()


def _success_detail(name: str, data: dict[str, Any]) -> str:
    if name == "push_succeeded":
        retries = f", {data['retries']} retr{'y' if data['retries'] == 1 else 'ies'}" if data["retries"] else ""
        return f"{data['digest'][:19]}… {data['size']} B{retries}"
    if name == "manifest_published":
        return f"{data['digest'][:19]}… {', '.join(data['tags'])}"
    if name == "build_platform_succeeded":
        return data["image_id"][:19]
    return ""
