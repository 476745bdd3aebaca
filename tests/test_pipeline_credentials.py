"""Registry credentials read again on a refusal (bot.pipeline.credentials), from a real
password file: what a refresh tells its caller, alone and when another platform refreshed first."""

from __future__ import annotations

import base64
import json

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
    settings = make_settings(registry="registry.example", registry_username="bot", registry_password_file=str(path))
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


# -- credentials belong to a host -------------------------------------------------------------


async def test_the_registry_credentials_go_to_the_registry_host_only():
    settings = make_settings(registry="registry.example:5000/team", registry_username="bot",
                             registry_password="pw")
    assert (await RegistryCredentials("registry.example:5000", settings).get()).username == "bot"
    for other in ("evil.example.com", "registry.example", "registry.example:5001"):
        credentials = RegistryCredentials(other, settings)
        assert not credentials.configured and await credentials.get() is None


async def test_another_host_gets_only_what_the_auth_file_names_for_it(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"auths": {
        "https://ghcr.io": {"auth": base64.b64encode(b"gh-user:gh-token").decode()},
        "quay.io": {"username": "q", "password": "qpw"},
    }}))
    settings = make_settings(registry="registry.example/team", registry_username="bot", registry_password="pw",
                             registry_auth_file=str(path))
    ghcr = RegistryCredentials("ghcr.io", settings)
    assert ghcr.source == "auth_file"
    got = await ghcr.get()
    assert (got.username, got.password.get_secret_value()) == ("gh-user", "gh-token")
    assert (await RegistryCredentials("quay.io", settings).get()).username == "q"
    assert await RegistryCredentials("evil.example.com", settings).get() is None
    assert (await RegistryCredentials("registry.example", settings).get()).username == "bot"


@pytest.mark.parametrize(("realm", "host", "allowed"), [
    ("https://auth.docker.io/token", "registry-1.docker.io", True),
    ("http://127.0.0.1:5999/token", "127.0.0.1:5000", True),  # the registry's own host
    ("http://127.0.0.2:5999/token", "127.0.0.1:5000", False),
    ("http://evil.example.com/token", "registry.example", False),
    ("file:///etc/passwd", "registry.example", False),
    ("not a url", "registry.example", False),
])
def test_credentials_reach_a_bearer_realm_only_over_https_or_on_the_registrys_own_host(realm, host, allowed):
    from bot.pipeline.manifest import realm_may_get_credentials

    assert realm_may_get_credentials(realm, host) is allowed


async def test_credentials_never_reach_a_plain_http_realm_on_another_host():
    """A registry (here: a recorder on 127.0.0.1) names a token realm over plain http on another
    host (a recorder on 127.0.0.2): the realm must not be sent the registry's password."""
    from bot.pipeline.manifest import RegistryClient
    from bot.pipeline.push import RegistryError
    from tests.standins.recorder import Recorder

    with Recorder(host="127.0.0.2", status=200, body=b'{"token": "t"}') as realm:
        challenge = f'Bearer realm="{realm.url}/token",service="registry"'
        with Recorder(host="127.0.0.1", headers={"WWW-Authenticate": challenge}) as registry:
            settings = make_settings(registry=f"{registry.host}/team", registry_username="bot",
                                     registry_password="the-password")
            client = RegistryClient(registry.host, RegistryCredentials(registry.host, settings))
            try:
                with pytest.raises(RegistryError) as info:
                    await client.describe("team/app", "latest", "linux/amd64")
            finally:
                await client.aclose()
    assert realm.requests == [] and registry.authorizations == []
    assert info.value.kind == "denied" and realm.url in info.value.detail
