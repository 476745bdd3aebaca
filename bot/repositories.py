"""Which repositories the operator serves (``IMAGEBOT_REPOSITORIES``, a list of globs), and the
one repository-glob matcher every other setting that names repositories uses.

A forge's shared secret proves only that a delivery came from the forge, not that the bot
should build what it names: a GitLab token reaches every project of the instance, a GitHub App
every repository it was installed on. The operator lists the repositories the bot serves;
deliveries for any other are ignored (and recorded, so it shows).

Globs follow shells' ``globstar``, matched by wcmatch (the matcher behind mkdocs and
Python-Markdown's tools): ``*`` matches within one path segment, ``**`` any number of segments,
so ``group/*`` covers ``group/app`` but not ``group/sub/app``; ``group/**`` covers both. A
``github:`` or ``gitlab:`` prefix limits a pattern to that forge. Matching ignores case, as
both forges do when they resolve a path (``Acme/App`` is ``acme/app``), and ``*`` also matches
names that start with a dot (``acme/.github``).

Pure: no bot imports, so the settings can check the patterns at start-up with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from wcmatch import glob

#: Segments of a pattern: the characters a repository path may have, plus glob syntax.
_PATTERN = re.compile(r"^[A-Za-z0-9_.*?\[\]!-]+(/[A-Za-z0-9_.*?\[\]!-]+)*$")
_FLAGS = glob.GLOBSTAR | glob.DOTGLOB | glob.IGNORECASE | glob.FORCEUNIX
FORGES = ("github", "gitlab")
EVERYTHING = "**"


def split_forge(pattern: str) -> tuple[str | None, str]:
    """``("gitlab", "group/**")`` for ``gitlab:group/**``; ``(None, p)`` without a prefix."""
    forge, colon, rest = pattern.partition(":")
    return (forge, rest) if colon else (None, pattern)


def pattern_problem(pattern: str) -> str | None:
    """Why ``pattern`` cannot be a repository glob, or None."""
    forge, glob_ = split_forge(pattern.strip())
    if forge is not None and forge not in FORGES:
        return f"{pattern!r}: the prefix must be one of {', '.join(f + ':' for f in FORGES)}"
    if not _PATTERN.fullmatch(glob_):
        return f"{pattern!r} is not a repository glob such as acme/*, group/** or gitlab:group/app"
    return None


@dataclass(frozen=True)
class RepositoryPatterns:
    """The operator's allowlist, compiled once; ``matches`` is what ingress asks."""

    patterns: tuple[str, ...] = (EVERYTHING,)

    def __post_init__(self) -> None:
        problems = [p for p in map(pattern_problem, self.patterns) if p]
        if problems:
            raise ValueError("; ".join(problems))
        by_forge: dict[str | None, list[str]] = {}
        for pattern in self.patterns:
            forge, glob_ = split_forge(pattern.strip())
            by_forge.setdefault(forge, []).append(glob_)
        compiled = {forge: glob.compile(globs, flags=_FLAGS) for forge, globs in by_forge.items()}
        object.__setattr__(self, "_compiled", compiled)

    def matches(self, forge: str, repo: str) -> bool:
        """Whether ``repo`` (``owner/name``, ``group/sub/project``) of ``forge`` is served."""
        compiled = self._compiled  # type: ignore[attr-defined]
        return any(compiled[key].match(repo) for key in (None, forge) if key in compiled)


@lru_cache(maxsize=256)
def compiled(patterns: tuple[str, ...]) -> RepositoryPatterns:
    """The patterns of a settings object, compiled once per process rather than per delivery."""
    return RepositoryPatterns(patterns)


def matches(pattern: str, forge: str, repo: str) -> bool:
    """Whether one glob covers ``forge``'s ``repo``: the one matcher behind every setting that
    names repositories (``REPOSITORIES``, ``IMAGE_POLICY``, the build secrets file), so
    ``acme/*`` means the same everywhere. An invalid pattern matches nothing (each setting
    refuses those at start-up)."""
    try:
        return compiled((pattern,)).matches(forge, repo)
    except ValueError:
        return False
