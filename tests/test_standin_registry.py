"""The registry stand-ins (tests/standins/registry.py, credential_helper.py) against the real
Docker engine and the real distribution 2.8.2 binary.

These tests pin down, with exact texts, what the engine and the registry say in each failure
mode imagebot's push and manifest steps must classify: wrong password, rotated password,
registry down, push denied for a repository, token expired (before and during a push), token
service failing.  With ``decode=True`` the Docker SDK reports every one of them as a *stream
item* ``{"error": ..., "errorDetail": {"message": ...}}``, never as an exception.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import docker.credentials
import docker.errors
import docker.utils
import httpx
import jwt
import pytest

from tests.standins.credential_helper import NOT_FOUND, CredentialHelper, server_key
from tests.standins.registry import (
    DEFAULT_ISSUER,
    DEFAULT_SERVICE,
    HtpasswdRegistry,
    TokenRegistry,
    libtrust_key_id,
)
from tests.support import infra, wait_until

# Exact texts, as the engine (20.10) streams them: the push-error classifier's vocabulary.
UNAUTHORIZED = "unauthorized: authentication required"
DENIED = "denied: requested access to the resource is denied"
TOKEN_BAD_PASSWORD = "unauthorized: incorrect username or password"  # the token server's "details"
NO_BASIC_CREDS = "no basic auth credentials"
REGISTRY_DOWN = 'Get "http://{host}/v2/": dial tcp {host}: connect: connection refused'

MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"


# --------------------------------------------------------------------------- fixtures


def _our_processes(marker: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "docker-registry" in cmdline and marker in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


@pytest.fixture(autouse=True)
def _no_leaked_registries(tmp_path: Path) -> Iterator[None]:
    yield
    assert _our_processes(str(tmp_path)) == [], "a docker-registry of this test outlived it"


class Engine:
    """The real Docker engine, with the base image pulled and every tag made here removed."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.client = docker.from_env(timeout=120)
        self.api = self.client.api
        self.base = env["IMAGEBOT_TEST_BASE_IMAGE"]
        self._tags: list[str] = []
        repo, tag = self.base.rsplit(":", 1)
        creds = {
            "username": env["IMAGEBOT_TEST_REGISTRY_USERNAME"],
            "password": env["IMAGEBOT_TEST_REGISTRY_PASSWORD"],
        }
        items = list(self.api.pull(repo, tag, stream=True, decode=True, auth_config=creds))
        assert not [i for i in items if "error" in i], items

    def tag(self, repository: str, tag: str = "v1", source: str | None = None) -> str:
        assert self.api.tag(source or self.base, repository, tag)
        self._tags.append(f"{repository}:{tag}")
        return repository

    def track(self, ref: str) -> None:
        """Remove ``ref`` from the engine after the test."""
        self._tags.append(ref)

    def push(self, repository: str, tag: str, auth_config: dict[str, str] | None) -> list[dict[str, Any]]:
        return list(self.api.push(repository, tag, stream=True, decode=True, auth_config=auth_config))

    def cleanup(self) -> None:
        for ref in reversed(self._tags):
            try:
                self.api.remove_image(ref)
            except docker.errors.NotFound:
                pass
        self._tags.clear()


@pytest.fixture(scope="module")
def engine_session() -> Iterator[Engine]:
    engine = Engine(infra("docker", "base-image"))
    yield engine
    engine.client.close()


@pytest.fixture
def engine(engine_session: Engine) -> Iterator[Engine]:
    yield engine_session
    engine_session.cleanup()


@pytest.fixture
def htpasswd_registry(tmp_path: Path) -> Iterator[HtpasswdRegistry]:
    with HtpasswdRegistry(tmp_path, users={"bot": "first-password"}) as registry:
        yield registry


@pytest.fixture
def token_registry(tmp_path: Path) -> Iterator[TokenRegistry]:
    with TokenRegistry(tmp_path, users={"bot": "token-password"}) as registry:
        yield registry


def outcome(items: list[dict[str, Any]]) -> tuple[str, str]:
    """``("ok", digest)`` or ``("error", message)`` from a decoded push stream."""
    errors = [item for item in items if "error" in item]
    if errors:
        assert errors[-1]["errorDetail"]["message"] == errors[-1]["error"]
        return "error", errors[-1]["error"]
    digests = [item["aux"]["Digest"] for item in items if "Digest" in item.get("aux", {})]
    assert digests, f"push stream has neither an error nor an aux Digest: {items}"
    return "ok", digests[-1]


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    return scheme, dict(re.findall(r'(\w+)="([^"]*)"', rest))


# --------------------------------------------------------------------------- htpasswd registry


def test_htpasswd_registry_answers_basic_challenge(htpasswd_registry: HtpasswdRegistry) -> None:
    registry = htpasswd_registry
    assert registry.host == f"127.0.0.1:{registry.port}"
    response = httpx.get(f"{registry.url}/v2/")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == 'Basic realm="imagebot-test"'
    assert response.json() == {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required", "detail": None}]}
    assert httpx.get(f"{registry.url}/v2/", auth=("bot", "first-password")).status_code == 200
    assert httpx.get(f"{registry.url}/v2/", auth=("bot", "nope")).status_code == 401


def test_htpasswd_push_wrong_password_and_rotation(engine: Engine, htpasswd_registry: HtpasswdRegistry) -> None:
    registry = htpasswd_registry
    repo = engine.tag(f"{registry.host}/team/app")

    items = engine.push(repo, "v1", registry.auth_config())
    status, digest = outcome(items)
    assert status == "ok" and digest.startswith("sha256:")
    assert items[-1] == {"progressDetail": {}, "aux": {"Tag": "v1", "Digest": digest, "Size": items[-1]["aux"]["Size"]}}
    manifest = registry.manifest("team/app", "v1")
    assert manifest.status_code == 200 and manifest.headers["docker-content-digest"] == digest

    assert outcome(engine.push(repo, "v1", registry.auth_config(password="wrong"))) == ("error", UNAUTHORIZED)
    assert outcome(engine.push(repo, "v1", {})) == ("error", NO_BASIC_CREDS)

    # Rotation: distribution 2.8.2 re-reads htpasswd when its mtime changes - same process.
    pid = registry.proc.pid
    registry.set_password("bot", "second-password")
    assert outcome(engine.push(repo, "v1", registry.auth_config(password="first-password"))) == ("error", UNAUTHORIZED)
    assert outcome(engine.push(repo, "v1", registry.auth_config())) == ("ok", digest)
    assert registry.proc.pid == pid and registry.starts == 1

    # restart=True also restarts the process (same port and storage).
    registry.set_password("bot", "third-password", restart=True)
    assert registry.proc.pid != pid and registry.starts == 2
    assert outcome(engine.push(repo, "v1", registry.auth_config(password="second-password"))) == ("error", UNAUTHORIZED)
    assert outcome(engine.push(repo, "v1", registry.auth_config())) == ("ok", digest)


def test_htpasswd_outage_then_restart_keeps_images(engine: Engine, htpasswd_registry: HtpasswdRegistry) -> None:
    registry = htpasswd_registry
    repo = engine.tag(f"{registry.host}/team/app")
    status, digest = outcome(engine.push(repo, "v1", registry.auth_config()))
    assert status == "ok"
    port = registry.port

    registry.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{registry.url}/v2/")
    # No exception from the SDK: the connection error is the stream's last item.
    items = engine.push(repo, "v1", registry.auth_config())
    assert items[-1] == {
        "errorDetail": {"message": REGISTRY_DOWN.format(host=registry.host)},
        "error": REGISTRY_DOWN.format(host=registry.host),
    }

    registry.start()
    assert registry.port == port
    assert registry.tags("team/app") == ["v1"]
    assert registry.manifest("team/app", "v1").headers["docker-content-digest"] == digest
    assert outcome(engine.push(repo, "v1", registry.auth_config())) == ("ok", digest)


def test_frozen_registry_times_out_http_clients(htpasswd_registry: HtpasswdRegistry) -> None:
    """freeze() = the registry accepts connections but never answers (the engine itself has
    no timeout here: a push just waits until thaw())."""
    registry = htpasswd_registry
    registry.freeze()
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(f"{registry.url}/v2/", auth=("bot", "first-password"), timeout=0.3)
    finally:
        registry.thaw()
    assert httpx.get(f"{registry.url}/v2/", auth=("bot", "first-password")).status_code == 200


# --------------------------------------------------------------------------- token registry: HTTP API


def test_bearer_challenge_flow_over_http(engine: Engine, token_registry: TokenRegistry) -> None:
    registry, server = token_registry, token_registry.token_server
    repo = engine.tag(f"{registry.host}/team/app")
    status, digest = outcome(engine.push(repo, "v1", registry.auth_config()))
    assert status == "ok"
    assert [(r.method, r.user, r.scopes) for r in server.requests] == [
        ("GET", "bot", ["repository:team/app:push,pull"])
    ]
    assert server.requests[0].query["account"] == ["bot"]

    # 1. the challenge
    response = httpx.get(f"{registry.url}/v2/")
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == f'Bearer realm="{server.realm}",service="{DEFAULT_SERVICE}"'
    url = f"{registry.url}/v2/team/app/manifests/v1"
    response = httpx.get(url, headers={"accept": MANIFEST_V2})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == (
        f'Bearer realm="{server.realm}",service="{DEFAULT_SERVICE}",scope="repository:team/app:pull"'
    )
    assert response.json()["errors"] == [{
        "code": "UNAUTHORIZED", "message": "authentication required",
        "detail": [{"Type": "repository", "Class": "", "Name": "team/app", "Action": "pull"}],
    }]
    scheme, params = parse_challenge(response.headers["www-authenticate"])
    assert scheme == "Bearer"

    # 2. the token
    response = httpx.get(
        params["realm"], params={"service": params["service"], "scope": params["scope"]},
        auth=("bot", "token-password"),
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token", "access_token", "expires_in", "issued_at"}
    assert body["token"] == body["access_token"] and body["expires_in"] == 300
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["issued_at"])
    header = jwt.get_unverified_header(body["token"])
    assert header == {"alg": "RS256", "kid": server.key_id, "typ": "JWT"}
    assert re.fullmatch(r"([A-Z2-7]{4}:){11}[A-Z2-7]{4}", server.key_id)
    assert server.key_id == libtrust_key_id(server.certificate.public_key())
    claims = jwt.decode(body["token"], server.certificate.public_key(), algorithms=["RS256"],
                        audience=DEFAULT_SERVICE, options={"verify_exp": False})
    assert claims["iss"] == DEFAULT_ISSUER and claims["sub"] == "bot" and claims["aud"] == DEFAULT_SERVICE
    assert claims["access"] == [{"type": "repository", "name": "team/app", "actions": ["pull"]}]
    assert {"exp", "nbf", "iat", "jti"} <= set(claims)

    # 3. the manifest
    response = httpx.get(url, headers={"accept": MANIFEST_V2, "authorization": f"Bearer {body['token']}"})
    assert response.status_code == 200
    assert response.headers["docker-content-digest"] == digest
    assert response.json()["mediaType"] == MANIFEST_V2

    # A pull token is not a push token: the registry asks for more scope.
    response = httpx.post(f"{registry.url}/v2/team/app/blobs/uploads/", headers={"authorization": f"Bearer {body['token']}"})
    assert response.status_code == 401
    # The actions' order in the challenge is Go map order: "pull,push" or "push,pull" at random.
    assert response.headers["www-authenticate"] in {
        f'Bearer realm="{server.realm}",service="{DEFAULT_SERVICE}",'
        f'scope="repository:team/app:{actions}",error="insufficient_scope"'
        for actions in ("pull,push", "push,pull")
    }

    # The OAuth2 form (what the engine uses with an identity token) works too.
    response = httpx.post(server.realm, data={
        "grant_type": "password", "username": "bot", "password": "token-password",
        "service": DEFAULT_SERVICE, "scope": "repository:team/app:pull", "client_id": "imagebot",
        "access_type": "offline",
    })
    assert response.status_code == 200 and {"access_token", "refresh_token", "scope"} <= set(response.json())
    refreshed = httpx.post(server.realm, data={
        "grant_type": "refresh_token", "refresh_token": response.json()["refresh_token"],
        "service": DEFAULT_SERVICE, "scope": "repository:team/app:pull", "client_id": "imagebot",
    })
    token = refreshed.json()["access_token"]
    assert httpx.head(url, headers={"accept": MANIFEST_V2, "authorization": f"Bearer {token}"}).status_code == 200


@pytest.mark.parametrize("key_header", ["kid", "x5c", "jwk"])
def test_registry_accepts_each_signing_key_header(token_registry: TokenRegistry, key_header: str) -> None:
    server = token_registry.token_server
    server.key_header = key_header
    token = token_registry.mint("bot", ["registry:catalog:*"])
    assert key_header in jwt.get_unverified_header(token)
    response = httpx.get(f"{token_registry.url}/v2/_catalog", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 200, response.headers.get("www-authenticate")
    assert response.json() == {"repositories": []}


@pytest.mark.parametrize("change", [
    pytest.param({"header_overrides": {"kid": "imagebot-test-key-1"}}, id="kid-not-a-libtrust-fingerprint"),
    pytest.param({"aud": [DEFAULT_SERVICE]}, id="aud-as-list"),  # 2.8.2: a string, or "malformed token"
    pytest.param({"aud": "another-service"}, id="other-audience"),
    pytest.param({"iss": "someone-else"}, id="other-issuer"),
    pytest.param({"ttl": 0}, id="expired"),
])
def test_registry_refuses_bad_tokens_as_invalid_token(token_registry: TokenRegistry, change: dict[str, Any]) -> None:
    token = token_registry.mint("bot", ["registry:catalog:*"], **change)
    response = httpx.get(f"{token_registry.url}/v2/_catalog", headers={"authorization": f"Bearer {token}"})
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == (
        f'Bearer realm="{token_registry.token_server.realm}",service="{DEFAULT_SERVICE}",'
        f'scope="registry:catalog:*",error="invalid_token"'
    )


def test_token_expires_after_its_ttl(token_registry: TokenRegistry) -> None:
    registry, server = token_registry, token_registry.token_server
    registry.token_ttl_seconds = 1
    response = httpx.get(server.realm, params={"service": DEFAULT_SERVICE, "scope": "repository:team/app:pull"},
                         auth=("bot", "token-password"))
    assert response.json()["expires_in"] == 1
    token = response.json()["token"]
    url = f"{registry.url}/v2/team/app/tags/list"
    expiry = server.requests[-1].registry_expiry
    assert expiry is not None and expiry - time.time() <= 1

    def answer() -> httpx.Response:
        return httpx.get(url, headers={"authorization": f"Bearer {token}"})

    if time.time() < expiry - 0.2:
        assert answer().status_code == 404  # accepted: the repository just does not exist
    expired = wait_until(lambda: (r := answer()).status_code == 401 and r, timeout=5, what="token expiry")
    assert time.time() >= expiry - 0.05
    assert expired.headers["www-authenticate"] == (
        f'Bearer realm="{server.realm}",service="{DEFAULT_SERVICE}",'
        f'scope="repository:team/app:pull",error="invalid_token"'
    )
    assert "token not to be used after" in registry.log()


def test_token_server_faults_and_outage(token_registry: TokenRegistry) -> None:
    server = token_registry.token_server
    params = {"service": DEFAULT_SERVICE, "scope": "repository:team/app:pull"}

    assert httpx.get(server.realm, params=params, auth=("bot", "wrong")).json() == {
        "details": "incorrect username or password"
    }
    assert server.requests[-1].status == 401

    server.inject(500)
    response = httpx.get(server.realm, params=params, auth=("bot", "token-password"))
    assert (response.status_code, response.json()) == (500, {"details": "injected fault"})
    assert httpx.get(server.realm, params=params, auth=("bot", "token-password")).status_code == 200

    server.inject(503, hang=True)
    before = server.request_count
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(server.realm, params=params, auth=("bot", "token-password"), timeout=0.3)
    server.release()
    wait_until(lambda: server.request_count == before + 1, timeout=5, what="the hung request to end")
    assert server.requests[-1].faulted and server.requests[-1].status == 503
    assert httpx.get(server.realm, params=params, auth=("bot", "token-password"), timeout=2).status_code == 200

    server.stop()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.realm, params=params)
    assert httpx.get(f"{token_registry.url}/v2/").status_code == 401  # the registry itself is up
    server.start()
    assert httpx.get(server.realm, params=params, auth=("bot", "token-password")).status_code == 200
    assert [r.status for r in server.requests] == [401, 500, 200, 503, 200, 200]


# --------------------------------------------------------------------------- token registry: engine


def test_token_push_wrong_password_denied_and_anonymous(engine: Engine, token_registry: TokenRegistry) -> None:
    registry, server = token_registry, token_registry.token_server
    repo = engine.tag(f"{registry.host}/team/app")
    locked = engine.tag(f"{registry.host}/team/locked")
    status, digest = outcome(engine.push(repo, "v1", registry.auth_config()))
    assert status == "ok"

    assert outcome(engine.push(repo, "v1", registry.auth_config(password="wrong"))) == ("error", TOKEN_BAD_PASSWORD)

    # Pull-only: the token server leaves "push" out of the token, the registry refuses.
    registry.deny("bot", "team/locked", ["push"])
    first = server.request_count
    assert outcome(engine.push(locked, "v1", registry.auth_config())) == ("error", DENIED)
    grants = [r.granted for r in server.requests[first:]]
    assert grants and all(
        entry["actions"] == ["pull"] for granted in grants for entry in granted
    ), grants
    # (the engine also asked for repository:team/app:pull, to mount the blobs it pushed there)
    assert any("repository:team/app:pull" in r.scopes for r in server.requests[first:])

    registry.deny("bot", "team/locked")  # nothing at all
    assert outcome(engine.push(locked, "v1", registry.auth_config())) == ("error", DENIED)
    assert outcome(engine.push(locked, "v1", {})) == ("error", DENIED)  # anonymous token: no access

    registry.grant("bot", "team/*", ["pull", "push"])  # later rules win
    assert outcome(engine.push(locked, "v1", registry.auth_config())) == ("ok", digest)


def test_token_registry_outage_then_restart(engine: Engine, token_registry: TokenRegistry) -> None:
    registry = token_registry
    repo = engine.tag(f"{registry.host}/team/app")
    status, digest = outcome(engine.push(repo, "v1", registry.auth_config()))
    assert status == "ok"
    old_token = registry.mint("bot", ["repository:team/app:pull"])
    realm = registry.token_server.realm

    registry.stop()
    assert outcome(engine.push(repo, "v1", registry.auth_config())) == (
        "error", REGISTRY_DOWN.format(host=registry.host))
    registry.start()
    assert registry.token_server.realm == realm  # same ports, same signing key
    response = httpx.get(f"{registry.url}/v2/team/app/manifests/v1",
                         headers={"accept": MANIFEST_V2, "authorization": f"Bearer {old_token}"})
    assert response.status_code == 200 and response.headers["docker-content-digest"] == digest
    assert outcome(engine.push(repo, "v1", registry.auth_config())) == ("ok", digest)


def test_token_rotation_takes_effect_without_restart(engine: Engine, token_registry: TokenRegistry) -> None:
    registry = token_registry
    repo = engine.tag(f"{registry.host}/team/app")
    registry.set_password("bot", "rotated")
    assert outcome(engine.push(repo, "v1", registry.auth_config(password="token-password"))) == (
        "error", TOKEN_BAD_PASSWORD)
    assert outcome(engine.push(repo, "v1", registry.auth_config()))[0] == "ok"
    assert registry.starts == 1


def test_token_expired_on_arrival(engine: Engine, token_registry: TokenRegistry) -> None:
    registry = token_registry
    repo = engine.tag(f"{registry.host}/team/app")
    registry.token_ttl_seconds = 0
    assert outcome(engine.push(repo, "v1", registry.auth_config())) == ("error", UNAUTHORIZED)
    assert "token not to be used after" in registry.log()


def test_token_expires_in_the_middle_of_a_push(engine: Engine, token_registry: TokenRegistry) -> None:
    """The engine keeps using its token (it caches it for max(expires_in, 60 s)); when the token
    runs out between the blob upload's PATCH and its final PUT, the push fails."""
    registry, server = token_registry, token_registry.token_server
    # A 24 MiB incompressible layer keeps the upload busy long enough to freeze the registry in it.
    data = io.BytesIO()
    with tarfile.open(fileobj=data, mode="w") as tar:
        blob = os.urandom(24 * 1024 * 1024)
        info = tarfile.TarInfo("blob")
        info.size = len(blob)
        tar.addfile(info, io.BytesIO(blob))
    local = f"imagebot-standin-test/midpush-{registry.port}"
    engine.api.import_image_from_data(data.getvalue(), repository=local, tag="v1")
    engine.track(f"{local}:v1")
    repo = engine.tag(f"{registry.host}/team/big", source=f"{local}:v1")
    registry.token_ttl_seconds = 2

    items, frozen = [], False
    for item in engine.api.push(repo, "v1", stream=True, decode=True, auth_config=registry.auth_config()):
        items.append(item)
        if item.get("status") == "Pushing" and not frozen:
            # The upload has started (POST accepted with the token): hold the registry still
            # until the token has run out, then let it go on.
            registry.freeze()
            frozen = True
            expiry = server.successful_requests()[0].registry_expiry
            wait_until(lambda: time.time() > expiry + 0.05, timeout=10, what="the token to run out")
            registry.thaw()
    assert frozen
    assert outcome(items) == ("error", UNAUTHORIZED)
    assert server.request_count == 1  # no second token was asked for
    log = registry.log()
    assert re.search(r'"POST /v2/team/big/blobs/uploads/ HTTP/1.1" 202', log)
    assert re.search(r'"(PATCH|PUT) /v2/team/big/blobs/uploads/\S+ HTTP/1.1" 401', log)
    assert "token not to be used after" in log


def test_engine_retries_token_server_errors(engine: Engine, token_registry: TokenRegistry) -> None:
    """A 5xx from the token service does not fail a push at once: the engine asks again for
    each request (failures during the blob-existence checks are ignored) and retries a layer
    upload 5 times, 5/10/15/20 s apart.  Four 500s in a row cost it about 5 s here."""
    registry, server = token_registry, token_registry.token_server
    repo = engine.tag(f"{registry.host}/team/app")
    server.inject(500, count=4)
    assert outcome(engine.push(repo, "v1", registry.auth_config()))[0] == "ok"
    assert [r.status for r in server.requests][:4] == [500] * 4 and server.requests[-1].status == 200


# --------------------------------------------------------------------------- credential helper


def run_helper(helper: CredentialHelper, action: str, stdin: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [helper.executable, action], input=stdin, capture_output=True, text=True,
        env=helper.env({"PATH": "/usr/local/bin:/usr/bin:/bin"}), timeout=30,
    )


def test_credential_helper_protocol(tmp_path: Path) -> None:
    helper = CredentialHelper(tmp_path / "creds.json", {"127.0.0.1:5001": ("imagebot", "s3cret")})
    assert os.access(helper.executable, os.X_OK)

    for url in ("127.0.0.1:5001", "https://127.0.0.1:5001", "http://127.0.0.1:5001/", "127.0.0.1:5001\n"):
        result = run_helper(helper, "get", url)
        assert result.returncode == 0, result
        assert json.loads(result.stdout) == {"ServerURL": url.strip(), "Username": "imagebot", "Secret": "s3cret"}

    result = run_helper(helper, "get", "https://127.0.0.1:5999")
    assert (result.returncode, result.stdout, result.stderr) == (1, NOT_FOUND + "\n", "")

    helper.set("https://127.0.0.1:5001", "imagebot", "rotated")  # same server, other spelling
    assert json.loads(run_helper(helper, "get", "127.0.0.1:5001").stdout)["Secret"] == "rotated"
    assert list(helper.entries()) == ["127.0.0.1:5001"]

    store = json.dumps({"ServerURL": "https://ghcr.io", "Username": "bot", "Secret": "ghp_x"})
    assert run_helper(helper, "store", store).returncode == 0
    assert json.loads(run_helper(helper, "list", "").stdout) == {"127.0.0.1:5001": "imagebot", "https://ghcr.io": "bot"}
    assert run_helper(helper, "erase", "ghcr.io").returncode == 0
    assert run_helper(helper, "get", "https://ghcr.io").stdout == NOT_FOUND + "\n"
    assert [c["action"] for c in helper.calls()].count("get") == 7
    assert server_key("HTTPS://Registry.Example:443/v2/") == "registry.example:443"


def test_credential_helper_through_docker_sdk(
    engine: Engine, htpasswd_registry: HtpasswdRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = htpasswd_registry
    helper = CredentialHelper(tmp_path / "creds.json", {registry.host: ("bot", "first-password")})
    # docker-py finds the helper with shutil.which on *this* process's PATH.
    monkeypatch.setenv("PATH", helper.env()["PATH"])

    store = docker.credentials.Store(helper.name, environment=helper.env())
    assert store.get(f"https://{registry.host}")["Secret"] == "first-password"
    with pytest.raises(docker.credentials.CredentialsNotFound):
        store.get("https://127.0.0.1:5999")

    # credHelpers in DOCKER_CONFIG: the SDK asks the helper when auth_config is None.
    helper.write_docker_config(tmp_path / "docker-config", [registry.host])
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    api = docker.APIClient(**docker.utils.kwargs_from_env(), credstore_env=helper.env())
    try:
        repo = engine.tag(f"{registry.host}/team/app")
        assert outcome(list(api.push(repo, "v1", stream=True, decode=True)))[0] == "ok"
        registry.set_password("bot", "second-password")
        assert outcome(list(api.push(repo, "v1", stream=True, decode=True))) == ("error", UNAUTHORIZED)
        helper.set(registry.host, "bot", "second-password")
        assert outcome(list(api.push(repo, "v1", stream=True, decode=True)))[0] == "ok"
    finally:
        api.close()
    assert {c["server"] for c in helper.calls() if c["action"] == "get"} >= {registry.host}
    # What docker-py sent as X-Registry-Auth (its capitalised credential-store form).
    header = json.loads(base64.urlsafe_b64decode(_auth_header(api, registry.host)))
    assert header == {"ServerAddress": registry.host, "Username": "bot", "Password": "second-password"}


def test_identity_token_from_credential_helper_uses_oauth_refresh(
    engine: Engine, token_registry: TokenRegistry, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A helper answering Username "<token>" hands the engine an identity (refresh) token; the
    engine then POSTs grant_type=refresh_token to the realm instead of GET with Basic auth."""
    registry, server = token_registry, token_registry.token_server
    refresh = server.issue_refresh_token("bot")
    helper = CredentialHelper(tmp_path / "creds.json", {registry.host: ("<token>", refresh)})
    monkeypatch.setenv("PATH", helper.env()["PATH"])
    helper.write_docker_config(tmp_path / "docker-config")
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "docker-config"))
    api = docker.APIClient(**docker.utils.kwargs_from_env(), credstore_env=helper.env())
    try:
        repo = engine.tag(f"{registry.host}/team/app")
        assert outcome(list(api.push(repo, "v1", stream=True, decode=True)))[0] == "ok"
    finally:
        api.close()
    assert {(r.method, r.user, r.status) for r in server.requests} == {("POST", "bot", 200)}


def _auth_header(api: docker.APIClient, registry: str) -> str:
    from docker import auth

    value = auth.get_config_header(api, registry)
    assert value is not None
    return value.decode() if isinstance(value, bytes) else value
