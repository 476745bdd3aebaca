"""A git forge's smart-HTTP endpoint on loopback, plus fixture repositories to serve from it.

The pipeline fetches exactly the build's sha over HTTPS with the forge token.  Testing that
against a fake protocol would prove nothing, so :class:`GitHTTPServer` runs the real
``git http-backend`` as CGI behind a small threaded HTTP/1.1 server; the client side is the
real ``git``.  On top of that it adds what a forge does and tests need to observe or break:

* HTTP Basic auth the way GitHub (``x-access-token:<token>``) and GitLab (``oauth2:<token>``)
  take tokens: missing or wrong credentials get 401 + ``WWW-Authenticate: Basic``;
* a record of every request (method, path, status, whether auth was sent, the username, the
  ``want``/``deepen`` lines of fetch negotiations) -- never the password;
* ``allow_sha_in_want=False``: a server that refuses to send an unadvertised sha, so the
  pipeline's fallback to fetching the ref can be tested;
* faults: a repository that is "missing" (404), an injected 5xx, a hang (for client timeouts).

Typical use::

    repo = make_repo(tmp_path / "srv", "acme/app", {"README": "v1\\n"})
    old = repo.head()
    new = repo.commit({"README": "v2\\n"}, "second")
    with GitHTTPServer(tmp_path / "srv", username="x-access-token", password=token) as git:
        env = {**git_client_env(tmp_path / "home"), **token_auth_env(token, url=git.url)}
        # git init w && git -C w fetch --depth 1 <git.repo_url("acme/app")> <old>
        assert git.requests_for("acme/app")[-1].wants == (old,)

Why protocol v2 is switched off for ``allow_sha_in_want=False``: in protocol v2 ``want`` may
name any reachable object and upload-pack ignores ``uploadpack.allow*SHA1InWant``; only the
v0 protocol enforces "advertised tips only".  (GitHub itself speaks v2 and allows it.)
"""

from __future__ import annotations

import base64
import binascii
import gzip
import hmac
import http.client
import itertools
import os
import re
import socketserver
import subprocess
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO
from urllib.parse import unquote

GIT_TIMEOUT = 60  # seconds; every git subprocess here is bounded
BACKEND_TIMEOUT = 120  # one http-backend run (a big fetch on a slow machine)
MAX_RECORDED_BODY = 1 << 20  # request bodies are teed up to this size to parse want/deepen lines
_REPO_PATH = re.compile(r"^/(?P<repo>[^/]+/[^/]+?)(?:\.git)?(?P<rest>/.*)?$")
_AUTHOR = "Imagebot Tests <tests@imagebot.invalid>"
_EPOCH = 1_700_000_000  # fixture commits get fixed, increasing dates: same input, same shas


# --------------------------------------------------------------------------- client side


def git_client_env(home: Path | None = None, **extra: str) -> dict[str, str]:
    """An environment for a *client* git that sees none of the developer's or machine's config.

    No global/system config (so no credential helper or url rewrite sneaks in), no terminal
    prompts (a missing credential fails instead of hanging), C locale (stable messages).
    ``home`` is created if given; git itself never reads it with ``GIT_CONFIG_GLOBAL`` set.
    """
    if home is not None:
        home.mkdir(parents=True, exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home) if home is not None else tempfile.gettempdir(),
        "LC_ALL": "C",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_AUTHOR_NAME": "Imagebot Tests", "GIT_AUTHOR_EMAIL": "tests@imagebot.invalid",
        "GIT_COMMITTER_NAME": "Imagebot Tests", "GIT_COMMITTER_EMAIL": "tests@imagebot.invalid",
    }
    env.update(extra)
    return env


def git_config_env(pairs: list[tuple[str, str]]) -> dict[str, str]:
    """``-c key=value`` for every pair, but through the environment (git >= 2.31), not argv."""
    env = {"GIT_CONFIG_COUNT": str(len(pairs))}
    for index, (key, value) in enumerate(pairs):
        env[f"GIT_CONFIG_KEY_{index}"] = key
        env[f"GIT_CONFIG_VALUE_{index}"] = value
    return env


def token_auth_env(token: str, *, url: str, username: str = "x-access-token") -> dict[str, str]:
    """Env vars that make git send ``Authorization: Basic <user:token>`` to ``url`` and below.

    This is the mechanism recommended for the pipeline: the token is in no argv, no URL, no
    file, and no credential helper can store it; the header goes out on the first request (no
    401 round trip); the ``http.<url>.extraHeader`` key scopes it to the forge, so a submodule
    or redirect to another host does not get it.  GitHub: ``x-access-token``; GitLab: ``oauth2``.
    """
    basic = base64.b64encode(f"{username}:{token}".encode()).decode()
    prefix = url.rstrip("/") + "/"
    return git_config_env([(f"http.{prefix}.extraHeader", f"Authorization: Basic {basic}")])


# --------------------------------------------------------------------------- fixture repos


@dataclass
class Repo:
    """A bare repository under a served root, changed with plumbing (no working copy).

    ``git fast-import`` writes one commit per process (a few ms), with fixed dates so fixture
    shas are reproducible.  Every method returns the commit sha it produced or touched.
    """

    path: Path
    name: str
    default_branch: str = "main"
    _clock: Iterator[int] = field(default_factory=lambda: itertools.count(_EPOCH, 60), repr=False)

    def git(self, *args: str, input: bytes | None = None) -> str:
        """Run ``git --git-dir=<bare> ARGS`` with an isolated config; return stripped stdout."""
        result = subprocess.run(
            ["git", f"--git-dir={self.path}", *args], input=input, capture_output=True,
            env=git_client_env(), timeout=GIT_TIMEOUT,
        )
        if result.returncode != 0:
            raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.decode(errors='replace')}")
        return result.stdout.decode().strip()

    def head(self, ref: str | None = None) -> str:
        """The commit sha ``ref`` (default: the default branch) points at."""
        return self.git("rev-parse", "--verify", f"{ref or self.default_branch}^{{commit}}")

    def commit(
        self, files: Mapping[str, str | bytes | None], message: str = "change", *,
        branch: str | None = None, parent: str | None = None,
    ) -> str:
        """Commit ``files`` (``None`` deletes a path) on ``branch``; return the new sha.

        The parent is ``parent`` if given, else the branch tip if the branch exists (a new
        branch without ``parent`` starts a root commit).  Other paths are kept.
        """
        branch = branch or self.default_branch
        if parent is None and self._exists(f"refs/heads/{branch}"):
            parent = self.head(branch)
        when = f"{next(self._clock)} +0000"
        script = bytearray()
        script += f"commit refs/heads/{branch}\nmark :1\n".encode()
        script += f"author {_AUTHOR} {when}\ncommitter {_AUTHOR} {when}\n".encode()
        script += _data(message.encode())
        if parent is not None:
            script += f"from {parent}\n".encode()
        for path, content in files.items():
            if content is None:
                script += f"D {path}\n".encode()
            else:
                script += f"M 100644 inline {path}\n".encode()
                script += _data(content.encode() if isinstance(content, str) else content)
        script += b"get-mark :1\ndone\n"
        return self.git("fast-import", "--quiet", "--done", "--force", input=bytes(script))

    def branch(self, name: str, sha: str | None = None) -> str:
        """Point ``refs/heads/name`` at ``sha`` (default: the default branch's tip)."""
        sha = sha or self.head()
        self.git("update-ref", f"refs/heads/{name}", sha)
        return sha

    def tag(self, name: str, sha: str | None = None, *, message: str | None = None) -> str:
        """Tag ``sha`` (default: the default branch's tip); annotated when ``message`` is given.

        Returns the tagged *commit* sha (what a tag push webhook's ``after`` peels to).
        """
        sha = sha or self.head()
        if message is None:
            self.git("update-ref", f"refs/tags/{name}", sha)
        else:
            self.git("tag", "-a", "-m", message, name, sha)
        return sha

    def delete_branch(self, name: str) -> str:
        """Delete ``refs/heads/name``; return the sha it pointed at."""
        sha = self.head(f"refs/heads/{name}")
        self.git("update-ref", "-d", f"refs/heads/{name}")
        return sha

    def delete_tag(self, name: str) -> str:
        """Delete ``refs/tags/name``; return the commit sha it pointed at."""
        sha = self.head(f"refs/tags/{name}")
        self.git("update-ref", "-d", f"refs/tags/{name}")
        return sha

    def set_default_branch(self, name: str) -> None:
        """Point HEAD (what a clone checks out) at ``refs/heads/name``."""
        self.git("symbolic-ref", "HEAD", f"refs/heads/{name}")
        self.default_branch = name

    def read(self, sha: str, path: str) -> bytes:
        """The content of ``path`` at ``sha``, straight from the object store."""
        return subprocess.run(
            ["git", f"--git-dir={self.path}", "cat-file", "blob", f"{sha}:{path}"],
            capture_output=True, check=True, timeout=GIT_TIMEOUT,
            env=git_client_env(),
        ).stdout

    def _exists(self, ref: str) -> bool:
        return subprocess.run(
            ["git", f"--git-dir={self.path}", "show-ref", "--verify", "--quiet", ref],
            env=git_client_env(), timeout=GIT_TIMEOUT,
        ).returncode == 0


def _data(payload: bytes) -> bytes:
    return f"data {len(payload)}\n".encode() + payload + b"\n"


def make_repo(
    root: Path, name: str, files: Mapping[str, str | bytes], message: str = "initial commit",
    branch: str = "main",
) -> Repo:
    """Create bare ``root/owner/repo.git`` with one commit of ``files`` on ``branch``."""
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", name) or name.endswith(".git"):
        raise ValueError(f"repository name must be 'owner/repo', got {name!r}")
    path = root / f"{name}.git"
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["git", "init", "--quiet", "--bare", f"--initial-branch={branch}", str(path)],
        check=True, capture_output=True, env=git_client_env(), timeout=GIT_TIMEOUT,
    )
    repo = Repo(path=path, name=name, default_branch=branch)
    repo.commit(files, message)
    return repo


def multiarch_fixture_files(base_image: str) -> dict[str, str]:
    """A Dockerfile written the buildx way, plus the file it copies in.

    ``ARG TARGETARCH`` has no default on purpose: that is the form BuildKit documents for
    receiving its automatic platform value (a default on the ``ARG`` line risks shadowing it),
    the classic builder gets the value from imagebot's ``--build-arg``, and with neither the
    shell default ``${TARGETARCH:-unknown}`` keeps the build working.  ``ARG`` after a real
    ``FROM`` is fine (as the first instruction after ``FROM scratch`` it breaks multi-platform
    classic builds).
    """
    dockerfile = (
        f"FROM {base_image}\n"
        "ARG TARGETARCH\n"
        "COPY hello.txt /hello.txt\n"
        'RUN uname -m > /arch && echo "${TARGETARCH:-unknown}" > /targetarch\n'
        'CMD ["cat", "/arch"]\n'
    )
    return {"Dockerfile": dockerfile, "hello.txt": "hello from the imagebot fixture\n"}


# --------------------------------------------------------------------------- the server


@dataclass
class RecordedRequest:
    """One request as the server saw it.  The password is never kept, only whether auth came."""

    seq: int
    method: str
    path: str
    query: str
    repo: str | None
    auth_present: bool
    username: str | None
    git_protocol: str | None
    content_encoding: str | None
    chunked: bool
    status: int | None = None
    faulted: bool = False
    wants: tuple[str, ...] = ()
    deepen: int | None = None
    backend_stderr: str = ""

    @property
    def service(self) -> str:
        """``info/refs``, ``git-upload-pack``, ... (the part after the repository)."""
        match = _REPO_PATH.match(self.path)
        return (match.group("rest") or "/").lstrip("/") if match else self.path


@dataclass
class Fault:
    """Break the next ``remaining`` requests (``None``: all) to ``repo`` (``None``: any)."""

    status: int | None
    delay: float
    repo: str | None
    remaining: int | None

    def matches(self, repo: str | None) -> bool:
        return (self.remaining is None or self.remaining > 0) and self.repo in (None, repo)


class GitHTTPServer:
    """Every bare repo under ``root`` at ``{url}/{owner}/{repo}.git``, over smart HTTP.

    With ``password`` set, requests need HTTP Basic auth with that password (or one the
    ``password`` callable accepts) and, if given, that ``username`` (``None`` accepts any, like
    GitHub with a personal access token).
    """

    def __init__(
        self, root: Path, *, username: str | None = None,
        password: str | Callable[[str], bool] | None = None,
        allow_sha_in_want: bool = True, realm: str = "GitHub",
    ) -> None:
        if username is not None and password is None:
            raise ValueError("username without password means nothing")
        self.root = Path(root)
        self.username = username
        self._password = password
        self.allow_sha_in_want = allow_sha_in_want
        self.realm = realm
        self.requests: list[RecordedRequest] = []
        self.missing: set[str] = set()
        self.url = ""
        self._faults: list[Fault] = []
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._stopping = threading.Event()  # ends every injected hang at once
        self._procs: set[subprocess.Popen[bytes]] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> GitHTTPServer:
        """Bind a free loopback port, serve in a thread, return once a request is answered."""
        if self._server is not None:
            raise RuntimeError("git HTTP server already started")
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.standin = self
        port = self._server.server_address[1]
        self.url = f"http://127.0.0.1:{port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
            name=f"git-http-{port}", daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while True:  # readiness poll: the serving loop answers, not merely the socket listens
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            try:
                conn.request("GET", "/_standin/ready")
                if conn.getresponse().status == 204:
                    return self
            except OSError:
                pass
            finally:
                conn.close()
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("git HTTP server did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        """Stop serving; hung requests are released and running backends are killed."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            procs = list(self._procs)
        for proc in procs:
            proc.kill()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> GitHTTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ test API

    def repo_url(self, name: str) -> str:
        """The clone URL of ``owner/repo``."""
        return f"{self.url}/{name}.git"

    def requests_for(self, name: str) -> list[RecordedRequest]:
        """Recorded requests addressed to repository ``name`` (``owner/repo``)."""
        with self._lock:
            return [r for r in self.requests if r.repo == name]

    def set_missing(self, name: str, missing: bool = True) -> None:
        """Answer 404 for ``owner/repo`` (as a forge does for a repo you may not see)."""
        with self._lock:
            (self.missing.add if missing else self.missing.discard)(name)

    def inject_error(self, status: int = 500, *, repo: str | None = None, count: int | None = 1) -> Fault:
        """Answer the next ``count`` requests with ``status`` instead of serving them."""
        return self._inject(Fault(status=status, delay=0.0, repo=repo, remaining=count))

    def inject_hang(self, seconds: float = 60.0, *, repo: str | None = None, count: int | None = 1) -> Fault:
        """Hold the next ``count`` requests ``seconds`` without sending a byte, then serve them.

        ``stop()`` releases held requests immediately, so a test ends promptly after its
        client timed out.
        """
        return self._inject(Fault(status=None, delay=seconds, repo=repo, remaining=count))

    def reset(self) -> None:
        """Forget requests, faults and missing repos (to share one server across tests)."""
        with self._lock:
            self.requests.clear()
            self._faults.clear()
            self.missing.clear()
            self._seq = itertools.count(1)

    def _inject(self, fault: Fault) -> Fault:
        with self._lock:
            self._faults.append(fault)
        return fault

    # ------------------------------------------------------------------ request handling

    def _handle(self, handler: _Handler) -> None:
        path, _, query = handler.path.partition("?")
        if path == "/_standin/ready":
            handler.reply(204)
            return
        match = _REPO_PATH.match(path)
        repo = match.group("repo") if match else None
        authorization = handler.headers.get("Authorization")
        username, password = _parse_basic(authorization)
        with self._lock:
            record = RecordedRequest(
                seq=next(self._seq), method=handler.command, path=path, query=query, repo=repo,
                auth_present=authorization is not None, username=username,
                git_protocol=handler.headers.get("Git-Protocol"),
                content_encoding=handler.headers.get("Content-Encoding"),
                chunked="chunked" in handler.headers.get("Transfer-Encoding", "").lower(),
            )
            self.requests.append(record)
            fault = next((f for f in self._faults if f.matches(repo)), None)
            if fault is not None and fault.remaining is not None:
                fault.remaining -= 1
            missing = repo in self.missing
        if fault is not None:
            record.faulted = True
            if fault.delay and self._stopping.wait(fault.delay):
                handler.close_connection = True  # stopped while held: answer nothing
                return
            if fault.status is not None:
                record.status = fault.status
                handler.reply(fault.status, b"injected fault\n")
                return
        if self._password is not None and not self._authorized(username, password):
            record.status = 401
            handler.reply(
                401, b"Invalid username or token.\n",
                {"WWW-Authenticate": f'Basic realm="{self.realm}"'},
            )
            return
        if repo is None or missing:
            record.status = 404
            handler.reply(404, b"Repository not found.\n")
            return
        self._run_backend(handler, record, path, query, username)

    def _authorized(self, username: str | None, password: str | None) -> bool:
        assert self._password is not None
        if password is None:
            return False
        if callable(self._password):  # e.g. "an installation token the GitHub stand-in issued"
            if not self._password(password):
                return False
        elif not hmac.compare_digest(password.encode(), self._password.encode()):
            return False
        return self.username is None or username == self.username

    def _backend_env(self, handler: _Handler, path: str, query: str, username: str | None) -> dict[str, str]:
        """The CGI environment for ``git http-backend`` (RFC 3875 plus git's own variables)."""
        headers = handler.headers
        sha_in_want = "true" if self.allow_sha_in_want else "false"
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.root),
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": os.devnull,
            "GIT_PROJECT_ROOT": str(self.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "GATEWAY_INTERFACE": "CGI/1.1",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REQUEST_METHOD": handler.command,
            "PATH_INFO": unquote(path),
            "QUERY_STRING": query,
            "REMOTE_ADDR": handler.client_address[0],
            "CONTENT_TYPE": headers.get("Content-Type", ""),
            # Not allowAnySHA1InWant=false: upload-pack clears *all* allow-* bits for it, so
            # it silently undoes the two settings before it.
            **git_config_env([
                ("uploadpack.allowReachableSHA1InWant", sha_in_want),
                ("uploadpack.allowTipSHA1InWant", sha_in_want),
                ("uploadpack.allowFilter", "true"),
                ("http.receivepack", "false"),  # a fetch-only forge: nobody pushes in these tests
            ]),
        }
        if headers.get("Content-Length") is not None:
            env["CONTENT_LENGTH"] = headers["Content-Length"]
        if username is not None and self._password is not None:
            env["REMOTE_USER"] = username
        for name, value in headers.items():
            key = "HTTP_" + name.upper().replace("-", "_")
            if key in ("HTTP_AUTHORIZATION", "HTTP_PROXY"):  # never hand the secret on; httpoxy
                continue
            if key == "HTTP_GIT_PROTOCOL" and not self.allow_sha_in_want:
                continue  # v0 only: v2 would ignore uploadpack.allow*SHA1InWant (module doc)
            env[key] = value
        return env

    def _run_backend(
        self, handler: _Handler, record: RecordedRequest, path: str, query: str, username: str | None,
    ) -> None:
        """Run ``git http-backend``: stream the body in, parse the CGI head, stream the rest out."""
        proc = subprocess.Popen(
            ["git", "http-backend"], env=self._backend_env(handler, path, query, username),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )
        with self._lock:
            self._procs.add(proc)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stderr: list[bytes] = []
        feeder = threading.Thread(target=self._feed, args=(handler, proc.stdin, record), daemon=True)
        drainer = threading.Thread(target=lambda: stderr.append(proc.stderr.read()), daemon=True)
        feeder.start()
        drainer.start()
        watchdog = threading.Timer(BACKEND_TIMEOUT, proc.kill)
        watchdog.start()
        try:
            status, headers = _read_cgi_head(proc.stdout)
            record.status = status
            handler.send_response(status)
            for name, value in headers:
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    handler.send_header(name, value)
            handler.send_header("Transfer-Encoding", "chunked")  # the body is streamed as it comes
            handler.end_headers()
            while chunk := proc.stdout.read1(65536):
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            feeder.join(timeout=BACKEND_TIMEOUT)  # want/deepen are recorded before the reply ends
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (e.g. timed out)
            handler.close_connection = True
            proc.kill()
        finally:
            watchdog.cancel()
            proc.stdout.close()
            proc.wait(timeout=BACKEND_TIMEOUT)
            drainer.join(timeout=5)
            proc.stderr.close()
            record.backend_stderr = b"".join(stderr).decode(errors="replace")
            with self._lock:
                self._procs.discard(proc)

    def _feed(self, handler: _Handler, stdin: IO[bytes], record: RecordedRequest) -> None:
        """Copy the request body (Content-Length or chunked) to the backend; keep a copy to parse.

        The body is read to its end even if the backend stops reading, so the next request on
        the kept-alive connection starts at the right byte.
        """
        kept = bytearray()
        try:
            for piece in _request_body(handler):
                if len(kept) < MAX_RECORDED_BODY:
                    kept += piece
                try:
                    stdin.write(piece)
                except (BrokenPipeError, ValueError):
                    pass
        except (OSError, ValueError):
            handler.close_connection = True
        finally:
            try:
                stdin.close()
            except BrokenPipeError:
                pass
        if record.method == "POST" and len(kept) < MAX_RECORDED_BODY:
            record.wants, record.deepen = _negotiation(bytes(kept), record.content_encoding)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    standin: GitHTTPServer

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), a DNS lookup we do not need.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "127.0.0.1", self.server_address[1]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked bodies, as git's curl expects
    server: _Server
    timeout = 120  # an idle keep-alive connection does not hold its thread forever
    # Without it, the small last chunk of every response waits for the client's delayed ACK
    # (Nagle), adding ~40 ms per request.
    disable_nagle_algorithm = True

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.server.standin._handle(self)

    do_POST = do_GET

    def reply(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None) -> None:
        """A complete small response, then close the connection.

        The request body is read first: closing a socket with unread input sends a TCP RST,
        and the client may then report "connection reset" instead of this status.
        """
        self.close_connection = True
        try:
            for _ in _request_body(self):
                pass
        except (OSError, ValueError):
            return
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet tests
        pass


# --------------------------------------------------------------------------- wire helpers


def _parse_basic(authorization: str | None) -> tuple[str | None, str | None]:
    if not authorization or not authorization.lower().startswith("basic "):
        return None, None
    try:
        user, _, password = base64.b64decode(authorization[6:].strip()).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return None, None
    return user, password


def _request_body(handler: BaseHTTPRequestHandler) -> Iterator[bytes]:
    """The request body as it arrives: ``Content-Length`` bytes, or de-chunked chunks."""
    rfile = handler.rfile
    if "chunked" in handler.headers.get("Transfer-Encoding", "").lower():
        while True:
            size = int(rfile.readline(1024).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while rfile.readline(1024) not in (b"\r\n", b"\n", b""):  # trailers
                    pass
                return
            remaining = size
            while remaining:
                piece = rfile.read(min(remaining, 65536))
                if not piece:
                    raise ConnectionResetError("client closed mid-chunk")
                remaining -= len(piece)
                yield piece
            rfile.readline(1024)  # CRLF after the chunk
    remaining = int(handler.headers.get("Content-Length") or 0)
    while remaining:
        piece = rfile.read(min(remaining, 65536))
        if not piece:
            raise ConnectionResetError("client closed mid-body")
        remaining -= len(piece)
        yield piece


def _read_cgi_head(stdout: IO[bytes]) -> tuple[int, list[tuple[str, str]]]:
    """Parse the CGI response head: ``Status:`` becomes the status, the rest are headers."""
    status, headers = 200, []
    while True:
        line = stdout.readline(8192)
        if not line:  # the backend died before answering
            return 502, [("Content-Type", "text/plain")]
        line = line.rstrip(b"\r\n")
        if not line:
            return status, headers
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "status":
            status = int(value.split()[0])
        else:
            headers.append((name.strip(), value.strip()))


def _negotiation(body: bytes, encoding: str | None) -> tuple[tuple[str, ...], int | None]:
    """The ``want`` shas and ``deepen`` depth of an upload-pack request (v0 or v2 pkt-lines)."""
    if encoding and encoding.lower() in ("gzip", "x-gzip"):
        try:
            body = gzip.decompress(body)
        except (OSError, EOFError, zlib.error):
            return (), None
    wants: list[str] = []
    deepen: int | None = None
    pos = 0
    while pos + 4 <= len(body):
        try:
            length = int(body[pos:pos + 4], 16)
        except ValueError:
            break
        if length < 4:  # flush / delim / response-end packets
            pos += 4
            continue
        line = body[pos + 4:pos + length].rstrip(b"\n").decode(errors="replace")
        pos += length
        words = line.split(" ")
        if words[0] == "want" and len(words) > 1:
            wants.append(words[1])
        elif words[0] == "deepen" and len(words) > 1 and words[1].isdigit():
            deepen = int(words[1])
    return tuple(wants), deepen
