"""What the HTTP stand-ins share.

:class:`ThreadedServer` serves an ASGI app with uvicorn on 127.0.0.1 from a thread with an
event loop of its own: the stand-ins (GitHub, GitLab, the registry's token server) answer real
HTTP while the test drives them synchronously from its own thread. :class:`ForgeStandIn` is the
lifecycle of the forge stand-ins; :class:`Violation` and :class:`Fault` are their records of
contract breaches and canned failures.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import uvicorn
from starlette.types import ASGIApp

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


class ThreadedServer:
    def __init__(self, name: str, *, graceful_shutdown: int = 2) -> None:
        self.name = name
        self.graceful_shutdown = graceful_shutdown
        self.port = 0
        #: The server's event loop, for ``call_soon_threadsafe`` from the test thread.
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._crash: BaseException | None = None

    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self, make_app: Callable[[], ASGIApp], port: int = 0,
              on_loop: Callable[[], None] | None = None) -> int:
        """Bind ``port`` (0: a free one), serve ``make_app()``, and return the port once uvicorn
        reports ``started``. ``on_loop`` runs first inside the server's loop (to create
        asyncio objects that belong to it)."""
        if self._thread is not None:
            raise RuntimeError(f"{self.name} already started")
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when the
        # listening socket says TCP, and without it keep-alive requests take 40 ms (delayed ACK).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts on the same port
        sock.bind(("127.0.0.1", port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            make_app(), lifespan="off", log_config=None, log_level="warning",
            access_log=False, server_header=False, timeout_graceful_shutdown=self.graceful_shutdown,
        )
        self._server = uvicorn.Server(config)
        self._ready.clear()
        self._crash = None
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(sock, on_loop),), name=f"{self.name}-{self.port}", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout=START_TIMEOUT) or not self._server.started:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {self._crash!r}")
        return self.port

    async def _serve(self, sock: socket.socket, on_loop: Callable[[], None] | None) -> None:
        assert self._server is not None
        self.loop = asyncio.get_running_loop()
        if on_loop is not None:
            on_loop()
        task = asyncio.create_task(self._server.serve(sockets=[sock]))
        try:
            while not self._server.started and not task.done():
                await asyncio.sleep(0.005)  # readiness poll, inside the server's own loop
            self._ready.set()
            await task
        except BaseException as exc:  # surfaced by start(); a thread has nobody to raise to
            self._crash = exc
        finally:
            self._ready.set()
            sock.close()

    def stop(self) -> None:
        """Shut uvicorn down (forcefully if it does not go within the timeout)."""
        if self._thread is None or self._server is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=STOP_TIMEOUT)
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(timeout=STOP_TIMEOUT)
        self._thread = None


class ForgeStandIn:
    """The lifecycle the forge stand-ins share: serve ``create_app(self)``, and on stop (or
    reset) wake the requests an artificial ``delay`` holds, so they are dropped, not handled.

    Subclasses set ``_http``, ``_lock``, ``_generation`` and ``_wake`` and provide
    ``_create_app()``.
    """

    _http: ThreadedServer
    _lock: threading.RLock
    _generation: int
    _wake: asyncio.Event

    def _create_app(self) -> ASGIApp:
        raise NotImplementedError

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._http.port}" if self._http.port else ""

    def start(self):
        """Bind a free port, serve in a thread, and return once uvicorn reports ``started``."""
        self._http.start(self._create_app)
        return self

    def stop(self) -> None:
        """Shut uvicorn down; requests held by ``delay`` are woken and dropped, so it is prompt."""
        if not self._http.running:
            return
        with self._lock:
            self._generation += 1
        self._wake_held_requests()
        self._http.stop()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _wake_held_requests(self) -> None:
        held, self._wake = self._wake, asyncio.Event()
        if self._http.loop is not None:
            try:
                self._http.loop.call_soon_threadsafe(held.set)  # asyncio.Event is not thread-safe
            except RuntimeError:  # loop already closed: nothing is waiting
                pass


@dataclass(frozen=True)
class Violation:
    """A breach of the documented contract: the bot (or the stand-in) did something the forge
    would not accept (each stand-in's docstring lists its kinds)."""

    seq: int
    method: str
    path: str
    kind: str
    message: str
    details: tuple[str, ...] = ()

    def __str__(self) -> str:
        lines = [f"#{self.seq} {self.method} {self.path} [{self.kind}] {self.message}"]
        lines += [f"    - {detail}" for detail in self.details]
        return "\n".join(lines)


@dataclass
class Fault:
    """A canned response for the next ``remaining`` requests matching method and path."""

    method: str
    path_regex: re.Pattern[str]
    status: int
    remaining: int
    headers: dict[str, str]
    body: Any
    delay: float = 0.0
    #: Handle the request first (its effects stay), then answer with the fault: the forge did
    #: it, but the answer was lost on the way.
    handled: bool = False

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and self.method in ("*", method.upper())
            and self.path_regex.search(path) is not None
        )
