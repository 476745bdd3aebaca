"""Registry credentials read again on a refusal (bot.pipeline.credentials), from a real
password file: what a refresh tells its caller, alone and when another platform refreshed first."""

from __future__ import annotations

import pytest

from bot.pipeline.credentials import RegistryCredentials
from tests.support import make_settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def from_file(tmp_path, password: str) -> tuple[RegistryCredentials, object]:
    path = tmp_path / "password"
    path.write_text(password + "\n")
    settings = make_settings(registry_username="bot", registry_password_file=str(path))
    return RegistryCredentials("registry.example", settings), path


async def test_a_refresh_says_whether_the_source_answered_different_credentials(tmp_path):
    credentials, path = from_file(tmp_path, "first")
    assert (await credentials.get()).password.get_secret_value() == "first"
    assert (await credentials.refresh(credentials.generation))[1] is False  # nobody told the file
    path.write_text("second\n")
    fresh, changed = await credentials.refresh(credentials.generation)
    assert changed and fresh.password.get_secret_value() == "second"
    assert (await credentials.get()) == fresh


async def test_a_refresh_after_another_callers_reuses_it_and_tells_the_truth(tmp_path):
    credentials, path = from_file(tmp_path, "first")
    await credentials.get()
    seen = credentials.generation  # two platforms failed with these
    await credentials.refresh(seen)  # the first one's refresh: the file still says "first"
    path.write_text("second\n")  # (read only if the second platform read again; it must not)
    reused, changed = await credentials.refresh(seen)
    assert reused.password.get_secret_value() == "first" and changed is False

    later = credentials.generation
    await credentials.refresh(later)  # now the file's "second" is read
    assert (await credentials.refresh(later))[1] is True  # a caller that failed with "first"
