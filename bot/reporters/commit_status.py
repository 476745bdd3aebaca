"""What a commit status says about a build, for GitHub and for GitLab (pure).

Every build state maps to a status, including the ends nobody waits for (superseded, skipped,
cancelled), so a required check never stays pending. GitHub has four states (its ``error``
means "the check itself could not run"); GitLab has its own five.
"""

from __future__ import annotations

from dataclasses import dataclass

from bot.models import BuildStatus

#: GitHub's limit on a status description.
DESCRIPTION_LIMIT = 140
#: Failures the repository can fix (the check failed) as opposed to the bot's or the
#: registry's trouble (the check could not run).
USER_FAILURES = frozenset({"build", "config", "sha_not_found", "not_found"})


@dataclass(frozen=True)
class CommitStatus:
    state: str
    description: str
    target_url: str


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= DESCRIPTION_LIMIT else text[: DESCRIPTION_LIMIT - 1] + "…"


def describe(status: BuildStatus, platforms: list[str], error_kind: str | None,
             error_message: str | None) -> str:
    """One line a person reads next to the commit."""
    joined = ", ".join(platforms)
    match status:
        case BuildStatus.queued:
            return f"Queued: {joined}"
        case BuildStatus.running:
            return f"Building {joined}"
        case BuildStatus.succeeded:
            return f"Built {joined}"
        case BuildStatus.failed:
            return f"Failed ({error_kind or 'unknown'}): {error_message or 'see the build page'}"
        case BuildStatus.superseded:
            message = error_message or "superseded by a newer build"
            return message[:1].upper() + message[1:]
        case BuildStatus.cancelled:
            return f"Cancelled: {error_message or 'by request'}"
        case BuildStatus.skipped:
            return f"Skipped: {error_message or 'skip marker in the commit message'}"
    raise ValueError(status)


def github_state(status: BuildStatus, error_kind: str | None) -> str:
    if status in (BuildStatus.queued, BuildStatus.running):
        return "pending"
    if status in (BuildStatus.succeeded, BuildStatus.skipped):
        return "success"
    if status is BuildStatus.failed and error_kind in USER_FAILURES:
        return "failure"
    return "error"  # superseded, cancelled, and failures of the bot or the registry


def gitlab_state(status: BuildStatus) -> str:
    return {
        BuildStatus.queued: "pending",
        BuildStatus.running: "running",
        BuildStatus.succeeded: "success",
        BuildStatus.skipped: "success",
        BuildStatus.failed: "failed",
        BuildStatus.superseded: "canceled",
        BuildStatus.cancelled: "canceled",
    }[status]


def commit_status(provider: str, build_id: int, status: BuildStatus, platforms: list[str],
                  error_kind: str | None, error_message: str | None, public_url: str) -> CommitStatus:
    """The status ``provider`` should show for a build in ``status``."""
    state = gitlab_state(status) if provider == "gitlab" else github_state(status, error_kind)
    return CommitStatus(state, _short(describe(status, platforms, error_kind, error_message)),
                        f"{public_url.rstrip('/')}/builds/{build_id}")
