"""What a verified delivery's fields may be before anything uses them (pure).

A valid signature or token proves only who sent a delivery; GitLab's is one token shared by
every project. Each field that later becomes a git argument, a URL, a forge API path or a
database value is checked here, at ingress, so that a hostile one is refused (400, naming the
field) before it is stored or reaches a forge: a sha is 40 or 64 hex digits, a ref follows
``git check-ref-format`` within a length bound, a repository path has only the characters
forges allow, the clone URL is the forge's own URL for that repository, and strings fit their
columns (bot/models.py). Then :func:`admit` applies the operator's decisions: which repositories
are served, and where their clone URLs must point.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from bot.pipeline.fetch import SHA
from bot.queue import BuildRequest, Decision, Ignore
from bot.repositories import RepositoryPatterns, compiled
from bot.settings import Settings
from bot.webhooks.ingress import WebhookError, field

#: A ref, in bytes of UTF-8: bounds image tags, report keys and the ``ref`` column (512).
MAX_REF_BYTES = 255
#: The ``repo`` column; GitLab allows 20 levels of subgroups below the top-level group.
MAX_REPO_CHARS = 255
MAX_REPO_SEGMENTS = {"github": 2, "gitlab": 21}
_SEGMENT = re.compile(r"^[A-Za-z0-9_.-]{1,100}$")
#: ``event`` and ``action`` columns are 64 characters; GitLab's event names have spaces.
_EVENT = re.compile(r"^[A-Za-z0-9 _.-]{1,64}$")
_ACTION = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Characters git forbids anywhere in a ref: controls, space, ~ ^ : ? * [ and backslash.
_REF_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]")
#: The database's INTEGER columns (pr_number, installation_id).
MAX_INT = 2**31 - 1


def _refuse(reason: str) -> WebhookError:
    return WebhookError(400, reason, kind="payload")


def _shown(value: str, limit: int = 80) -> str:
    return repr(value if len(value) <= limit else value[:limit] + "…")


def sha(value: str, name: str) -> str:
    """``value`` if it is a full commit id (SHA-1 or SHA-256, lower-case hex), else a 400."""
    if not SHA.fullmatch(value):
        raise _refuse(f"payload field {name} is not a commit sha (40 or 64 hex digits): {_shown(value)}")
    return value


def sha_at(payload: Any, path: str, *, at: str | None = None) -> str:
    """The commit sha at ``path`` of ``payload`` (see :func:`bot.webhooks.ingress.field`)."""
    return sha(field(payload, path, at=at), f"{at}.{path}" if at else path)


def ref_problem(ref: str) -> str | None:
    """Why ``ref`` is no ref ``git check-ref-format`` accepts, or is too long; or None."""
    try:
        size = len(ref.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid UTF-8"
    if size > MAX_REF_BYTES:
        return f"is {size} bytes long, over the limit of {MAX_REF_BYTES}"
    if _REF_FORBIDDEN.search(ref):
        return "has a space, control character or one of ~ ^ : ? * [ \\"
    if ".." in ref or "@{" in ref or ref == "@" or ref.endswith("."):
        return "has '..' or '@{', is '@' or ends with '.'"
    parts = ref.split("/")
    if len(parts) < 2 or any(not part for part in parts):
        return "has an empty component (a leading, trailing or doubled '/') or no '/'"
    if any(part.startswith(".") or part.endswith(".lock") for part in parts):
        return "has a component that starts with '.' or ends with '.lock'"
    return None


def ref(value: str, name: str) -> str:
    """``value`` if it is a well-formed, bounded ref, else a 400 naming ``name``."""
    problem = ref_problem(value)
    if problem:
        raise _refuse(f"payload field {name} {problem}: {_shown(value)}")
    return value


def branch(value: str | None, name: str) -> str | None:
    """A branch name (``main``, not ``refs/heads/main``), checked as the ref it names."""
    if value is not None:
        ref(f"refs/heads/{value}", name)
    return value


def repo_path(value: str, provider: str, name: str) -> str:
    """``owner/name`` (GitHub) or ``group[/sub...]/project`` (GitLab), else a 400."""
    segments = value.split("/")
    most = MAX_REPO_SEGMENTS[provider]
    if (
        len(value) > MAX_REPO_CHARS
        or not 2 <= len(segments) <= most
        or any(not _SEGMENT.fullmatch(s) or s in (".", "..") for s in segments)
    ):
        shape = "owner/name" if most == 2 else f"group/project with at most {most - 2} subgroups"
        raise _refuse(
            f"payload field {name} is not a repository path ({shape}; letters, digits, . _ -; "
            f"at most {MAX_REPO_CHARS} characters): {_shown(value)}"
        )
    return value


def repo_at(payload: Any, path: str, provider: str, *, optional: bool = False) -> str | None:
    value = field(payload, path, optional=optional)
    return None if value is None else repo_path(value, provider, path)


def number(value: int | None, name: str) -> int | None:
    """A pull request number or installation id: positive and within the INTEGER column."""
    if value is not None and not 0 < value <= MAX_INT:
        raise _refuse(f"payload field {name} is out of range (1 to {MAX_INT}): {value}")
    return value


def event(value: str) -> str:
    """The event header (``push``, ``Merge Request Hook``), bounded to its column."""
    if not _EVENT.fullmatch(value):
        raise WebhookError(400, f"event {_shown(value)} is not an event name (letters, digits, "
                                "spaces, . _ -; at most 64 characters)")
    return value


def action(value: Any) -> str | None:
    """A delivery's ``action`` if it is a string; bounded to its column (else a 400)."""
    if not isinstance(value, str):
        return None
    if not _ACTION.fullmatch(value):
        raise _refuse(f"payload field action is not an action name (letters, digits, . _ -; "
                      f"at most 64 characters): {_shown(value)}")
    return value


def clone_url_problem(url: str, web_url: str, repo: str) -> str | None:
    """Why ``url`` is not ``repo``'s clone URL on the forge at ``web_url``, or None.

    Compared as strings (ignoring ASCII case, as forges resolve hosts and paths), never
    parsed: a parser that reads ``https://forge@evil/`` or a tab differently from git is no
    gate. So the scheme, host, port and path prefix are the operator's, the rest is the
    (checked) repository path, and nothing else: no query, no dot segments, no spaces.
    """
    if not (url.isascii() and url.lower().startswith(web_url.lower() + "/")):
        return f"clone URL {_shown(url)} is not on {web_url}"
    expected = f"{web_url}/{repo}".lower()
    if url.lower() not in (expected, expected + ".git"):
        return f"clone URL {_shown(url)} is not the one of {repo} ({web_url}/{repo}.git)"
    return None


@dataclass(frozen=True)
class Rules:
    """The operator's decisions one forge's deliveries are held to (from the settings)."""

    provider: str
    #: The forge's web URL; every clone URL must be ``{web_url}/{repo}[.git]``.
    web_url: str
    #: The setting that holds ``web_url``, for reasons that say what to change.
    web_url_setting: str
    repositories: RepositoryPatterns = RepositoryPatterns()


def admit(decision: Decision, rules: Rules) -> Decision:
    """``decision`` as the operator allows it: ignored (with the reason) for a repository the
    bot does not serve; refused (400) for a clone URL that is not the repository's own."""
    repo = getattr(decision, "repo", None)
    if repo is None:
        return decision
    if not rules.repositories.matches(rules.provider, repo):
        return Ignore(f"repository {repo} is not one this bot serves (IMAGEBOT_REPOSITORIES)")
    if isinstance(decision, BuildRequest):
        problem = clone_url_problem(decision.clone_url, rules.web_url, repo)
        if problem:
            raise _refuse(f"{problem}, the forge's URL ({rules.web_url_setting})")
    return decision


def rules(settings: Settings, provider: str) -> Rules:
    """The rules of ``provider``'s deliveries under ``settings``."""
    if provider == "github":
        web_url, setting = settings.github_web_url, "IMAGEBOT_GITHUB_URL"
    else:
        web_url, setting = settings.gitlab_url, "IMAGEBOT_GITLAB_URL"
    return Rules(provider, web_url, setting, compiled(tuple(settings.repositories)))
