"""What a GitHub check run says about a build (pure): its status or conclusion, and a Markdown
report of the build's telemetry.

The summary is built from the stored telemetry events only, the same events the API and the
stream serve, so the check run can never tell a different story than the status page. GitHub's
limits are respected here, where the text is made: 65,535 characters for ``summary`` and
``text``, 20/40/20 characters for an action's label/description/identifier.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from bot.models import BuildStatus
from bot.telemetry import latest_attempt

#: GitHub's limit on ``output.summary`` and ``output.text``.
TEXT_LIMIT = 65535
#: Lines of the build log shown in ``output.text``.
LOG_TAIL_LINES = 200
#: The action button GitHub shows on a finished check run; its identifier comes back in a
#: ``check_run`` ``requested_action`` delivery (see bot.webhooks.github).
RETRY_ACTION = {"label": "Retry", "description": "Build this commit again", "identifier": "retry"}


@dataclass
class PlatformResult:
    """What the telemetry says about one platform's image."""

    platform: str
    state: str = "pending"  # pending, building, built, pushed, failed, not pushed
    tags: list[str] = field(default_factory=list)
    digest: str | None = None
    size: int | None = None
    push_attempts: int = 0
    retry_kinds: list[str] = field(default_factory=list)
    refreshes: list[str] = field(default_factory=list)  # outcome per credential refresh
    duration_s: float = 0.0
    failure: str | None = None


@dataclass
class Summary:
    platforms: dict[str, PlatformResult]
    manifest: dict[str, Any] | None = None
    manifest_retries: list[str] = field(default_factory=list)
    failure: dict[str, Any] | None = None  # the build_failed event's data
    duration_s: float | None = None


def summarize(events: list[dict[str, Any]], platforms: list[str]) -> Summary:
    """Fold a build's telemetry events (in order) into per-platform results. Only the last
    attempt counts: a build whose worker died starts again with a new ``build_started``."""
    events = latest_attempt(events)
    results = {p: PlatformResult(p) for p in platforms}
    summary = Summary(results)
    for event in events:
        name, data = event["name"], event["data"]
        result = results.setdefault(event["platform"], PlatformResult(event["platform"])) \
            if event["platform"] else None
        if result is not None:
            _fold_platform(result, name, data)
        elif name == "manifest_published":
            summary.manifest = data
        elif name == "manifest_retry":
            summary.manifest_retries.append(data["kind"])
        elif name == "build_failed":
            summary.failure = data
        if name in ("build_succeeded", "build_failed", "build_cancelled"):
            summary.duration_s = data["duration_s"]
    return summary


def _fold_platform(result: PlatformResult, name: str, data: dict[str, Any]) -> None:
    match name:
        case "build_platform_started":
            result.state = "building"
        case "build_platform_succeeded":
            result.state, result.duration_s = "built", result.duration_s + data["duration_s"]
        case "build_platform_failed":
            result.state, result.failure = "failed", f"build: {data['message']}"
            result.duration_s += data["duration_s"]
        case "tag_succeeded":
            result.tags.append(data["tag"])
        case "tag_failed":
            result.state, result.failure = "failed", f"tag {data['kind']}: {data['message']}"
        case "push_skipped":
            result.state = "not pushed"
        case "push_retry":
            result.retry_kinds.append(data["kind"])
        case "push_succeeded":
            result.state, result.digest, result.size = "pushed", data["digest"], data["size"]
            result.push_attempts = max(result.push_attempts, data["attempts"])
            result.duration_s += data["duration_s"]
        case "push_failed":
            result.state, result.failure = "failed", f"push {data['kind']}: {data['detail']}"
            result.push_attempts = max(result.push_attempts, data["attempts"])
        case "auth_refresh_succeeded":
            result.refreshes.append("succeeded" + (" (new credentials)" if data["changed"] else ""))
        case "auth_refresh_failed":
            result.refreshes.append(f"failed ({data['kind']})")


# -- Markdown -------------------------------------------------------------------------------------

_ICONS = {"pushed": "✅", "built": "✅", "not pushed": "✅", "failed": "❌", "building": "⏳", "pending": "⏳"}


def _cell(text: str) -> str:
    """Table cells hold registry text too: no pipes or newlines may break the table."""
    return " ".join(text.replace("|", "\\|").split())


def _size(size: int | None) -> str:
    if size is None:
        return "—"
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _counted(kinds: list[str]) -> str:
    if not kinds:
        return "0"
    counts = {kind: kinds.count(kind) for kind in dict.fromkeys(kinds)}
    return f"{len(kinds)} (" + ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in counts.items()) + ")"


def _platform_row(r: PlatformResult) -> str:
    tags = "<br>".join(f"`{_cell(t)}`" for t in r.tags) or "—"
    digest = f"`{r.digest}`" if r.digest else "—"
    cells = [
        f"`{r.platform}`", f"{_ICONS.get(r.state, '')} {r.state}", tags, digest, _size(r.size),
        str(r.push_attempts or "—"), _counted(r.retry_kinds), ", ".join(r.refreshes) or "—",
        f"{r.duration_s:.1f} s" if r.duration_s else "—",
    ]
    return "| " + " | ".join(cells) + " |"


def summary_markdown(summary: Summary, build_url: str, head: str) -> str:
    """The check run's ``output.summary``."""
    lines = [
        head, "",
        "| Platform | Result | Tags | Digest | Size | Push attempts | Retries | Credential refreshes | Duration |",
        "| --- | --- | --- | --- | ---: | ---: | --- | --- | ---: |",
        *(_platform_row(r) for r in summary.platforms.values()),
        "",
    ]
    if summary.manifest:
        m = summary.manifest
        kind = "OCI image index" if "oci" in m["media_type"] else "Manifest list"
        lines.append(f"**{kind}** `{m['digest']}` over {', '.join(m['platforms'])}"
                     + (" (partial)" if m["partial"] else ""))
        lines += [f"- `{_cell(tag)}`" for tag in m["tags"]] + [""]
    if summary.manifest_retries:
        lines += [f"Manifest retries: {_counted(summary.manifest_retries)}", ""]
    if summary.failure:
        f = summary.failure
        lines += [f"**Failed** at step `{f.get('step') or 'unknown'}`, error kind `{f['error_kind']}`", "",
                  "```", _fence_safe(f["error_message"]), "```", ""]
    for r in summary.platforms.values():
        if r.failure:
            lines.append(f"- `{r.platform}`: {_cell(r.failure)}")
    if summary.duration_s is not None:
        lines.append(f"\nTook {summary.duration_s:.1f} s.")
    lines.append(f"\n[Build page]({build_url})")
    return _fit("\n".join(lines))


def _fence_safe(text: str) -> str:
    return text.replace("```", "'''")


def _fit(text: str) -> str:
    if len(text) <= TEXT_LIMIT:
        return text
    marker = "\n\n… (cut to GitHub's 65,535 characters)"
    return text[: TEXT_LIMIT - len(marker)] + marker


def log_text(lines: list[dict[str, Any]]) -> str | None:
    """The tail of the build log as ``output.text``: the last lines that fit, newest kept."""
    if not lines:
        return None
    shown = [f"[{ln['platform'] or 'build'}] {ln['line']}" for ln in lines[-LOG_TAIL_LINES:]]
    header, footer = "Last lines of the build log:\n\n```text\n", "\n```"
    budget = TEXT_LIMIT - len(header) - len(footer)
    kept: list[str] = []
    for line in reversed(shown):
        line = _fence_safe(line)
        if len(line) + 1 > budget:
            break
        kept.append(line)
        budget -= len(line) + 1
    return header + "\n".join(reversed(kept)) + footer


# -- the request bodies -----------------------------------------------------------------------


def conclusion(status: BuildStatus, partial: bool) -> str:
    """GitHub's conclusion for a finished build."""
    if status is BuildStatus.succeeded:
        return "neutral" if partial else "success"
    return {
        BuildStatus.failed: "failure",
        BuildStatus.cancelled: "cancelled",
        BuildStatus.superseded: "cancelled",
        BuildStatus.skipped: "skipped",
    }[status]


@dataclass(frozen=True)
class BuildFacts:
    """What a check run needs of a build row."""

    id: int
    sha: str
    status: BuildStatus
    platforms: list[str]
    started_at: datetime | None
    finished_at: datetime | None
    error_message: str | None


def _iso(value: datetime) -> str:
    return value.isoformat(timespec="seconds").replace("+00:00", "Z")


def check_run_body(build: BuildFacts, reported: str, title: str, events: list[dict[str, Any]],
                   log: list[dict[str, Any]], build_url: str) -> dict[str, Any]:
    """The create/update body for reporting ``reported`` (a build status or ``progress``).

    The check run's state comes from the report, the output from the telemetry as it is now,
    so a late interim update never shows less than an earlier one.
    """
    summary = summarize(events, build.platforms)
    body: dict[str, Any] = {"details_url": build_url, "external_id": str(build.id)}
    if reported == BuildStatus.queued.value:
        body["status"] = "queued"
    elif reported in (BuildStatus.running.value, "progress"):
        body["status"] = "in_progress"
        if build.started_at:
            body["started_at"] = _iso(build.started_at)
    else:
        status = BuildStatus(reported)
        body["conclusion"] = conclusion(status, _partial(events))
        body["completed_at"] = _iso(build.finished_at) if build.finished_at else None
        if body["completed_at"] is None:
            del body["completed_at"]
        if status is not BuildStatus.succeeded:
            body["actions"] = [RETRY_ACTION]
    head = f"**{title}**" + (f"\n\n{build.error_message}" if reported == BuildStatus.skipped.value
                             and build.error_message else "")
    body["output"] = {"title": title[:255], "summary": summary_markdown(summary, build_url, head)}
    text = log_text(log)
    if text:
        body["output"]["text"] = text
    return body


def _partial(events: list[dict[str, Any]]) -> bool:
    return any(e["name"] == "build_succeeded" and e["data"].get("partial") for e in events)
