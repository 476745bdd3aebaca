"""What a GitHub check run says about a build (pure): its status or conclusion, and a Markdown
report of the build's telemetry.

The summary is built from the stored telemetry events only, the same events the API and the
stream serve, so the check run can never tell a different story than the status page. GitHub's
limits are respected here, where the text is made: 65,535 characters for ``summary`` and
``text``, 20/40/20 characters for an action's label/description/identifier.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from bot import summary
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
class Summary:
    """What the check run shows of a build's last attempt (from bot.summary, the API's reading)."""

    platforms: list[dict[str, Any]]
    manifest: dict[str, Any] | None
    failure: dict[str, Any] | None  # the build_failed event's data
    duration_s: float | None


def summarize(events: list[dict[str, Any]], platforms: list[str]) -> Summary:
    """The build's telemetry as the API and the dashboard read it, plus how it ended."""
    last = latest_attempt(events)
    end = next((e for e in reversed(last) if e["name"] in ("build_succeeded", "build_failed", "build_cancelled")),
               None)
    return Summary(
        summary.platform_results(platforms, last), summary.manifest_result(last),
        end["data"] if end and end["name"] == "build_failed" else None,
        end["data"]["duration_s"] if end else None,
    )


# -- Markdown -------------------------------------------------------------------------------------

_ICONS = {"pushed": "✅", "built": "✅", "failed": "❌", "stopped": "⏹", "not_built": "⏹"}


#: Every ASCII punctuation character: CommonMark lets each be backslash-escaped, and escaping
#: them all leaves no link, image, emphasis, HTML tag, entity or autolink to form. (GitHub's
#: own @mention and #reference linking runs on the rendered text and links within GitHub only.)
_PUNCTUATION = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def _text(text: str) -> str:
    """Untrusted text (registry answers, error messages) as literal Markdown on one line.

    An error message is whatever a registry, git or a Dockerfile printed: it must not add
    links or images (which GitHub would fetch) or HTML to the check run; and since it may sit
    in a table cell, no newline may break the table (GitHub reads ``\\|`` as a pipe there)."""
    return "".join(f"\\{c}" if c in _PUNCTUATION else c for c in " ".join(text.split()))


def _code(text: str) -> str:
    """``text`` as an inline code span (nothing inside is Markdown), safe in a table cell: the
    delimiter is a backtick run longer than any inside, pipes are escaped as tables need."""
    text = " ".join(text.split()).replace("|", "\\|")
    if not text:
        return ""
    ticks = "`" * (_longest_backticks(text) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"


def _longest_backticks(text: str) -> int:
    return max(map(len, re.findall("`+", text)), default=0)


def _fence(text: str) -> str:
    """The fence of a code block holding ``text`` as it is: longer than any backtick run in it,
    so no line of the text can close the block early."""
    return "`" * max(3, _longest_backticks(text) + 1)


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


def _retries(r: dict[str, Any]) -> str:
    """Push retries; and the build's, named as such, when its base image had to be pulled again."""
    if not r["build_retry_kinds"]:
        return _counted(r["retry_kinds"])
    pushes = f"; push {_counted(r['retry_kinds'])}" if r["retry_kinds"] else ""
    return f"build {_counted(r['build_retry_kinds'])}{pushes}"


_REFRESHED = {"changed": "succeeded (new credentials)", "unchanged": "succeeded", "failed": "failed"}


def _platform_row(r: dict[str, Any]) -> str:
    state = "not pushed" if r["push_skipped"] else r["status"].replace("_", " ")
    duration = (r["build_duration_s"] or 0) + (r["push_duration_s"] or 0)
    cells = [
        _code(r["platform"]), f"{_ICONS.get(r['status'], '⏳')} {state}",
        _code(r["tag"]) if r["tag"] else "—", _code(r["digest"]) if r["digest"] else "—",
        _size(r["size"]), str(r["push_attempts"] or "—"), _retries(r),
        ", ".join(_REFRESHED[o] for o in r["refresh_outcomes"]) or "—",
        f"{duration:.1f} s" if duration else "—",
    ]
    return "| " + " | ".join(cells) + " |"


def summary_markdown(built: Summary, build_url: str, head: str) -> str:
    """The check run's ``output.summary``."""
    lines = [
        head, "",
        "| Platform | Result | Tag | Digest | Size | Push attempts | Retries | Credential refreshes | Duration |",
        "| --- | --- | --- | --- | ---: | ---: | --- | --- | ---: |",
        *(_platform_row(r) for r in built.platforms),
        "",
    ]
    if built.manifest and built.manifest["status"] == "published":
        m = built.manifest
        kind = "OCI image index" if "oci" in m["media_type"] else "Manifest list"
        lines.append(f"**{kind}** {_code(m['digest'])} over {_text(', '.join(m['platforms']))}"
                     + (" (partial)" if m["partial"] else ""))
        lines += [f"- {_code(tag)}" for tag in m["tags"]] + [""]
    if built.manifest and built.manifest["retries"]:
        lines += [f"Manifest retries: {built.manifest['retries']}", ""]
    if built.failure:
        f = built.failure
        fence = _fence(f["error_message"])
        lines += [f"**Failed** at step {_code(f.get('step') or 'unknown')}, error kind {_code(f['error_kind'])}",
                  "", fence, f["error_message"], fence, ""]
    for r in built.platforms:
        if r["error"]:
            e = r["error"]
            lines.append(f"- {_code(r['platform'])}: " + _text(f"{e['step']} {e['kind']}: {e['message']}"))
    if built.duration_s is not None:
        lines.append(f"\nTook {built.duration_s:.1f} s.")
    lines.append(f"\n[Build page]({build_url})")
    return _fit("\n".join(lines))


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
    fence = _fence("\n".join(shown))
    header, footer = f"Last lines of the build log:\n\n{fence}text\n", f"\n{fence}"
    budget = TEXT_LIMIT - len(header) - len(footer)
    kept: list[str] = []
    for line in reversed(shown):
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
    built = summarize(events, build.platforms)
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
    head = f"**{_text(title)}**" + (f"\n\n{_text(build.error_message)}" if reported == BuildStatus.skipped.value
                                    and build.error_message else "")
    body["output"] = {"title": title[:255], "summary": summary_markdown(built, build_url, head)}
    text = log_text(log)
    if text:
        body["output"]["text"] = text
    return body


def _partial(events: list[dict[str, Any]]) -> bool:
    return any(e["name"] == "build_succeeded" and e["data"].get("partial") for e in events)
