"""A Docker credential helper backed by a JSON file, for tests: ``docker-credential-imagebot-test``.

The protocol is the standard one (github.com/docker/docker-credential-helpers): the action is
the only argument, the input comes on stdin, the answer goes to stdout.

* ``get``: stdin is a server URL; prints ``{"ServerURL", "Username", "Secret"}``.  Unknown
  server: prints ``credentials not found in native keychain`` and exits 1 (docker-py's
  ``Store.get`` turns that into ``CredentialsNotFound``; the Docker CLI treats it as "no
  credentials").
* ``store``: stdin is ``{"ServerURL", "Username", "Secret"}``.
* ``erase``: stdin is a server URL (unknown: the not-found message, exit 1).
* ``list``: prints ``{"<server>": "<username>", ...}``.
* ``version``: prints a version line.

The file is named by ``IMAGEBOT_TEST_CREDENTIALS_FILE`` and maps servers to credentials::

    {"127.0.0.1:5001": {"Username": "imagebot", "Secret": "..."}}

Server names are matched loosely, as callers differ: ``https://127.0.0.1:5001``,
``http://127.0.0.1:5001/``, ``127.0.0.1:5001`` and ``127.0.0.1:5001/v2/`` all find the key
``127.0.0.1:5001`` (and a key written with a scheme is found by the bare form).  Exact key
matches win.  ``get`` echoes the ServerURL as it was asked, like the real helpers.

The ``main`` part of this module uses only the standard library and runs under any
``python3`` (the wrapper in ``bin/`` does not need the venv).  :class:`CredentialHelper` is the
test-side API: write and rotate the file, and build the environment for a subprocess::

    helper = CredentialHelper(tmp_path / "creds.json")
    helper.set("127.0.0.1:5001", "imagebot", "s3cret")
    subprocess.run([helper.executable, "get"], input="https://127.0.0.1:5001", env=helper.env(), ...)
    helper.set("127.0.0.1:5001", "imagebot", "n3w")      # rotation: next `get` sees it

Every invocation is appended to ``<file>.log`` (action and server, never the secret) so tests
can count helper calls.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ENV_VAR = "IMAGEBOT_TEST_CREDENTIALS_FILE"
HELPER_NAME = "imagebot-test"  # docker config: {"credHelpers": {"host:port": "imagebot-test"}}
NOT_FOUND = "credentials not found in native keychain"
MISSING_URL = "no credentials server URL"
VERSION = "docker-credential-imagebot-test (imagebot tests) v0.1.0"
BIN_DIR = Path(__file__).resolve().parent / "bin"
EXECUTABLE = BIN_DIR / f"docker-credential-{HELPER_NAME}"


# --------------------------------------------------------------------------- matching


def server_key(server_url: str) -> str:
    """``https://Host:5001/v2/`` -> ``host:5001``: scheme, path and trailing slash dropped,
    host lower-cased (what a registry's credentials are really keyed by)."""
    text = server_url.strip()
    if "://" in text:
        text = text.split("://", 1)[1]
    text = text.split("/", 1)[0]
    return text.lower()


def lookup(store: Mapping[str, Any], server_url: str) -> tuple[str, Any] | None:
    """The ``(key, entry)`` for ``server_url``: exact key first, then the normalised form."""
    wanted = server_url.strip()
    if wanted in store:
        return wanted, store[wanted]
    norm = server_key(wanted)
    for key, entry in store.items():
        if server_key(key) == norm:
            return key, entry
    return None


# --------------------------------------------------------------------------- file


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text() or "{}")
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _write(path: Path, data: Mapping[str, Any]) -> None:
    """Atomically (temp file + rename): a concurrent ``get`` sees the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


# --------------------------------------------------------------------------- the helper program


def _fail(message: str) -> int:
    # Real helpers print the error on stdout (credentials.Serve) and exit 1.
    sys.stdout.write(message + "\n")
    sys.stdout.flush()
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] not in ("get", "store", "erase", "list", "version"):
        sys.stderr.write("Usage: docker-credential-imagebot-test <store|get|erase|list|version>\n")
        return 1
    action = argv[0]
    if action == "version":
        print(VERSION)
        return 0
    name = os.environ.get(ENV_VAR)
    if not name:
        return _fail(f"{ENV_VAR} is not set")
    path = Path(name)
    raw = sys.stdin.read() if action != "list" else ""
    try:
        store = _read(path)
    except (ValueError, OSError) as exc:
        return _fail(f"cannot read {path}: {exc}")
    server = raw.strip() if action in ("get", "erase") else ""
    _log(path, action, server)

    if action == "get":
        if not server:
            return _fail(MISSING_URL)
        found = lookup(store, server)
        if found is None:
            return _fail(NOT_FOUND)
        entry = found[1]
        print(json.dumps({"ServerURL": server, "Username": entry.get("Username", ""),
                          "Secret": entry.get("Secret", "")}))
        return 0
    if action == "list":
        print(json.dumps({key: entry.get("Username", "") for key, entry in store.items()}))
        return 0
    if action == "store":
        try:
            creds = json.loads(raw)
            url, user, secret = creds["ServerURL"], creds["Username"], creds["Secret"]
        except (ValueError, KeyError, TypeError) as exc:
            return _fail(f"bad credentials JSON on stdin: {exc}")
        if not url:
            return _fail(MISSING_URL)
        found = lookup(store, url)
        store[found[0] if found else url] = {"Username": user, "Secret": secret}
        _write(path, store)
        return 0
    # erase
    if not server:
        return _fail(MISSING_URL)
    found = lookup(store, server)
    if found is None:
        return _fail(NOT_FOUND)
    del store[found[0]]
    _write(path, store)
    return 0


def _log(path: Path, action: str, server: str) -> None:
    try:
        with open(f"{path}.log", "a") as log:
            log.write(json.dumps({"action": action, "server": server}) + "\n")
    except OSError:
        pass


# --------------------------------------------------------------------------- test-side API


class CredentialHelper:
    """The credentials file of ``docker-credential-imagebot-test``, from the test's side."""

    name = HELPER_NAME
    executable = str(EXECUTABLE)
    bin_dir = str(BIN_DIR)

    def __init__(self, path: Path | str, initial: Mapping[str, tuple[str, str]] | None = None) -> None:
        self.path = Path(path)
        if not self.path.exists():
            _write(self.path, {})
        for server, (user, secret) in (initial or {}).items():
            self.set(server, user, secret)

    def set(self, server: str, username: str, secret: str) -> None:
        """Add or rotate the credentials for ``server`` (the next ``get`` sees them)."""
        store = _read(self.path)
        found = lookup(store, server)
        store[found[0] if found else server] = {"Username": username, "Secret": secret}
        _write(self.path, store)

    def remove(self, server: str) -> None:
        store = _read(self.path)
        found = lookup(store, server)
        if found is not None:
            del store[found[0]]
            _write(self.path, store)

    def entries(self) -> dict[str, Any]:
        return _read(self.path)

    def calls(self) -> list[dict[str, str]]:
        """Every invocation so far: ``[{"action": "get", "server": "https://..."}, ...]``."""
        try:
            text = Path(f"{self.path}.log").read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default ``os.environ``) with the bin dir first on PATH and the file set."""
        env = dict(os.environ if base is None else base)
        env["PATH"] = os.pathsep.join([self.bin_dir, *[p for p in env.get("PATH", "").split(os.pathsep) if p]])
        env[ENV_VAR] = str(self.path)
        return env

    def write_docker_config(self, config_dir: Path | str, servers: list[str] | None = None) -> Path:
        """A ``config.json`` routing ``servers`` (default: every stored server) to this helper
        via ``credHelpers``: for ``DOCKER_CONFIG=config_dir`` (CLI) or docker-py's
        ``docker.auth.load_config``."""
        directory = Path(config_dir)
        directory.mkdir(parents=True, exist_ok=True)
        names = servers if servers is not None else [server_key(k) for k in self.entries()]
        path = directory / "config.json"
        path.write_text(json.dumps({"credHelpers": {name: self.name for name in names}}, indent=2) + "\n")
        return path


if __name__ == "__main__":
    sys.exit(main())
