"""Fetch exactly the build's commit with git, over HTTPS with the forge's token.

A shallow fetch of the sha itself (what a CI wants: one commit, no history) works on servers
that allow unadvertised objects in ``want`` (GitHub and GitLab do); otherwise the ref is fetched
and the sha looked up in it. The token travels as an ``http.<origin>/.extraHeader`` set through
``GIT_CONFIG_*`` environment variables: never on a command line, in a URL, in .git/config or in
a credential store, and only sent to the forge's own origin. Every message that leaves this
module has the token masked in every form (bot.masking).

A clone URL and a ref reach git as data, never as options: every command puts ``--`` before
them (a URL ``--upload-pack=sh -c …`` is otherwise an option that runs a command), and git may
use only the allowed transports (``GIT_ALLOW_PROTOCOL``, https and http by default: no
``file://`` reads of the host's repositories, no ``ext::`` commands). Webhook deliveries are
held to the forge's own URL before they are stored (bot.webhooks.checks); this is the second
wall, for every caller.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import tempfile
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import SecretStr

from bot.masking import Masker
from bot.pipeline import StepError

SHA = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
#: Usernames that go with a token in HTTP Basic auth, per forge.
TOKEN_USERS = {"github": "x-access-token", "gitlab": "oauth2"}
#: The transports git may use unless the caller allows others (IMAGEBOT_GIT_PROTOCOLS).
DEFAULT_PROTOCOLS = ("https", "http")


class FetchError(StepError):
    """``kind``: not_found, auth, sha_not_found, timeout, network, failed."""


@dataclass(frozen=True)
class Checkout:
    path: Path
    sha: str
    method: str  # "sha" or "ref"
    duration_s: float


_HTTP_ERROR = re.compile(r"(?:returned error|http status|status code)[: ]+(\d{3})\b", re.I)


def classify(stderr: str) -> str:
    """The kind of a failed git fetch, from what git printed.

    HTTP statuses are read from git's own wording ("The requested URL returned error: 403"),
    never as bare digits: a URL's port (127.0.0.1:33401) is no status.
    """
    text = stderr.lower()
    statuses = {int(code) for code in _HTTP_ERROR.findall(stderr)}
    if statuses & {401, 403} or any(s in text for s in (
            "authentication failed", "could not read username", "could not read password")):
        return "auth"
    if 404 in statuses or any(s in text for s in (
            "repository not found", "not found", "does not appear to be a git")):
        return "not_found"
    if any(s in text for s in ("not our ref", "unadvertised object", "couldn't find remote ref",
                                "no such remote ref", "remote error: upload-pack")):
        return "sha_not_found"
    if any(s in text for s in ("operation too slow", "timed out", "timeout")):
        return "timeout"
    if any(s in text for s in ("could not resolve host", "connection refused", "failed to connect",
                                "connection reset", "early eof", "unexpected disconnect", "empty reply")):
        return "network"
    return "failed"


def check_url(clone_url: str, protocols: Sequence[str] = DEFAULT_PROTOCOLS) -> None:
    """Refuse a clone URL git must not be given: one that reads as an option, or whose
    transport is not allowed (``host:path`` is ssh to git; a bare path is ``file``)."""
    scheme, sep, _ = clone_url.partition("://")
    if not sep:
        scheme = "ssh" if re.match(r"^[^/]+:", clone_url) else "file"
    if clone_url.startswith("-") or scheme.lower() not in protocols:
        raise FetchError("failed", f"clone URL {clone_url!r} is not allowed: git may use "
                                   f"{', '.join(protocols)} (IMAGEBOT_GIT_PROTOCOLS)")


def git_env(clone_url: str, token: SecretStr | None, username: str, home: Path,
            protocols: Sequence[str] = DEFAULT_PROTOCOLS) -> dict[str, str]:
    """An isolated environment for git: no user or system config, no prompts, token in a
    header, only the allowed transports."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "LC_ALL": "C",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        # A stalled transfer (under 1 KB/s for 30 s) is abandoned instead of hanging.
        "GIT_HTTP_LOW_SPEED_LIMIT": "1000",
        "GIT_HTTP_LOW_SPEED_TIME": "30",
        # git refuses any other transport, for the URL and for whatever it is redirected to
        "GIT_ALLOW_PROTOCOL": ":".join(protocols),
    }
    config = [("protocol.version", "2"), ("advice.detachedHead", "false")]
    if token is not None:
        parts = urlsplit(clone_url)
        basic = base64.b64encode(f"{username}:{token.get_secret_value()}".encode()).decode()
        config.append((f"http.{parts.scheme}://{parts.netloc}/.extraHeader", f"Authorization: Basic {basic}"))
    env["GIT_CONFIG_COUNT"] = str(len(config))
    for n, (key, value) in enumerate(config):
        env[f"GIT_CONFIG_KEY_{n}"] = key
        env[f"GIT_CONFIG_VALUE_{n}"] = value
    return env


def masker(token: SecretStr | None, username: str) -> Masker:
    """The masker of a fetch: the token, in the clear and in any encoding (bot.masking),
    and its HTTP Basic pair with ``username``."""
    masked = Masker()
    masked.add_basic(username, token.get_secret_value() if token is not None else None)
    return masked


async def _git(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        "git", *args, cwd=cwd, env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        # its own process group: git runs helpers (git-remote-http) that must die with it
        start_new_session=True,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()
        raise
    return process.returncode or 0, output.decode("utf-8", "replace")


async def fetch(
    clone_url: str,
    sha: str,
    ref: str,
    dest: Path,
    *,
    token: SecretStr | None = None,
    username: str = "x-access-token",
    timeout: float = 300.0,
    log: Callable[[list[str]], Awaitable[None]] | None = None,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
) -> Checkout:
    """Check out ``sha`` of ``clone_url`` into ``dest`` (created; must not exist)."""
    if not SHA.fullmatch(sha):
        raise FetchError("sha_not_found", f"{sha!r} is not a full commit sha")
    check_url(clone_url, protocols)
    started = time.monotonic()
    mask = masker(token, username).mask
    dest.mkdir(parents=True)
    env = git_env(clone_url, token, username, dest.parent, protocols)
    deadline = started + timeout

    async def run(*args: str) -> tuple[int, str]:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise FetchError("timeout", f"fetching {mask(clone_url)} took longer than {timeout:.0f}s")
        try:
            code, output = await _git(list(args), env, dest, remaining)
        except TimeoutError:
            raise FetchError("timeout", f"fetching {mask(clone_url)} took longer than {timeout:.0f}s") from None
        output = mask(output)
        if log is not None and output.strip():
            await log([line for line in output.splitlines() if line.strip()])
        return code, output

    await run("init", "-q")
    code, output = await run("fetch", "--depth", "1", "--no-tags", "--", clone_url, sha)
    method = "sha"
    if code != 0:
        kind = classify(output)
        if kind != "sha_not_found":
            raise FetchError(kind, _message(kind, mask(clone_url), sha, output))
        method = "ref"
        code, output = await run("fetch", "--no-tags", "--", clone_url, ref)
        if code != 0:
            kind = classify(output)
            raise FetchError(kind, _message(kind, mask(clone_url), ref, output))
        code, _ = await run("cat-file", "-e", f"{sha}^{{commit}}")
        if code != 0:
            raise FetchError("sha_not_found", f"commit {sha} is not in {ref} of {mask(clone_url)}")
    code, output = await run("checkout", "-q", "--detach", sha, "--")
    if code != 0:
        raise FetchError("failed", f"checking out {sha} failed: {_tail(output)}")
    return Checkout(dest, sha, method, round(time.monotonic() - started, 3))


@dataclass(frozen=True)
class Resolved:
    ref: str
    sha: str
    default_branch: str | None


async def resolve(
    clone_url: str, ref_or_sha: str, *, token: SecretStr | None = None,
    username: str = "x-access-token", ref: str | None = None, timeout: float = 60.0,
    protocols: Sequence[str] = DEFAULT_PROTOCOLS,
) -> Resolved:
    """Which commit ``ref_or_sha`` names on the remote (``git ls-remote``), and its ref.

    A full sha is taken as it is (with ``ref``, or the default branch, as the ref to fall
    back on when fetching); a name is looked up as a branch, then as a tag.
    """
    check_url(clone_url, protocols)
    mask = masker(token, username).mask
    with tempfile.TemporaryDirectory(prefix="imagebot-resolve-") as home:
        env = git_env(clone_url, token, username, Path(home), protocols)
        candidates = [ref_or_sha] if ref_or_sha.startswith("refs/") else [
            f"refs/heads/{ref_or_sha}", f"refs/tags/{ref_or_sha}^{{}}", f"refs/tags/{ref_or_sha}"]
        try:
            code, output = await _git(["ls-remote", "--symref", "--", clone_url, "HEAD", *candidates],
                                      env, Path(home), timeout)
        except TimeoutError:
            raise FetchError("timeout", f"listing {mask(clone_url)} timed out") from None
    output = mask(output)
    if code != 0:
        kind = classify(output)
        raise FetchError(kind, _message(kind, mask(clone_url), ref_or_sha, output))
    refs: dict[str, str] = {}
    default_branch = None
    for line in output.splitlines():
        if line.startswith("ref: ") and line.endswith("\tHEAD"):
            default_branch = line[5:-5].removeprefix("refs/heads/")
        elif "\t" in line:
            sha, name = line.split("\t", 1)
            refs[name] = sha
    if SHA.fullmatch(ref_or_sha):
        return Resolved(ref or (f"refs/heads/{default_branch}" if default_branch else "HEAD"),
                        ref_or_sha, default_branch)
    for candidate in candidates:
        if candidate in refs:
            name = candidate.removesuffix("^{}")
            return Resolved(name, refs[candidate], default_branch)
    raise FetchError("sha_not_found", f"{ref_or_sha!r} is neither a branch nor a tag of {mask(clone_url)}")


def _tail(output: str, limit: int = 500) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return " / ".join(lines[-3:])[-limit:]


def _message(kind: str, url: str, what: str, output: str) -> str:
    lead = {
        "auth": f"the forge refused the bot's credentials for {url}",
        "not_found": f"repository {url} was not found (or the bot may not read it)",
        "sha_not_found": f"{what} was not found in {url}",
        "timeout": f"fetching {url} timed out",
        "network": f"could not reach {url}",
    }.get(kind, f"git fetch of {url} failed")
    return f"{lead}: {_tail(output)}"
