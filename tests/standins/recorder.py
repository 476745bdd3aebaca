"""An HTTP server that records every request's Authorization header and answers as told.

For the tests that prove where registry credentials may go: it plays a registry on another
host (``127.0.0.2``: loopback, so the Docker engine speaks plain HTTP to it, yet not the
registry's host) that challenges for Basic auth, or a bearer token realm. Whatever reaches
it is in :attr:`Recorder.requests`; a test asserts on them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    authorization: str | None


class Recorder:
    """``with Recorder(host="127.0.0.2", status=401, headers={...}) as r: ... r.requests``."""

    def __init__(self, host: str = "127.0.0.2", status: int = 401,
                 headers: dict[str, str] | None = None, body: bytes = b'{"errors": []}') -> None:
        self.requests: list[Seen] = []
        self.status, self.headers, self.body = status, headers or {}, body
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                recorder.requests.append(Seen(self.command, self.path, self.headers.get("Authorization")))
                length = int(self.headers.get("Content-Length") or 0)
                if length:
                    self.rfile.read(length)
                self.send_response(recorder.status)
                for name, value in recorder.headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(recorder.body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(recorder.body)

            do_GET = do_HEAD = do_PUT = do_POST = do_PATCH = _answer

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.host = f"{host}:{self.server.server_address[1]}"
        self.url = f"http://{self.host}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    @property
    def authorizations(self) -> list[str]:
        return [seen.authorization for seen in self.requests if seen.authorization]
