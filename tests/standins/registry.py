"""Private container registries for push/manifest tests: real ``docker-registry`` processes.

imagebot pushes through the Docker engine (``api.push(..., auth_config=...)``) and assembles
manifest lists over the registry HTTP API (httpx, Basic and Bearer challenges).  Both must be
tested against registries whose credentials can be rotated mid-run, expire, or be refused for
one repository; the shared registries of ``scripts/infra`` (127.0.0.1:5000/5001) must not be
bent for that.  This module starts throw-away instances of the real distribution 2.8.2 binary
(Debian's ``docker-registry``), each with its own config, storage and free port on 127.0.0.1
(the engine treats 127.0.0.0/8 as an insecure registry, so plain HTTP works):

* :class:`HtpasswdRegistry` - Basic auth from an htpasswd file.  ``set_password`` rotates a
  password for real: distribution 2.8.2 re-reads the file when its mtime changes (checked in
  its source, ``registry/auth/htpasswd/access.go``, and by ``tests/test_standin_registry.py``),
  so no restart is needed; ``restart=True`` is there for belt and braces.
* :class:`TokenRegistry` - Bearer-token auth the way Docker Hub, GHCR and ECR do it: the
  registry is configured with ``auth.token`` and trusts a self-signed certificate whose key our
  in-process :class:`TokenServer` (Starlette + uvicorn) signs JWTs with.  Users, passwords,
  a per-user per-repository ACL, the token lifetime and faults of the token endpoint are all
  controlled by the test, without restarting anything.

Both have ``start()``/``stop()`` (a stop is an outage: the port stays reserved for a restart,
nothing listens, storage is kept, so images survive), ``freeze()``/``thaw()`` (SIGSTOP: a
registry that accepts connections but never answers), ``.host`` (``127.0.0.1:PORT``) and
``.url``, and are context managers.  Typical use::

    with HtpasswdRegistry(tmp_path, users={"bot": "s3cret"}) as registry:
        api.tag(base, f"{registry.host}/team/app", "v1")
        for item in api.push(f"{registry.host}/team/app", "v1", stream=True, decode=True,
                             auth_config=registry.auth_config("bot")):
            ...
        registry.set_password("bot", "n3w")          # old password refused from now on

    with TokenRegistry(tmp_path, users={"bot": "pw"}, token_ttl_seconds=300) as registry:
        registry.deny("bot", "team/app", ["push"])   # pull-only token -> push refused
        registry.token_server.inject(status=500)      # next token request answers 500

Token details that distribution 2.8.2 insists on (``registry/auth/token/token.go``): ``aud``
must be a JSON *string* equal to the service (a list is a malformed token), ``iss`` must equal
the configured issuer, ``exp``/``nbf``/``iat`` must be integers, and the signing key is found
from the header by ``x5c`` (chain verified against ``rootcertbundle``), ``jwk``, or ``kid`` - a
*libtrust fingerprint* of the public key of a certificate in the bundle (see
:func:`libtrust_key_id`), not an arbitrary name.  The registry allows 60 s of leeway on ``exp``
and ``nbf``; :class:`TokenServer` subtracts it from ``exp`` by default so that a token really
stops working ``token_ttl_seconds`` after it was issued (``expires_in`` stays the TTL).
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import fnmatch
import hashlib
import itertools
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.standins._shared import ThreadedServer

REGISTRY_BINARY = "docker-registry"
HTPASSWD_BINARY = "htpasswd"
# distribution 2.8.2 accepts a token up to this long after its ``exp`` (and before ``nbf``).
REGISTRY_TOKEN_LEEWAY = 60
DEFAULT_SERVICE = "imagebot-test-registry"
DEFAULT_ISSUER = "imagebot-test-token-server"
ALL_ACTIONS = frozenset({"pull", "push", "delete", "*"})
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _poll(predicate, timeout: float, what: str, interval: float = 0.02):
    """Return ``predicate()``'s first truthy value; TimeoutError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)  # polling a condition with a deadline, not a synchronising sleep


def _instance_dir(tmp_dir: Path | str, prefix: str) -> Path:
    base = Path(tmp_dir)
    base.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=base))


# --------------------------------------------------------------------------- registry process


class RegistryProcess:
    """One ``docker-registry serve CONFIG`` child; subclasses supply the ``auth`` section.

    ``port`` is chosen once (free port on 127.0.0.1) and kept across ``stop()``/``start()``, as
    are the storage directory and ``http.secret`` (so an upload started before a restart could
    even be resumed).  The log is ``<dir>/registry.log`` (:meth:`log`).
    """

    kind = "registry"

    def __init__(self, tmp_dir: Path | str, *, port: int | None = None, log_level: str = "info") -> None:
        if shutil.which(REGISTRY_BINARY) is None:
            raise RuntimeError(
                f"{REGISTRY_BINARY} not found; install it with `apt-get install -y docker-registry`"
            )
        self.dir = _instance_dir(tmp_dir, f"{self.kind}-")
        self.storage_dir = self.dir / "storage"
        self.config_path = self.dir / "config.yml"
        self.log_path = self.dir / "registry.log"
        self.log_level = log_level
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self._http_secret = secrets.token_hex(16)
        self.proc: subprocess.Popen | None = None
        self._frozen = False
        self.starts = 0  # how many times the process was started (restarts included)

    # ------------------------------------------------------------------ addresses

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``: what goes in image references and ``auth_config["serveraddress"]``."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    # ------------------------------------------------------------------ lifecycle

    def _auth_section(self) -> dict[str, Any]:
        raise NotImplementedError

    def _write_config(self) -> None:
        config = {
            "version": "0.1",
            "log": {"level": self.log_level, "formatter": "text"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage_dir)},
                "delete": {"enabled": True},
                # no blob descriptor cache: with deletes an in-memory cache can answer for
                # blobs that are gone (same choice as scripts/infra)
            },
            "http": {
                "addr": self.host,
                "secret": self._http_secret,
                "headers": {"X-Content-Type-Options": ["nosniff"]},
            },
            "auth": self._auth_section(),
        }
        # JSON is YAML: no quoting pitfalls with paths or secrets.
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        """Start (or restart) the process and return once it answers ``GET /v2/``."""
        if self.running:
            raise RuntimeError(f"{self.kind} on {self.host} already running")
        self.storage_dir.mkdir(exist_ok=True)
        for attempt in range(5):
            self._write_config()
            with open(self.log_path, "ab") as log:
                log.write(f"=== {dt.datetime.now().isoformat()} start on {self.host}\n".encode())
                log.flush()
                self.proc = subprocess.Popen(
                    [REGISTRY_BINARY, "serve", str(self.config_path)],
                    stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True, close_fds=True,
                )
            self.starts += 1
            try:
                _poll(self._ready, START_TIMEOUT, f"{self.kind} on {self.host}")
                return self
            except _PortTaken:
                self._reap()
                if self._fixed_port or self.starts > 1:
                    raise RuntimeError(f"port {self.port} is taken; cannot (re)start {self.kind}") from None
                self.port = free_port()  # lost a race for the first free port: pick another
            except BaseException:
                self.stop()
                raise
        raise RuntimeError(f"could not find a free port for {self.kind}:\n{self.log()[-2000:]}")

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            log = self.log()
            if "address already in use" in log.rsplit("=== ", 1)[-1]:
                raise _PortTaken()
            raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{log[-3000:]}")
        try:
            response = httpx.get(f"{self.url}/v2/", timeout=1.0)
        except httpx.TransportError:
            return False
        return response.headers.get("docker-distribution-api-version") == "registry/2.0"

    def stop(self) -> None:
        """Stop the process (an outage: connection refused on ``host``); storage stays."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if self._frozen:
                self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)
        self._frozen = False
        self.proc = None

    def _reap(self) -> None:
        if self.proc is not None:
            self.proc.wait(timeout=STOP_TIMEOUT)
            self.proc = None

    def restart(self):
        self.stop()
        return self.start()

    def freeze(self) -> None:
        """SIGSTOP the registry: connections are accepted by the kernel but never answered."""
        if not self.running:
            raise RuntimeError(f"{self.kind} is not running")
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)
        self._frozen = True

    def thaw(self) -> None:
        if self.proc is not None and self._frozen:
            self.proc.send_signal(signal.SIGCONT)
        self._frozen = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ------------------------------------------------------------------ reading the registry

    users: dict[str, str]  # each kind of registry keeps its users

    def auth_config(self, user: str | None = None, password: str | None = None) -> dict[str, str]:
        """``auth_config`` for the Docker SDK's ``push``/``pull`` (default: the first user)."""
        user = user if user is not None else next(iter(self.users))
        return {
            "username": user,
            "password": password if password is not None else self.users[user],
            "serveraddress": self.host,
        }

    def _auth_headers(self, repository: str) -> dict[str, str]:
        raise NotImplementedError

    def manifest(self, repository: str, reference: str) -> httpx.Response:
        """``GET /v2/<repository>/manifests/<reference>`` with full rights (for assertions)."""
        accept = ", ".join([
            "application/vnd.docker.distribution.manifest.list.v2+json",
            "application/vnd.docker.distribution.manifest.v2+json",
            "application/vnd.oci.image.index.v1+json",
            "application/vnd.oci.image.manifest.v1+json",
        ])
        return httpx.get(
            f"{self.url}/v2/{repository}/manifests/{reference}",
            headers={**self._auth_headers(repository), "accept": accept}, timeout=10,
        )

    def tags(self, repository: str) -> list[str]:
        """The repository's tags (``[]`` if it does not exist)."""
        response = httpx.get(
            f"{self.url}/v2/{repository}/tags/list", headers=self._auth_headers(repository), timeout=10
        )
        if response.status_code == 404:
            return []
        response.raise_for_status()
        return sorted(response.json().get("tags") or [])


class _PortTaken(Exception):
    pass


# --------------------------------------------------------------------------- htpasswd


def htpasswd_line(user: str, password: str) -> str:
    """One bcrypt htpasswd line (distribution only accepts bcrypt), via apache2-utils."""
    if ":" in user:
        raise ValueError("htpasswd user names cannot contain ':'")
    if shutil.which(HTPASSWD_BINARY) is None:
        raise RuntimeError("htpasswd not found; install it with `apt-get install -y apache2-utils`")
    # -i: password on stdin (not in argv); -C 4: the cheapest bcrypt cost, tests stay fast.
    result = subprocess.run(
        [HTPASSWD_BINARY, "-niBC", "4", user], input=password, capture_output=True, text=True, check=True
    )
    return result.stdout.strip()


class HtpasswdRegistry(RegistryProcess):
    """distribution 2.8.2 with ``auth.htpasswd``: ``401`` + ``WWW-Authenticate: Basic realm=...``.

    There is no ACL in this mode (any valid user may push anywhere); use :class:`TokenRegistry`
    for per-repository denial.
    """

    kind = "htpasswd-registry"
    realm = "imagebot-test"

    def __init__(
        self, tmp_dir: Path | str, users: Mapping[str, str] | None = None, *,
        port: int | None = None, log_level: str = "info",
    ) -> None:
        super().__init__(tmp_dir, port=port, log_level=log_level)
        self.users: dict[str, str] = dict(users if users is not None else {"u": "p"})
        self.htpasswd_path = self.dir / "htpasswd"
        self._lines: dict[str, tuple[str, str]] = {}  # user -> (htpasswd line, password)
        self._write_htpasswd()

    def _auth_section(self) -> dict[str, Any]:
        return {"htpasswd": {"realm": self.realm, "path": str(self.htpasswd_path)}}

    def _write_htpasswd(self) -> None:
        """Replace the file atomically, and make sure its mtime changes: distribution re-reads
        it only when the mtime differs from the one it loaded (and an empty or missing file at
        start-up makes it invent a user "docker" with a random password)."""
        for user, password in self.users.items():
            if user not in self._lines or self._lines[user][1] != password:
                self._lines[user] = (htpasswd_line(user, password), password)
        for user in list(self._lines):
            if user not in self.users:
                del self._lines[user]
        text = "".join(line + "\n" for line, _ in self._lines.values())
        old_mtime = self.htpasswd_path.stat().st_mtime_ns if self.htpasswd_path.exists() else None
        tmp = self.htpasswd_path.with_name(f".htpasswd.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, self.htpasswd_path)
        if old_mtime is not None and self.htpasswd_path.stat().st_mtime_ns <= old_mtime:
            bumped = old_mtime + 1_000_000
            os.utime(self.htpasswd_path, ns=(bumped, bumped))

    def set_password(self, user: str, password: str, *, restart: bool = False) -> None:
        """Rotate (or add) ``user``'s password; the very next request sees it (no restart
        needed on 2.8.2).  ``restart=True`` also restarts the process (same port/storage)."""
        self.users[user] = password
        self._write_htpasswd()
        if restart and self.running:
            self.restart()

    def remove_user(self, user: str) -> None:
        self.users.pop(user, None)
        self._write_htpasswd()

    def _auth_headers(self, repository: str) -> dict[str, str]:
        user, password = next(iter(self.users.items()))
        raw = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"authorization": f"Basic {raw}"}


# --------------------------------------------------------------------------- token server


def libtrust_key_id(public_key: Any) -> str:
    """The ``kid`` distribution looks trusted keys up by: libtrust's fingerprint of the key.

    SHA-256 of the DER SubjectPublicKeyInfo, first 240 bits, base32 without padding, grouped
    by four with colons (``ABCD:EFGH:...``, 12 groups).
    """
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    b32 = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(b32[i:i + 4] for i in range(0, len(b32), 4))


def make_signing_identity(common_name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """An RSA key and a self-signed CA certificate for it (the registry's ``rootcertbundle``)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


@dataclass(frozen=True)
class Scope:
    """One ``type:name:actions`` scope of a token request (``repository:team/app:pull,push``)."""

    type: str
    name: str
    actions: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Scope | None:
        kind, sep, rest = text.partition(":")
        name, sep2, actions = rest.rpartition(":")
        if not sep or not sep2 or not kind or not name:
            return None
        return cls(kind, name, tuple(a for a in actions.split(",") if a))

    def __str__(self) -> str:
        return f"{self.type}:{self.name}:{','.join(self.actions)}"


@dataclass
class TokenRequest:
    """One request to the token endpoint, as the test can inspect it afterwards."""

    seq: int
    method: str
    user: str | None  # None: anonymous
    scopes: list[str]
    status: int
    granted: list[dict[str, Any]] = field(default_factory=list)  # the JWT's ``access`` claim
    faulted: bool = False
    time: float = field(default_factory=time.time)
    query: dict[str, list[str]] = field(default_factory=dict)
    # when the registry stops accepting the token issued (epoch seconds; None: none issued)
    registry_expiry: float | None = None


@dataclass
class TokenFault:
    """Answer the next ``remaining`` token requests with ``status`` (after hanging if ``hang``)."""

    status: int
    remaining: int
    body: Any = None
    hang: bool = False
    hang_seconds: float = 60.0


@dataclass
class _Rule:
    user: str
    repo: str
    allow: frozenset[str]
    deny: frozenset[str]


#: The ACL "user" of requests without credentials (see TokenServer.grant_anonymous).
ANONYMOUS = "<anonymous>"

class TokenServer:
    """The Docker token-auth endpoint (https://distribution.github.io/distribution/spec/auth/token/).

    ``GET /token?service=S&scope=repository:NAME:pull,push[&scope=...]`` with Basic auth (what
    the Docker engine sends for ``auth_config`` username/password) and the OAuth2 ``POST
    /token`` form (``grant_type=password`` or ``refresh_token``) answer
    ``{"token", "access_token", "expires_in", "issued_at"}``.  A wrong password gets ``401
    {"details": "incorrect username or password"}`` (Docker Hub's answer); no credentials get an
    anonymous token with no access (``allow_anonymous=False``: 401).  Each granted scope is the
    requested actions intersected with the ACL (:meth:`grant`/:meth:`deny`); a refused action
    is simply left out of the token, as real token servers do, and the registry then refuses
    the request.  Users, passwords, ACL, ``token_ttl_seconds`` and faults can be changed at any
    time; :attr:`requests` records every request.

    ``key_header`` chooses how a token names its signing key: ``"kid"`` (libtrust fingerprint,
    the classic form), ``"x5c"`` (the certificate itself) or ``"jwk"``; distribution 2.8.2
    accepts all three.  ``compensate_leeway`` (default) makes the token's ``exp`` claim
    ``iat + ttl - 60`` so the registry, which allows 60 s of leeway, stops accepting it after
    ``ttl`` seconds; ``expires_in`` always says ``ttl``.
    """

    def __init__(
        self,
        users: Mapping[str, str] | None = None,
        *,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        token_ttl_seconds: int = 300,
        key_header: Literal["kid", "x5c", "jwk"] = "kid",
        compensate_leeway: bool = True,
        allow_anonymous: bool = True,
        default_actions: Iterable[str] = ALL_ACTIONS,
        port: int | None = None,
    ) -> None:
        self.users: dict[str, str] = dict(users if users is not None else {"u": "p"})
        self.service = service
        self.issuer = issuer
        self.token_ttl_seconds = token_ttl_seconds
        self.key_header = key_header
        self.compensate_leeway = compensate_leeway
        self.allow_anonymous = allow_anonymous
        self.default_actions = frozenset(default_actions)
        self.key, self.certificate = make_signing_identity(issuer)
        self.key_id = libtrust_key_id(self.key.public_key())
        self.requests: list[TokenRequest] = []
        self._rules: list[_Rule] = []
        self._faults: list[TokenFault] = []
        self._refresh_tokens: dict[str, str] = {}
        self._seq = itertools.count(1)
        self._lock = threading.RLock()
        self.port = port if port is not None else 0
        self._http = ThreadedServer("token server", graceful_shutdown=1)
        self._release: asyncio.Event | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def realm(self) -> str:
        return f"{self.url}/token"

    def write_root_bundle(self, path: Path) -> Path:
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> TokenServer:
        """Serve on ``port`` (first start: a free one; restarts: the same) in a thread."""
        self.port = self._http.start(self._app, self.port, on_loop=self._new_release)
        return self

    @property
    def running(self) -> bool:
        return self._http.running

    def _new_release(self) -> None:
        self._release = asyncio.Event()  # belongs to the server's loop: created there

    def stop(self) -> None:
        """Stop serving (hanging requests are released first); state and key are kept."""
        if not self._http.running:
            return
        self.release()
        self._http.stop()

    def __enter__(self) -> TokenServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test controls

    def set_password(self, user: str, password: str) -> None:
        with self._lock:
            self.users[user] = password

    def remove_user(self, user: str) -> None:
        with self._lock:
            self.users.pop(user, None)

    def grant(self, user: str, repository: str, actions: Iterable[str] = ("pull", "push")) -> None:
        """Let ``user`` (glob, ``*`` = everyone) have ``actions`` on ``repository`` (glob)."""
        with self._lock:
            self._rules.append(_Rule(user, repository, frozenset(actions), frozenset()))

    def deny(self, user: str, repository: str, actions: Iterable[str] | None = None) -> None:
        """Refuse ``actions`` (default: all) on ``repository`` (glob) to ``user`` (glob).

        ``deny(u, "team/app", ["push"])`` leaves ``u`` a pull-only token for team/app.  Rules
        apply in order; a later :meth:`grant` can give actions back.
        """
        with self._lock:
            denied = frozenset(actions) if actions is not None else ALL_ACTIONS
            self._rules.append(_Rule(user, repository, frozenset(), denied))

    def clear_acl(self) -> None:
        with self._lock:
            self._rules.clear()

    def grant_anonymous(self, repository: str, actions: Iterable[str] = ("pull",)) -> None:
        """Make ``repository`` (glob) public: anonymous requests get ``actions`` on it."""
        self.grant(ANONYMOUS, repository, actions)

    def allowed_actions(self, user: str | None, repository: str) -> frozenset[str]:
        with self._lock:
            actions = set(self.default_actions) if user is not None else set()
            for rule in self._rules:
                if user is None and rule.user != ANONYMOUS:
                    continue  # only explicit public grants apply to anonymous requests
                if fnmatch.fnmatchcase(user or ANONYMOUS, rule.user) and fnmatch.fnmatchcase(repository, rule.repo):
                    actions = (actions | rule.allow) - rule.deny
        return frozenset(actions)

    def inject(
        self, status: int = 500, count: int = 1, *, body: Any = None, hang: bool = False,
        hang_seconds: float = 60.0,
    ) -> TokenFault:
        """Answer the next ``count`` token requests with ``status``.  With ``hang=True`` each
        first waits until :meth:`release`, :meth:`stop` or ``hang_seconds`` (a token service that
        accepts the connection and never answers, as far as a client with a timeout can tell)."""
        fault = TokenFault(status=status, remaining=count, body=body, hang=hang, hang_seconds=hang_seconds)
        with self._lock:
            self._faults.append(fault)
        return fault

    def release(self) -> None:
        """End every hang now (those requests then get their fault's status)."""
        loop = self._http.loop
        if loop is None or self._release is None:
            return
        held, self._release = self._release, asyncio.Event()  # later hangs wait on a new one
        try:
            loop.call_soon_threadsafe(held.set)
        except RuntimeError:  # loop closed: nothing hangs
            pass

    def reset(self) -> None:
        """Forget requests, faults and ACL rules (users, TTL and key stay)."""
        self.release()
        with self._lock:
            self.requests.clear()
            self._faults.clear()
            self._rules.clear()
            self._seq = itertools.count(1)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self.requests)

    def successful_requests(self) -> list[TokenRequest]:
        with self._lock:
            return [r for r in self.requests if r.status == 200]

    # ------------------------------------------------------------------ tokens

    def mint(
        self, user: str | None, scopes: Iterable[str | Scope] = (), *, ttl: float | None = None,
        issued_at: float | None = None, apply_acl: bool = True,
        header_overrides: Mapping[str, Any] | None = None, **claim_overrides: Any,
    ) -> str:
        """A signed token for ``user`` with ``scopes`` (ACL applied unless ``apply_acl=False``).

        ``ttl`` overrides ``token_ttl_seconds``; ``ttl=0`` gives a token the registry already
        refuses as expired (with ``compensate_leeway``).  ``claim_overrides`` replace claims
        (``aud="other"``) and ``header_overrides`` JOSE header fields (``{"kid": "key-1"}``),
        for negative tests.
        """
        access = self._grant(user, scopes, apply_acl)
        return self._mint(user, access, ttl, issued_at, claim_overrides, header_overrides)[0]

    def registry_expiry(self, issued_at: float, ttl: float | None = None) -> float:
        """When the registry stops accepting a token issued at ``issued_at`` (epoch seconds)."""
        lifetime = int(self.token_ttl_seconds if ttl is None else ttl)
        exp = int(issued_at) + lifetime - (REGISTRY_TOKEN_LEEWAY if self.compensate_leeway else 0)
        return float(exp + REGISTRY_TOKEN_LEEWAY)

    def _grant(self, user: str | None, scopes: Iterable[str | Scope], apply_acl: bool) -> list[dict[str, Any]]:
        granted: dict[tuple[str, str], list[str]] = {}
        for raw in scopes:
            scope = raw if isinstance(raw, Scope) else Scope.parse(raw)
            if scope is None:
                continue
            if scope.type.split("(")[0] == "repository":
                allowed = self.allowed_actions(user, scope.name) if apply_acl else ALL_ACTIONS
            elif scope.type == "registry" and scope.name == "catalog":
                allowed = frozenset({"*"}) if user is not None or not apply_acl else frozenset()
            else:
                allowed = frozenset()
            actions = granted.setdefault((scope.type, scope.name), [])
            for action in scope.actions:
                if action in allowed and action not in actions:
                    actions.append(action)
        return [{"type": t, "name": n, "actions": a} for (t, n), a in granted.items()]

    def _mint(
        self, user: str | None, access: list[dict[str, Any]], ttl: float | None,
        issued_at: float | None, claim_overrides: Mapping[str, Any] | None = None,
        header_overrides: Mapping[str, Any] | None = None,
    ) -> tuple[str, float]:
        """(token, registry expiry)."""
        now = int(issued_at if issued_at is not None else time.time())
        lifetime = int(self.token_ttl_seconds if ttl is None else ttl)
        exp = now + lifetime - (REGISTRY_TOKEN_LEEWAY if self.compensate_leeway else 0)
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": user or "",
            "aud": self.service,  # distribution 2.8.2: a string, never a list
            "exp": exp,  # integers: 2.8.2 unmarshals exp/nbf/iat into int64
            "nbf": now,
            "iat": now,
            "jti": secrets.token_hex(16),
            "access": access,
        }
        claims.update(claim_overrides or {})
        headers: dict[str, Any] = {"typ": "JWT"}
        if self.key_header == "kid":
            headers["kid"] = self.key_id
        elif self.key_header == "x5c":
            der = self.certificate.public_bytes(serialization.Encoding.DER)
            headers["x5c"] = [base64.b64encode(der).decode()]
        elif self.key_header == "jwk":
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key()))
            headers["jwk"] = {"kty": jwk["kty"], "n": jwk["n"], "e": jwk["e"]}
        else:
            raise ValueError(f"unknown key_header {self.key_header!r}")
        headers.update(header_overrides or {})
        token = jwt.encode(claims, self.key, algorithm="RS256", headers=headers)
        return token, float(exp + REGISTRY_TOKEN_LEEWAY)

    # ------------------------------------------------------------------ HTTP

    def _app(self) -> Starlette:
        return Starlette(routes=[
            Route("/token", self._handle, methods=["GET", "POST"]),
            Route("/healthz", lambda request: Response("ok"), methods=["GET"]),
        ])

    def _take_fault(self) -> TokenFault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining > 0:
                    fault.remaining -= 1
                    return fault
        return None

    def _record(self, method: str, user: str | None, scopes: list[str], status: int,
                query: dict[str, list[str]], granted: list[dict[str, Any]] | None = None,
                faulted: bool = False, registry_expiry: float | None = None) -> None:
        with self._lock:
            self.requests.append(TokenRequest(
                next(self._seq), method, user, scopes, status, granted or [], faulted,
                query=query, registry_expiry=registry_expiry,
            ))

    async def _handle(self, request: Request) -> Response:
        query = {key: request.query_params.getlist(key) for key in request.query_params.keys()}
        form: dict[str, str] = {}
        if request.method == "POST":
            # parsed by hand: Starlette's request.form() needs python-multipart
            raw = (await request.body()).decode("utf-8", "replace")
            form = {k: v[-1] for k, v in urllib.parse.parse_qs(raw, keep_blank_values=True).items()}
        fault = self._take_fault()
        if fault is not None:
            if fault.hang and self._release is not None:
                held = self._release
                try:
                    await asyncio.wait_for(held.wait(), fault.hang_seconds)
                except asyncio.TimeoutError:
                    pass
            self._record(request.method, None, [], fault.status, query, faulted=True)
            body = fault.body if fault.body is not None else {"details": "injected fault"}
            if isinstance(body, (bytes, str)):
                return Response(body, fault.status)
            return JSONResponse(body, fault.status)
        if request.method == "POST":
            return self._handle_oauth(form, query)
        return self._handle_get(request, query)

    def _check_basic(self, header: str) -> tuple[bool, str | None]:
        """(credentials present, user if they are right)."""
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "basic" or not value:
            return False, None
        try:
            user, _, password = base64.b64decode(value.strip()).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            return True, None
        with self._lock:
            ok = user in self.users and secrets.compare_digest(self.users[user], password)
        return True, user if ok else None

    def _token_reply(self, user: str | None, scopes: list[str]) -> tuple[dict[str, Any], list, float]:
        access = self._grant(user, scopes, True)
        now = time.time()
        token, expiry = self._mint(user, access, None, now)
        issued = dt.datetime.fromtimestamp(int(now), dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "token": token, "access_token": token,
            "expires_in": int(self.token_ttl_seconds), "issued_at": issued,
        }
        return body, access, expiry

    def _handle_get(self, request: Request, query: dict[str, list[str]]) -> Response:
        scopes = [s for raw in query.get("scope", []) for s in raw.split(" ") if s]
        service = request.query_params.get("service")
        if service is not None and service != self.service:
            self._record("GET", None, scopes, 400, query)
            return JSONResponse({"details": f"invalid service {service!r}"}, 400)
        present, user = self._check_basic(request.headers.get("authorization", ""))
        if present and user is None or not present and not self.allow_anonymous:
            self._record("GET", None, scopes, 401, query)
            return JSONResponse(
                {"details": "incorrect username or password"}, 401,
                headers={"www-authenticate": f'Basic realm="{self.issuer}"'},
            )
        body, access, expiry = self._token_reply(user, scopes)
        if request.query_params.get("offline_token") == "true" and user is not None:
            body["refresh_token"] = self._new_refresh_token(user)
        self._record("GET", user, scopes, 200, query, access, registry_expiry=expiry)
        return JSONResponse(body)

    def issue_refresh_token(self, user: str) -> str:
        """A refresh token for ``user`` (what a credential helper hands out as an identity
        token: Username ``<token>``); valid while ``user`` exists."""
        return self._new_refresh_token(user)

    def _new_refresh_token(self, user: str) -> str:
        refresh = secrets.token_urlsafe(24)
        with self._lock:
            self._refresh_tokens[refresh] = user
        return refresh

    def _handle_oauth(self, form: dict[str, str], query: dict[str, list[str]]) -> Response:
        scopes = [s for s in form.get("scope", "").split(" ") if s]
        grant_type = form.get("grant_type")
        user: str | None = None
        if form.get("service") not in (None, self.service):
            self._record("POST", None, scopes, 400, query)
            return JSONResponse({"error": "invalid_request"}, 400)
        if grant_type == "password":
            with self._lock:
                name, password = form.get("username", ""), form.get("password", "")
                if name in self.users and secrets.compare_digest(self.users[name], password):
                    user = name
        elif grant_type == "refresh_token":
            with self._lock:
                user = self._refresh_tokens.get(form.get("refresh_token", ""))
                if user is not None and user not in self.users:
                    user = None
        else:
            self._record("POST", None, scopes, 400, query)
            return JSONResponse({"error": "unsupported_grant_type"}, 400)
        if user is None:
            self._record("POST", None, scopes, 401, query)
            return JSONResponse({"error": "invalid_grant", "error_description": "incorrect username or password"}, 401)
        body, access, expiry = self._token_reply(user, scopes)
        body.pop("token")
        body["scope"] = " ".join(scopes)
        if form.get("access_type") == "offline":
            body["refresh_token"] = self._new_refresh_token(user)
        self._record("POST", user, scopes, 200, query, access, registry_expiry=expiry)
        return JSONResponse(body)


# --------------------------------------------------------------------------- token registry


class TokenRegistry(RegistryProcess):
    """distribution 2.8.2 with ``auth.token`` trusting an in-process :class:`TokenServer`.

    ``stop()``/``start()`` stop and restart both (same ports, same storage, same signing key:
    tokens issued before a restart stay valid, as with a real registry restart); stop only the
    token service with ``registry.token_server.stop()``.  ACL/user/fault controls are the token
    server's, also reachable here (:meth:`deny`, :meth:`grant`, :meth:`set_password`).
    """

    kind = "token-registry"

    def __init__(
        self,
        tmp_dir: Path | str,
        users: Mapping[str, str] | None = None,
        *,
        token_ttl_seconds: int = 300,
        service: str = DEFAULT_SERVICE,
        issuer: str = DEFAULT_ISSUER,
        key_header: Literal["kid", "x5c", "jwk"] = "kid",
        compensate_leeway: bool = True,
        allow_anonymous: bool = True,
        port: int | None = None,
        log_level: str = "info",
    ) -> None:
        super().__init__(tmp_dir, port=port, log_level=log_level)
        self.token_server = TokenServer(
            users, service=service, issuer=issuer, token_ttl_seconds=token_ttl_seconds,
            key_header=key_header, compensate_leeway=compensate_leeway, allow_anonymous=allow_anonymous,
        )
        self.root_bundle_path = self.dir / "token-root.pem"
        self.token_server.write_root_bundle(self.root_bundle_path)

    def _auth_section(self) -> dict[str, Any]:
        return {"token": {
            "realm": self.token_server.realm,
            "service": self.token_server.service,
            "issuer": self.token_server.issuer,
            "rootcertbundle": str(self.root_bundle_path),
        }}

    def start(self) -> TokenRegistry:
        if not self.token_server.running:
            self.token_server.start()
        try:
            super().start()
        except BaseException:
            self.token_server.stop()
            raise
        return self

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.token_server.stop()

    # ------------------------------------------------------------------ delegation

    @property
    def users(self) -> dict[str, str]:
        return self.token_server.users

    @property
    def token_ttl_seconds(self) -> int:
        return self.token_server.token_ttl_seconds

    @token_ttl_seconds.setter
    def token_ttl_seconds(self, value: int) -> None:
        self.token_server.token_ttl_seconds = value

    def set_password(self, user: str, password: str) -> None:
        """Rotate (or add) a password; effective for the next token request, no restart.
        Tokens already issued stay valid until they expire, as with real registries."""
        self.token_server.set_password(user, password)

    def grant(self, user: str, repository: str, actions: Iterable[str] = ("pull", "push")) -> None:
        self.token_server.grant(user, repository, actions)

    def deny(self, user: str, repository: str, actions: Iterable[str] | None = None) -> None:
        self.token_server.deny(user, repository, actions)

    def mint(self, user: str | None, scopes: Iterable[str | Scope] = (), **kwargs: Any) -> str:
        return self.token_server.mint(user, scopes, **kwargs)

    def _auth_headers(self, repository: str) -> dict[str, str]:
        token = self.mint("admin", [f"repository:{repository}:pull"], apply_acl=False, ttl=REGISTRY_TOKEN_LEEWAY + 60)
        return {"authorization": f"Bearer {token}"}
