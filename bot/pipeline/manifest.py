"""Publish a manifest list (or OCI index) over the per-platform images, through the registry
HTTP API.

Hand-written over httpx because the part needed is small (HEAD/GET/PUT of manifests and the
``WWW-Authenticate`` challenge: Basic, or a Bearer token fetched from the realm) and the
maintained Python registry clients are synchronous or pull in a whole image toolkit; the
distribution spec (docs/spec/api.md, auth/token.md) is the reference. Loopback registries are
spoken to over plain HTTP, as the Docker engine does; everything else over HTTPS.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import httpx

from bot.pipeline.credentials import Credentials, CredentialsError, RegistryCredentials
from bot.pipeline.push import RegistryError

DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LIST_TYPES = {"docker": DOCKER_LIST, "oci": OCI_INDEX}
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class Descriptor:
    platform: str
    digest: str
    size: int
    media_type: str


def manifest_list(entries: list[Descriptor], fmt: str = "docker") -> tuple[bytes, str]:
    """The manifest list (or OCI index) body over ``entries``, and its media type."""
    media_type = LIST_TYPES[fmt]
    manifests = []
    for entry in entries:
        os_, arch, *variant = entry.platform.split("/")
        platform: dict[str, str] = {"architecture": arch, "os": os_}
        if variant:
            platform["variant"] = variant[0]
        manifests.append({"mediaType": entry.media_type, "size": entry.size,
                          "digest": entry.digest, "platform": platform})
    body = {"schemaVersion": 2, "mediaType": media_type, "manifests": manifests}
    return json.dumps(body, indent=3).encode(), media_type


def is_loopback(host: str) -> bool:
    name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
    return name in ("localhost", "[::1]") or name.startswith("127.")


def realm_may_get_credentials(realm: str, registry_host: str) -> bool:
    """Whether the registry's bearer ``realm`` may be sent the registry's credentials.

    Over https, yes (Docker Hub's token server is another host: auth.docker.io); over plain
    http only when the realm is the registry's own host (a loopback registry with its token
    server beside it), since anyone on the path, or any host a registry names, would
    otherwise read the password.
    """
    try:
        url = httpx.URL(realm)
    except (httpx.InvalidURL, TypeError):
        return False
    if url.scheme == "https" and url.host:
        return True
    own = httpx.URL(f"http://{registry_host}").host
    return url.scheme == "http" and bool(url.host) and url.host == own


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.replace(".", "", 1).isdigit() else None


def _error_detail(response: httpx.Response) -> str:
    """The registry's error list, as ``CODE: message`` lines; tolerant of any body."""
    try:
        errors = response.json().get("errors")
        parts = [f"{e.get('code', '?')}: {e.get('message', '')}".strip() for e in errors]
        return "; ".join(parts) or response.reason_phrase
    except Exception:  # noqa: BLE001 - a malformed body is still a failure to report
        return f"{response.status_code} {response.reason_phrase}: {response.text[:200]}"


class RegistryClient:
    """Manifest calls against one registry host, answering its auth challenges."""

    def __init__(self, host: str, credentials: RegistryCredentials | None, timeout: float = 30.0) -> None:
        self.host = host
        self.credentials = credentials
        scheme = "http" if is_loopback(host) else "https"
        self.http = httpx.AsyncClient(base_url=f"{scheme}://{host}", timeout=timeout)
        self._tokens: dict[str, str] = {}  # scope -> bearer token

    async def aclose(self) -> None:
        await self.http.aclose()

    def _secrets(self, creds: Credentials | None) -> tuple[str, ...]:
        return (creds.password.get_secret_value(),) if creds else ()

    async def request(self, method: str, path: str, scope: str, **kwargs: Any) -> httpx.Response:
        """One API call; on a 401 challenge, authenticate as told and try once more."""
        creds = await self.credentials.get() if self.credentials else None
        headers = dict(kwargs.pop("headers", {}))
        if scope in self._tokens:
            headers["Authorization"] = f"Bearer {self._tokens[scope]}"
        try:
            response = await self.http.request(method, path, headers=headers, **kwargs)
            if response.status_code == 401:
                headers["Authorization"] = await self._answer(response, scope, creds)
                response = await self.http.request(method, path, headers=headers, **kwargs)
        except httpx.TransportError as exc:
            raise RegistryError.of(f"{type(exc).__name__}: {exc}", secrets=self._secrets(creds)) from None
        except CredentialsError as exc:
            raise RegistryError("auth", str(exc)) from None
        if response.status_code >= 400:
            raise RegistryError.of(_error_detail(response), response.status_code,
                                   retry_after=_retry_after(response), secrets=self._secrets(creds))
        return response

    async def _answer(self, response: httpx.Response, scope: str, creds: Credentials | None) -> str:
        challenge = response.headers.get("www-authenticate", "")
        if creds is None:
            raise RegistryError("auth", f"the registry wants credentials ({_error_detail(response)})", status=401)
        scheme = challenge.split(" ", 1)[0].lower()
        basic = httpx.BasicAuth(creds.username, creds.password.get_secret_value())
        if scheme == "basic":
            pair = f"{creds.username}:{creds.password.get_secret_value()}".encode()
            return "Basic " + base64.b64encode(pair).decode()
        if scheme != "bearer":
            raise RegistryError("auth", f"unsupported auth challenge {challenge[:80]!r}", status=401)
        params = dict(_CHALLENGE.findall(challenge))
        realm = params.pop("realm", None)
        if not realm:
            raise RegistryError("auth", "bearer challenge without a realm", status=401)
        if not realm_may_get_credentials(realm, self.host):
            raise RegistryError(
                "denied", f"the registry {self.host} sends credentials to token realm {realm[:200]!r}, "
                "which is neither https nor on its own host: refused", status=401)
        params.pop("error", None)
        params["scope"] = scope
        token_response = await self.http.get(realm, params=params, auth=basic)
        if token_response.status_code >= 400:
            raise RegistryError.of(_error_detail(token_response), token_response.status_code,
                                   secrets=self._secrets(creds))
        answer = token_response.json()
        token = answer.get("token") or answer.get("access_token")
        if not token:
            raise RegistryError("auth", "the token server answered without a token", status=401)
        self._tokens[scope] = token
        return f"Bearer {token}"

    async def describe(self, repository: str, reference: str, platform: str) -> Descriptor:
        """The descriptor of one pushed image (its manifest's digest, size and media type)."""
        response = await self.request(
            "HEAD", f"/v2/{repository}/manifests/{reference}", f"repository:{repository}:pull",
            headers={"Accept": f"{DOCKER_MANIFEST}, {OCI_MANIFEST}"},
        )
        digest = response.headers.get("docker-content-digest")
        if not digest:
            raise RegistryError("registry", f"no digest for {repository}:{reference}")
        return Descriptor(platform, digest, int(response.headers.get("content-length", 0)),
                          response.headers.get("content-type", DOCKER_MANIFEST).split(";")[0])

    async def put_list(self, repository: str, tag: str, body: bytes, media_type: str) -> str:
        """PUT the list under ``tag``, read it back, and return its digest (verified)."""
        expected = "sha256:" + hashlib.sha256(body).hexdigest()
        scope = f"repository:{repository}:pull,push"
        response = await self.request(
            "PUT", f"/v2/{repository}/manifests/{tag}", scope,
            content=body, headers={"Content-Type": media_type},
        )
        digest = response.headers.get("docker-content-digest", expected)
        back = await self.request("GET", f"/v2/{repository}/manifests/{tag}", scope,
                                  headers={"Accept": media_type})
        actual = "sha256:" + hashlib.sha256(back.content).hexdigest()
        if digest != expected or actual != expected:
            raise RegistryError("registry", f"{repository}:{tag} reads back as {actual}, not {expected}")
        return expected

    async def tags(self, repository: str, limit: int = 10_000) -> list[str]:
        """The repository's tags (``/v2/<name>/tags/list``, following ``Link`` pages); at most
        ``limit`` of them, beyond which this raises (a partial list could hide a newer
        version). A repository that does not exist yet has none."""
        scope = f"repository:{repository}:pull"
        path: str | None = f"/v2/{repository}/tags/list?n=1000"
        found: list[str] = []
        while path is not None:
            try:
                response = await self.request("GET", path, scope)
            except RegistryError as exc:
                if exc.status == 404 and not found:
                    return []
                raise
            found += [tag for tag in (response.json().get("tags") or []) if isinstance(tag, str)]
            if len(found) > limit:
                raise RegistryError("registry", f"{repository} has over {limit} tags; not all listed")
            path = _next_page(response.headers.get("link", ""), self.host)
        return found


def _next_page(link: str, host: str) -> str | None:
    """The path of the next page in a ``Link: </v2/...>; rel="next"`` header, on this host."""
    match = re.match(r'\s*<([^>]+)>\s*;\s*rel="?next"?', link)
    if not match:
        return None
    url = httpx.URL(match[1])
    if url.is_absolute_url and url.netloc.decode() != host:
        return None
    return url.raw_path.decode()
