"""Build secrets: values the operator hands to trusted builds, never the repository's.

The operator's ``IMAGEBOT_BUILD_SECRETS_FILE`` (JSON or YAML) maps repository globs to the
secrets builds of those repositories may use::

    acme/app:   {NPM_TOKEN: "…"}
    "acme/*":   {PIP_INDEX_TOKEN_FILE: /run/secrets/pip-token}   # a file holding the value
    "**":       {SENTRY_DSN: "…"}

A glob's ``*`` matches within one path segment and ``**`` any number of them (so ``acme/*``
does not cover ``acme/sub/app``), case-insensitively. Every entry matching a repository
applies, in file order, a later one overriding an earlier one's name. ``NAME_FILE: path``
reads the value from ``path`` (relative to the secrets file; one trailing newline dropped).

A repository only *asks* for secrets by name (``secrets: [NPM_TOKEN]`` in ``.imagebot.yml``):
it gets those, if the operator gave them to it, and a fork's pull request never gets any.
Nothing here ever puts a value in a message: errors name the file, the entry and the name,
and the line and column of a syntax error, never the text around it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import yaml

from bot import repositories

#: Far more than any secrets file needs; a bigger one is a mistake.
MAX_FILE_BYTES = 1024 * 1024
#: Shorter values can't be told from ordinary text, in logs or in an image's history.
MIN_LENGTH = 8
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)
_SUFFIX = "_FILE"

#: (repository glob, {NAME: value}) in file order.
Entries = list[tuple[str, dict[str, str]]]


class SecretsFileError(Exception):
    """The operator's secrets file cannot be used; kind ``secrets`` (the operator mends it)."""

    kind = "secrets"

    def __init__(self, path: Path, problems: list[str]) -> None:
        self.problems = problems
        self.message = f"IMAGEBOT_BUILD_SECRETS_FILE {path}: " + "; ".join(problems)
        super().__init__(self.message)


def glob_matches(glob: str, provider: str, repo: str) -> bool:
    """Whether ``glob`` covers ``provider``'s ``repo`` (bot.repositories: ``*`` one segment,
    ``**`` any, case ignored, an optional ``github:``/``gitlab:`` prefix)."""
    return repositories.matches(glob, provider, repo)


def _parse(path: Path, data: bytes) -> object:
    text = data.decode("utf-8")
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SecretsFileError(path, [f"neither JSON nor YAML{where}"]) from None


def _value(path: Path, glob: str, name: str, value: object) -> tuple[str, str]:
    """(NAME, value) of one entry item; raises ValueError with what is wrong (never the value)."""
    if name.endswith(_SUFFIX) and len(name) > len(_SUFFIX):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{glob!r}: {name} must be a file path")
        file = path.parent / value
        try:
            content = file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{glob!r}: {name}: cannot read {file}: {getattr(exc, 'strerror', None) or exc}") from None
        name, value = name[:-len(_SUFFIX)], content.removesuffix("\n").removesuffix("\r")
    if not _NAME.fullmatch(name):
        raise ValueError(f"{glob!r}: {name!r} is not a build arg name (letters, digits and _)")
    if not isinstance(value, str):
        raise ValueError(f"{glob!r}: {name} must be a string (put it in quotes)")
    if len(value) < MIN_LENGTH:
        raise ValueError(f"{glob!r}: {name} is shorter than {MIN_LENGTH} characters (a value that short "
                         "would be masked out of unrelated text, and found in images it is not in)")
    return name, value


def parse_entries(path: Path, data: bytes) -> Entries:
    """The entries of a secrets file's bytes (pure but for ``*_FILE`` reads)."""
    try:
        loaded = _parse(path, data)
    except UnicodeDecodeError:
        raise SecretsFileError(path, ["not UTF-8 text"]) from None
    if not isinstance(loaded, dict):
        raise SecretsFileError(path, ["expected a mapping of repository globs to {NAME: value}"])
    entries: Entries = []
    problems: list[str] = []
    for glob, items in loaded.items():
        if not isinstance(glob, str) or not glob:
            problems.append("every key must be a repository glob such as acme/app or acme/*")
            continue
        if problem := repositories.pattern_problem(glob):
            problems.append(problem)
            continue
        if not isinstance(items, dict):
            problems.append(f"{glob!r}: expected a mapping of NAME to a value or NAME_FILE to a path")
            continue
        values: dict[str, str] = {}
        for name, value in items.items():
            try:
                key, secret = _value(path, glob, str(name), value)
            except ValueError as exc:
                problems.append(str(exc))
                continue
            if key in values:
                problems.append(f"{glob!r}: {key} is given twice (as {key} and {key}{_SUFFIX})")
            values[key] = secret
        entries.append((glob, values))
    if problems:
        raise SecretsFileError(path, problems)
    return entries


def load(path: Path) -> Entries:
    """Read and check the secrets file at ``path``; raises :class:`SecretsFileError`."""
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SecretsFileError(path, [f"cannot be read: {exc.strerror or exc}"]) from None
    if len(data) > MAX_FILE_BYTES:
        raise SecretsFileError(path, [f"is over the limit of {MAX_FILE_BYTES} bytes"])
    return parse_entries(path, data)


def for_repository(entries: Entries, provider: str, repo: str) -> dict[str, str]:
    """The secrets the operator gives to ``provider``'s ``repo`` (pure): every matching entry,
    in order. GitLab's ``acme/app`` is not GitHub's: a ``github:`` or ``gitlab:`` prefix names
    one forge's repositories, and an entry without one covers both."""
    given: dict[str, str] = {}
    for glob, values in entries:
        if glob_matches(glob, provider, repo):
            given.update(values)
    return given


def select(asked: list[str], given: Mapping[str, str], repo: str) -> dict[str, str]:
    """The secrets a trusted build of ``repo`` gets: the ones its config asks for (pure).

    Asking for one the operator did not give to ``repo`` is the repository's mistake:
    ValueError naming it and what is available (names only).
    """
    missing = [name for name in asked if name not in given]
    if missing:
        available = ", ".join(sorted(given)) or "none"
        raise ValueError(
            f"secrets: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not among the build "
            f"secrets the operator gives to {repo} (IMAGEBOT_BUILD_SECRETS_FILE; available: {available})")
    return {name: given[name] for name in asked}


__all__ = ["Entries", "SecretsFileError", "for_repository", "glob_matches", "load", "parse_entries", "select"]
