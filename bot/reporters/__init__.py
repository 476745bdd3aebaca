"""Reporting back to the forges: commit statuses (and, later, check runs) for every build."""

from __future__ import annotations

from urllib.parse import quote


def api_path(*segments: str | int) -> str:
    """``/seg/seg/...``, each segment percent-encoded whole (``/``, ``?``, ``#`` and ``%`` too).

    A forge API path is built from a build's fields (repository, sha); ingress checks them, and
    this makes sure none can still climb out of its segment: ``../../projects/5/members?x=1``
    as a sha is one odd segment, not another API call made with the bot's token. A segment that
    is empty or a dot segment (which clients and servers collapse) is refused as ``invalid``.
    """
    from bot.reporters.errors import ReportError

    parts = [str(segment) for segment in segments]
    bad = [part for part in parts if part in ("", ".", "..")]
    if bad:
        raise ReportError("invalid", f"an API path segment is empty or a dot segment: {bad!r}")
    return "".join("/" + quote(part, safe="") for part in parts)
