"""Is this commit still its ref's head? Asked with ``git ls-remote`` just before publishing.

A re-run, Retry or admin rebuild of an old commit must not move a branch tag, ``latest`` or a
version alias back to old code; nor may a build whose ref moved on while it ran. The check
runs with the same isolated git environment (and token) as the fetch.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydantic import SecretStr

from bot.pipeline.fetch import DEFAULT_PROTOCOLS, _git, check_url, git_env, masker


class HeadUnknown(Exception):
    """The remote could not tell us the ref's head (a network fault, a refusal, a timeout)."""


async def ref_head(clone_url: str, ref: str, *, token: SecretStr | None, username: str,
                   timeout: float = 60.0, protocols: Sequence[str] = DEFAULT_PROTOCOLS) -> str | None:
    """The sha ``ref`` points at on the remote (a tag's commit, peeled), None when the ref is
    gone; raises :class:`HeadUnknown` (its message masked) when git cannot tell."""
    check_url(clone_url, protocols)
    mask = masker(token, username).mask
    patterns = [ref, f"{ref}^{{}}"] if ref.startswith("refs/tags/") else [ref]
    with tempfile.TemporaryDirectory(prefix="imagebot-head-") as home:
        env = git_env(clone_url, token, username, Path(home), protocols)
        try:
            code, output = await _git(["ls-remote", "--", clone_url, *patterns], env, Path(home), timeout)
        except TimeoutError:
            raise HeadUnknown(f"git ls-remote of {ref} took longer than {timeout:.0f}s") from None
    if code != 0:
        lines = [line for line in mask(output).splitlines() if line.strip()]
        raise HeadUnknown(f"git ls-remote of {ref} failed: {' / '.join(lines[-2:])[-300:]}")
    heads = dict(reversed(line.split("\t", 1)) for line in output.splitlines() if "\t" in line)
    return heads.get(f"{ref}^{{}}") or heads.get(ref)
