"""Registry credentials: from settings, from a password file, or from a Docker credential helper.

On an ``auth`` failure the pipeline calls :meth:`RegistryCredentials.refresh`, which reads the
source again: a rotated password file or a credential helper that now answers the new password
heals a build without anyone stepping in. One object serves all platforms of a build, so a
refresh by one push is seen by the others.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from pydantic import SecretStr

from bot.settings import Settings

HELPER_TIMEOUT = 30.0


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


class RegistryCredentials:
    """The credentials for one registry host, and how to read them again."""

    def __init__(self, registry: str, settings: Settings) -> None:
        self.registry = registry
        self.settings = settings
        self.source = (
            "credential_helper" if settings.registry_credential_helper
            else "password_file" if settings.registry_password_file
            else "settings"
        )
        self._current: Credentials | None = None
        self._lock = asyncio.Lock()
        self.generation = 0  # how many times credentials were (re)read
        self._changed_at = 0  # the generation that last brought different credentials

    @property
    def configured(self) -> bool:
        s = self.settings
        return bool(s.registry_credential_helper or s.registry_password_file or s.registry_username)

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
