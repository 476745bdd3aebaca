"""Registry credentials: from settings, from a password file, or from a Docker credential helper.

Credentials belong to a registry host. IMAGEBOT_REGISTRY_USERNAME/PASSWORD/PASSWORD_FILE/
CREDENTIAL_HELPER are for IMAGEBOT_REGISTRY's host only; any other host gets what the
operator's IMAGEBOT_REGISTRY_AUTH_FILE (a Docker config.json: ``auths``, ``credHelpers``)
names for exactly that host, else nothing. A repository naming a host never chooses the key.

On an ``auth`` failure the pipeline calls :meth:`RegistryCredentials.refresh`, which reads the
source again: a rotated password file or a credential helper that now answers the new password
heals a build without anyone stepping in. One object serves all platforms of a build, so a
refresh by one push is seen by the others.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from bot.settings import Settings

HELPER_TIMEOUT = 30.0
#: An auth file is the operator's, but still read with a bound: a config.json is a few KiB.
AUTH_FILE_MAX_BYTES = 1024 * 1024
_HELPER_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class CredentialsError(Exception):
    kind = "auth"


@dataclass(frozen=True)
class Credentials:
    username: str
    password: SecretStr

    def auth_config(self) -> dict[str, str]:
        """The shape the Docker API takes in ``X-Registry-Auth``."""
        return {"username": self.username, "password": self.password.get_secret_value()}

    def __repr__(self) -> str:
        return f"Credentials(username={self.username!r}, password=**********)"


async def helper_get(helper: str, registry: str) -> Credentials:
    """``docker-credential-<helper> get`` for ``registry`` (the standard helper protocol)."""
    program = f"docker-credential-{helper}"
    if shutil.which(program) is None:
        raise CredentialsError(f"credential helper {program} is not on PATH")
    process = await asyncio.create_subprocess_exec(
        program, "get",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(registry.encode()), HELPER_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise CredentialsError(f"{program} get did not answer in {HELPER_TIMEOUT:.0f}s") from None
    if process.returncode != 0:
        reason = (err or out).decode("utf-8", "replace").strip()[:200] or f"exit {process.returncode}"
        raise CredentialsError(f"{program} has no credentials for {registry}: {reason}")
    try:
        answer = json.loads(out)
        return Credentials(str(answer["Username"]), SecretStr(str(answer["Secret"])))
    except (ValueError, KeyError, TypeError):
        raise CredentialsError(f"{program} get answered something that is not credentials") from None


def normalize_host(key: str) -> str:
    """A registry host as config.json keys spell it (``https://host:5000/v1/``) -> ``host:5000``."""
    key = key.strip().lower()
    key = key.split("://", 1)[1] if "://" in key else key
    return key.split("/", 1)[0]


def main_host(settings: Settings) -> str | None:
    """IMAGEBOT_REGISTRY's host, which the IMAGEBOT_REGISTRY_* credentials belong to."""
    return normalize_host(settings.registry) if settings.registry else None


def _auth_file_entry(path: Path, host: str) -> tuple[str, Credentials | str] | None:
    """What the auth file holds for ``host``: ("auth_file", credentials) or
    ("credential_helper", helper name), or None. Raises CredentialsError."""
    try:
        with path.open("rb") as handle:
            raw = handle.read(AUTH_FILE_MAX_BYTES + 1)
        if len(raw) > AUTH_FILE_MAX_BYTES:
            raise CredentialsError(f"the registry auth file is over {AUTH_FILE_MAX_BYTES} bytes")
        config = json.loads(raw)
    except OSError as exc:
        raise CredentialsError(f"cannot read the registry auth file: {exc.strerror}") from None
    except ValueError:
        raise CredentialsError("the registry auth file is not JSON (a Docker config.json)") from None
    helpers = {normalize_host(k): v for k, v in (config.get("credHelpers") or {}).items()}
    if isinstance(helpers.get(host), str) and _HELPER_NAME.match(helpers[host]):
        return "credential_helper", helpers[host]
    auths = {normalize_host(k): v for k, v in (config.get("auths") or {}).items()}
    entry = auths.get(host)
    if not isinstance(entry, dict):
        return None
    if entry.get("username") and entry.get("password"):
        return "auth_file", Credentials(str(entry["username"]), SecretStr(str(entry["password"])))
    try:
        user, _, password = base64.b64decode(str(entry.get("auth", "")), validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise CredentialsError(f"the registry auth file's entry for {host} is not base64 user:password") from None
    return ("auth_file", Credentials(user, SecretStr(password))) if user and password else None


class RegistryCredentials:
    """The credentials for one registry host, and how to read them again."""

    def __init__(self, registry: str, settings: Settings) -> None:
        self.registry = normalize_host(registry)
        self.settings = settings
        self._main = self.registry == main_host(settings) and bool(
            settings.registry_credential_helper or settings.registry_password_file or settings.registry_username
        )
        self.source = (
            "credential_helper" if self._main and settings.registry_credential_helper
            else "password_file" if self._main and settings.registry_password_file
            else "settings" if self._main
            else self._file_source()
        )
        self._current: Credentials | None = None
        self._lock = asyncio.Lock()
        self.generation = 0  # how many times credentials were (re)read
        self._changed_at = 0  # the generation that last brought different credentials

    def _file_source(self) -> str | None:
        """The auth file's source for this host, or None (this host gets no credentials).
        A file that cannot be read counts as configured, so the push says why it failed."""
        path = self.settings.registry_auth_file
        if path is None:
            return None
        try:
            entry = _auth_file_entry(path, self.registry)
        except CredentialsError:
            return "auth_file"
        return entry[0] if entry else None

    @property
    def configured(self) -> bool:
        return self.source is not None

    async def get(self) -> Credentials | None:
        """The current credentials (read on first use); None where none are configured."""
        if not self.configured:
            return None
        async with self._lock:
            if self._current is None:
                self._current = await self._read()
                self.generation += 1
                self._changed_at = self.generation
            return self._current

    async def refresh(self, seen_generation: int | None = None) -> tuple[Credentials, bool]:
        """Read the source again; (credentials, whether they changed). Raises CredentialsError.

        ``seen_generation``: the generation the caller failed with; if another caller refreshed
        since, its result is used instead of reading again (changed: whether the credentials
        differ from the ones the caller failed with).
        """
        async with self._lock:
            if seen_generation is not None and self.generation > seen_generation and self._current:
                return self._current, self._changed_at > seen_generation
            fresh = await self._read()
            changed = self._current is None or fresh != self._current
            self._current = fresh
            self.generation += 1
            if changed:
                self._changed_at = self.generation
            return fresh, changed

    async def _read(self) -> Credentials:
        s = self.settings
        if not self._main:
            return await self._read_file()
        if s.registry_credential_helper:
            return await helper_get(s.registry_credential_helper, self.registry)
        if s.registry_password_file:
            try:
                password = Path(s.registry_password_file).read_text().strip()
            except OSError as exc:
                raise CredentialsError(f"cannot read the registry password file: {exc.strerror}") from None
            if not password:
                raise CredentialsError("the registry password file is empty")
            return Credentials(s.registry_username or "", SecretStr(password))
        if s.registry_username and s.registry_password:
            return Credentials(s.registry_username, s.registry_password)
        raise CredentialsError("no registry credentials are configured")

    async def _read_file(self) -> Credentials:
        path = self.settings.registry_auth_file
        entry = _auth_file_entry(path, self.registry) if path else None
        if entry is None:
            raise CredentialsError(f"no registry credentials are configured for {self.registry}")
        source, value = entry
        if isinstance(value, str):
            return await helper_get(value, self.registry)
        return value
