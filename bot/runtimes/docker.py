"""The Docker runtime: build one platform's image through the engine, tag it, push it.

Nothing else lives here (names, retries, classification, credentials, manifests and telemetry
are the pipeline's, shared with other runtimes). The Docker SDK is synchronous, so each stream
(build, push) is read on a thread and handed to the event loop; cancelling the awaiting task
closes the engine connection, which makes the engine abandon the build or push.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import docker
import requests
from docker import auth as docker_auth
from docker.errors import APIError, DockerException

from bot.pipeline.credentials import Credentials
from bot.pipeline.push import RegistryError, classify
from bot.pipeline.tags import platform_parts
from bot.runtimes import BuildError, BuildJob, LogSink, PullError, Pushed, last_step, pull_failure

if TYPE_CHECKING:
    from bot.settings import Settings

__all__ = ["BuildError", "BuildJob", "DockerRuntime", "PullError", "Pushed"]

#: A Dockerfile larger than this is not read for its FROM lines (the engine still gets it).
MAX_DOCKERFILE_BYTES = 1024 * 1024

class _Engine(docker.APIClient):
    """An engine client that sends exactly the registry credentials it was given.

    docker-py otherwise falls back to ~/.docker/config.json whenever it has none in memory,
    which would hand the bot's own credentials to builds that must not have any.
    """

    def __init__(self, registry_auth: dict[str, Credentials] | None = None,
                 build_params: dict[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        #: /build query parameters docker-py has no argument for (the CPU quota)
        self._build_params = build_params or {}
        self._registry_auth = {
            host: {"username": c.username, "password": c.password.get_secret_value(), "serveraddress": host}
            for host, c in (registry_auth or {}).items()
        }

        self._streams: list[Any] = []

    def _set_auth_headers(self, headers: dict[str, str]) -> None:
        if self._registry_auth:
            headers["X-Registry-Config"] = docker_auth.encode_header(self._registry_auth)

    def _post(self, url: str, **kwargs: Any) -> Any:
        if self._build_params and url.endswith("/build"):
            kwargs["params"] = {**(kwargs.get("params") or {}), **self._build_params}
        response = super()._post(url, **kwargs)
        if kwargs.get("stream"):
            self._streams.append(response)
        return response

    def close(self) -> None:
        """Drop the streaming connections too (Session.close only drops idle ones): the
        engine sees its client go, and abandons the build or push.

        The socket is shut down rather than closed: a thread may be blocked reading the
        stream, holding the reader's lock (close would wait for it); shutdown wakes it.
        """
        for response in self._streams:
            sock = getattr(getattr(response.raw, "connection", None), "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self._streams.clear()
        super().close()


def _engine(registry_auth: dict[str, Credentials] | None = None, timeout: float = 3600,
            build_params: dict[str, Any] | None = None) -> _Engine:
    kwargs = docker.utils.kwargs_from_env()
    kwargs.setdefault("version", "auto")
    return _Engine(registry_auth, build_params, timeout=int(timeout), **kwargs)


def _auth_for(job: BuildJob) -> dict[str, dict[str, str]]:
    """Registry host -> the auth_config a pull of the job may send: the job's own credentials
    for a trusted job, none at all for an untrusted one. Passed explicitly on every pull:
    without one, docker-py falls back to ~/.docker/config.json (the bot's own logins)."""
    if not job.trusted:
        return {}
    return {host: c.auth_config() for host, c in (job.pull_credentials or {}).items()}


def _pull_for_platform(engine: _Engine, repository: str, tag: str, platform: str, auth: dict[str, str]) -> str | None:
    """Pull ``repository:tag`` for ``platform``; the id of the image it gave, or None.

    The id is what the pin holds on to: the tag (and the list's digest reference) can be
    moved by any other pull of the same name at any time, the image id cannot."""
    try:
        for item in engine.pull(repository, tag=tag, platform=platform, stream=True, decode=True,
                                auth_config=auth):
            if "error" in item:
                return None
        config = engine.inspect_image(f"{repository}:{tag}")
    except (DockerException, requests.exceptions.ConnectionError):
        return None
    os_, arch, variant = platform_parts(platform)
    if (config.get("Os"), config.get("Architecture")) != (os_, arch):
        return None  # another pull of the name came in between: the build pulls it itself
    if variant is not None and config.get("Variant") not in (None, "", variant):
        return None
    return config["Id"]


def _remove_leftovers(watch: FromWatch) -> None:
    """Remove the containers and the images a build that was cut short made (best effort:
    an image another one builds on stays)."""
    engine = _engine(timeout=60)
    try:
        for container in watch.containers:
            with contextlib.suppress(DockerException, requests.exceptions.RequestException):
                engine.remove_container(container, force=True)
        for image in reversed(watch.committed):
            with contextlib.suppress(DockerException, requests.exceptions.RequestException):
                engine.remove_image(image)
    finally:
        engine.close()


def _oom_killed(watch: FromWatch, since: int) -> bool:
    """Whether the engine reported the build's last step container killed out of memory."""
    if not watch.containers:
        return False
    engine = _engine(timeout=30)
    try:
        events = engine.events(since=since, until=int(time.time()) + 1, decode=True,
                               filters={"type": "container", "event": "oom"})
        return any(str(event.get("id", "")).startswith(watch.containers[-1]) for event in events)
    except (DockerException, requests.exceptions.RequestException):
        return False
    finally:
        engine.close()


async def _stream(
    engine: _Engine, start: Callable[[], Iterator[dict]], handle: Callable[[list[dict]], Awaitable[None]]
) -> None:
    """Read ``start()``'s items on a thread, hand them to ``handle`` in batches, in order."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def pump() -> None:
        try:
            for item in start():
                loop.call_soon_threadsafe(queue.put_nowait, ("item", item))
            loop.call_soon_threadsafe(queue.put_nowait, ("done", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the awaiting task
            loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))

    threading.Thread(target=pump, name="docker-stream", daemon=True).start()
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            items = [value for kind, value in batch if kind == "item"]
            if items:
                await handle(items)
            for kind, value in batch:
                if kind == "done":
                    return
                if kind == "error":
                    raise value
    except asyncio.CancelledError:
        engine.close()  # the engine sees the client go and abandons the work
        raise


def _split(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.strip()]


class LineJoiner:
    """The engine's output as whole lines. The engine cuts a build's ``stream`` text where the
    build's process wrote it, so one line, and a secret in it, may come in two items; masking
    works on lines, so it must see the line whole. A partial line longer than
    :data:`MAX_PARTIAL` is let go as it is (``RUN`` output without a newline must not grow the
    bot's memory)."""

    MAX_PARTIAL = 16 * 1024

    def __init__(self) -> None:
        self._partial = ""

    def feed(self, items: list[dict]) -> list[str]:
        lines: list[str] = []
        for item in items:
            if item.get("status") and item.get("progress"):
                continue  # progress bars: one line per chunk is noise, not a log
            if item.get("stream") is None:  # status and the like come whole
                lines += _split(str(item.get("status") or ""))
                continue
            *complete, self._partial = (self._partial + str(item["stream"])).split("\n")
            if len(self._partial) > self.MAX_PARTIAL:
                complete.append(self._partial)
                self._partial = ""
            lines += _split("\n".join(complete))
        return lines

    def flush(self) -> list[str]:
        """What is left of a last line without its newline."""
        rest, self._partial = self._partial, ""
        return _split(rest)


def _lines(items: list[dict]) -> list[str]:
    joiner = LineJoiner()
    return joiner.feed(items) + joiner.flush()


PLATFORM_MIXUP_ATTEMPTS = 3
#: One FROM line, matched against one line at a time: ``[ \t]`` rather than ``\s``, so that
#: no part of the pattern can run across line ends (``^\s*`` in MULTILINE mode over a file
#: of blank lines retries every line's rest: quadratic, 1 MB of them took about an hour).
_FROM_LINE = re.compile(r"[ \t]*FROM[ \t]+(?:--platform=\S+[ \t]+)?(?P<ref>\S+)(?:[ \t]+AS[ \t]+(?P<stage>\S+))?",
                        re.I)


def _from_lines(text: str) -> Iterator[re.Match[str]]:
    """The FROM lines of a Dockerfile, in linear time."""
    for line in text.splitlines():
        match = _FROM_LINE.match(line)
        if match:
            yield match


def dockerfile_bases(text: str) -> list[str]:
    """The images a Dockerfile's FROM lines pull: not ``scratch``, not earlier stages, and not
    references built from ARGs (those cannot be known before the build)."""
    stages: set[str] = set()
    bases: list[str] = []
    for match in _from_lines(text):
        ref, stage = match["ref"], match["stage"]
        if ref.lower() != "scratch" and ref.lower() not in stages and "$" not in ref and ref not in bases:
            bases.append(ref)
        if stage:
            stages.add(stage.lower())
    return bases


def _split_ref(ref: str) -> tuple[str, str | None]:
    """(repository, tag) of an image reference; a digest reference has no tag to pin."""
    if "@" in ref:
        return ref, None
    name, _, tag = ref.rpartition(":")
    if not name or "/" in tag:
        return ref, "latest"
    return name, tag


def _secrets(job: BuildJob) -> tuple[str, ...]:
    """What must not reach a message: secret build args and the registry passwords."""
    passwords = tuple(c.password.get_secret_value() for c in (job.pull_credentials or {}).values())
    return tuple(job.secrets.values()) + passwords


def platform_mixup(message: str) -> bool:
    """The engine's error when a shared base image tag moved to another platform mid-build."""
    return "does not match the specified platform" in message


class FromWatch:
    """Watches a classic build's log for its first ``FROM`` step being resolved (the
    `` ---> <id>`` line that follows ``Step 1/N : FROM ...``), and for what the build leaves
    in the engine: the container of the step it is running and the images it committed (not
    the ones it took from the cache), removed when the build is cut short."""

    def __init__(self) -> None:
        self.resolved = asyncio.Event()
        self._in_from = False
        #: the image the first FROM names, and the id the engine resolved it to
        self.first_ref: str | None = None
        self.first_id: str | None = None
        self.containers: list[str] = []
        self.committed: list[str] = []
        self._running = False

    def feed(self, lines: list[str]) -> None:
        for line in lines:
            if _FIRST_FROM.match(line):
                self._in_from = True
                words = [w for w in line.split(" : ", 1)[1].split()[1:] if not w.startswith("--")]
                self.first_ref = words[0] if words else None
            elif self._in_from and line.startswith(" ---> ") and not self.resolved.is_set():
                self.first_id = line.removeprefix(" ---> ").strip()
                self.resolved.set()
            running = _RUNNING_IN.match(line)
            if running:
                self.containers.append(running[1])
                self._running = True
                continue
            arrow = _ARROW_ID.match(line)
            if arrow and self._running:
                self.committed.append(arrow[1])
                self._running = False


_FIRST_FROM = re.compile(r"^Step 1/\d+ : FROM ", re.IGNORECASE)
_RUNNING_IN = re.compile(r"^ ---> Running in ([0-9a-f]{12,64})$")
_ARROW_ID = re.compile(r"^ ---> ([0-9a-f]{12,64})$")
#: The classic builder's words for a RUN whose process was killed (SIGKILL: 128 + 9).
_KILLED = "returned a non-zero code: 137"


def _instructions(text: str) -> Iterator[list[str]]:
    """Each instruction of a Dockerfile as its words, continuation lines joined (with the
    escape character its ``# escape=`` directive names). Linear in the text."""
    escape = "\\"
    directive = re.match(r"(?:[ \t]*#[^\n]*\n)*?[ \t]*#[ \t]*escape[ \t]*=[ \t]*(\S)", text, re.I)
    if directive:
        escape, text = directive[1], text[directive.end():]  # the directive's own line ends in it
    for line in text.replace(escape + "\r\n", " ").replace(escape + "\n", " ").splitlines():
        words = line.split()
        if words and not words[0].startswith("#"):
            yield words


def _substitute(ref: str, args: dict[str, str]) -> str:
    """``$NAME`` and ``${NAME}`` in ``ref`` replaced by the ARG values known before the build."""
    return re.sub(r"\$(?:\{([A-Za-z_][A-Za-z0-9_]*)\}|([A-Za-z_][A-Za-z0-9_]*))",
                  lambda m: args.get(m[1] or m[2], m[0]), ref)


def image_references(text: str, build_args: dict[str, str]) -> list[str] | None:
    """Every image a Dockerfile names (FROM and ``COPY --from``, not its own stages or
    ``scratch``), ARGs filled in from the global ARG defaults and ``build_args``; None when
    one cannot be known before the build."""
    args: dict[str, str] = {}
    stages: set[str] = {"scratch"}
    refs: list[str] = []
    seen_from = False
    for words in _instructions(text):
        instruction = words[0].upper()
        if instruction == "ARG" and not seen_from and len(words) > 1:
            name, given, value = words[1].partition("=")
            if given or name in build_args:
                args[name] = build_args.get(name, value.strip("\"'"))
        elif instruction == "FROM":
            seen_from = True
            rest = [w for w in words[1:] if not w.startswith("--")]
            if rest:
                refs.append(rest[0])
            if len(rest) >= 3 and rest[1].upper() == "AS":
                stages.add(rest[2].lower())
        elif instruction == "COPY":
            refs += [w.removeprefix("--from=") for w in words[1:] if w.startswith("--from=")]
    named = [_substitute(ref, {**args, **build_args}) for ref in refs]
    if any("$" in ref for ref in named):
        return None
    return list(dict.fromkeys(ref for ref in named if ref.lower() not in stages and not ref.isdigit()))


def base_images(text: str) -> list[str] | None:
    """The base images to pin before building ``text`` (a Dockerfile), or None when one is
    named by an ARG (only the build knows it). Linear in the text."""
    if any("$" in match["ref"] for match in _from_lines(text)):
        return None
    return dockerfile_bases(text)


def read_dockerfile(path: Path) -> str | None:
    """The Dockerfile's text if it is a regular file of at most MAX_DOCKERFILE_BYTES (the
    pipeline has checked it is inside the checkout); None otherwise (the build reports)."""
    try:
        with open(path, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                return None
            data = handle.read(MAX_DOCKERFILE_BYTES + 1)
    except OSError:
        return None
    return None if len(data) > MAX_DOCKERFILE_BYTES else data.decode(errors="replace")


def build_limits(memory_mb: int, cpus: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """docker-py's ``container_limits`` and the extra /build query parameters (docker-py has
    no key for a CPU quota) for each container of a classic build: memory with no swap on
    top, and ``cpus`` cores' worth of CPU time."""
    memory = memory_mb * 1024 * 1024
    period = 100_000
    return {"memory": memory, "memswap": memory}, {"cpuperiod": period, "cpuquota": int(cpus * period)}


def oom_message(message: str, memory_mb: int, oom_killed: bool) -> str:
    """The build's error, saying so when its step was killed for going over the memory limit."""
    if not oom_killed:
        return message
    return (f"{message}: out of memory: the step went over the build's memory limit of {memory_mb} MiB "
            f"(IMAGEBOT_BUILD_MEMORY_MB) and was killed")


@dataclass(frozen=True)
class Pin:
    """A base image of a trusted build, pulled for its platform: the tag to point at it."""

    ref: str
    image_id: str
    repository: str
    tag: str


class DockerRuntime:
    name = "docker"
    enforces_deadlines = False

    def __init__(self, timeout: float = 3600, pull_timeout: float = 600, memory_mb: int = 4096,
                 cpus: float = 1.0, untrusted_network: str | None = None) -> None:
        self.timeout = timeout
        self.pull_timeout = pull_timeout
        self.memory_mb = memory_mb
        self.cpus = cpus
        self.untrusted_network = untrusted_network
        #: Held only between tagging a build's pinned bases and the engine resolving its first
        #: FROM from them: local work, never network I/O (pulls happen before it is taken).
        self._from_lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> DockerRuntime:
        return cls(settings.build_timeout_seconds, settings.pull_timeout_seconds, settings.build_memory_mb,
                   settings.build_cpus, settings.untrusted_network)

    async def build(self, job: BuildJob, log: LogSink) -> str:
        """Build ``job`` for its platform; return the image id. Raises :class:`BuildError`, or
        :class:`PullError` when the registry refused (or could not serve) a base image.

        The classic builder resolves ``FROM name:tag`` through the engine's one local tag, so
        two platforms of one build pulling the same base at once can find each other's image
        ("... does not match the specified platform"); such a build is simply run again.
        """
        if not job.trusted:
            await self._check_public(job)
        pinned = await self._pin_bases(job, log)
        for attempt in range(1, PLATFORM_MIXUP_ATTEMPTS + 1):
            try:
                return await self._build_once(job, log, pinned)
            except BuildError as exc:
                if not platform_mixup(exc.message) or attempt == PLATFORM_MIXUP_ATTEMPTS:
                    raise
                await log([f"imagebot: the engine mixed up the base image's platforms; building again ({attempt})"])
        raise AssertionError("unreachable")

    def _build_kwargs(self, job: BuildJob, pinned: bool) -> dict[str, Any]:
        """What the engine is asked to build. An untrusted build always pulls its bases
        (anonymously: it has no credentials), so it can never build from an image the engine
        holds for someone else, and runs on the operator's network for untrusted builds."""
        limits, _ = build_limits(self.memory_mb, self.cpus)
        kwargs: dict[str, Any] = dict(
            path=str(job.context), dockerfile=str(job.dockerfile), tag=job.tag, platform=job.platform,
            pull=not (pinned and job.trusted), rm=True, forcerm=True, decode=True,
            buildargs={**job.build_args, **job.secrets}, labels=job.labels, target=job.target,
            container_limits=limits,
        )
        if not job.trusted and self.untrusted_network:
            kwargs["network_mode"] = self.untrusted_network
        return kwargs

    async def _build_once(self, job: BuildJob, log: LogSink, pinned: list[Pin] | None) -> str:
        engine = _engine(job.pull_credentials if job.trusted else None, self.timeout,
                         build_params=build_limits(self.memory_mb, self.cpus)[1])
        image_id: str | None = None
        error: str | None = None
        step: str | None = None  # the step the build is at, as its log says
        watch = FromWatch()
        started = int(time.time())
        joiner = LineJoiner()

        async def handle(items: list[dict]) -> None:
            nonlocal image_id, error, step
            for item in items:
                if "error" in item or "errorDetail" in item:
                    detail = item.get("errorDetail") or {}
                    error = str(detail.get("message") or item.get("error") or "build failed")
                aux = item.get("aux")
                if isinstance(aux, dict) and aux.get("ID"):
                    image_id = aux["ID"]
            await lines(joiner.feed(items))

        async def lines(new: list[str]) -> None:
            nonlocal step
            watch.feed(new)
            step = last_step(new, step)
            await log(new)

        def start() -> Iterator[dict]:
            return engine.build(**self._build_kwargs(job, pinned is not None))

        try:
            await self._staggered(engine, _stream(engine, start, handle), watch, pinned)
            await lines(joiner.flush())
            if error is None and image_id is not None:
                await self._check_platform(engine, image_id, job.platform)
        except APIError as exc:
            raise BuildError("build", str(exc.explanation or exc)) from None
        except DockerException as exc:
            raise BuildError("engine", f"the Docker engine is unreachable: {exc}") from None
        except BaseException:
            # cut short (a deadline, a cancel): the engine was told by the closed connection;
            # make sure nothing of this build stays behind, even if cancelled again meanwhile
            await asyncio.shield(asyncio.to_thread(_remove_leftovers, watch))
            raise
        finally:
            engine.close()
        if error is not None:
            if _KILLED in error:
                error = oom_message(error, self.memory_mb, await asyncio.to_thread(_oom_killed, watch, started))
            await log([f"ERROR: {error}"])
            raise pull_failure(step, error, _secrets(job)) or BuildError("build", error)
        if image_id is None:
            raise BuildError("build", "the engine finished the build without an image id")
        return image_id

    async def _staggered(self, engine: _Engine, stream: Awaitable[None], watch: FromWatch,
                         pinned: list[Pin] | None) -> None:
        """Start the build. With every base pinned (a trusted build that needs no pull), tag
        them for this platform and hold the runtime's FROM lock until the engine has resolved
        the first FROM from them, and check it resolved to the pinned image: a pull of the
        same name (pulls take no lock) may still move the tag in between, and that is the
        platform mix-up the caller builds again for. Local work only; a build that pulls
        holds no lock."""
        task: asyncio.Future | None = None
        try:
            if pinned is None:
                task = asyncio.ensure_future(stream)
            else:
                async with self._from_lock:
                    for pin in pinned:
                        await asyncio.to_thread(engine.tag, pin.image_id, pin.repository, pin.tag, force=True)
                    task = asyncio.ensure_future(stream)
                    waiter = asyncio.ensure_future(watch.resolved.wait())
                    try:
                        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                    finally:
                        waiter.cancel()
                wanted = next((p.image_id for p in pinned if p.ref == watch.first_ref), None)
                if wanted and watch.first_id and not wanted.removeprefix("sha256:").startswith(watch.first_id):
                    raise BuildError("build", f"{watch.first_ref} was found but does not match the specified "
                                              f"platform: its tag moved to another platform's image")
            await task
        finally:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            elif task is None and asyncio.iscoroutine(stream):
                stream.close()

    async def _pin_bases(self, job: BuildJob, log: LogSink) -> list[Pin] | None:
        """Pull each base image of a trusted job for ``job.platform``, each pull within
        PULL_TIMEOUT_SECONDS, with no lock held, and with exactly the job's credentials; the
        (image id, repository, tag) to point each base's tag at before the build, or None when
        not every base could be pinned (then the build pulls them itself, and reports what is
        wrong). A pull past its deadline fails the build with kind timeout. An untrusted job
        is not pinned: its build pulls every base itself, anonymously.
        """
        if not job.trusted:
            return None
        text = await asyncio.to_thread(read_dockerfile, job.dockerfile)
        bases = await asyncio.to_thread(base_images, text) if text is not None else None
        if bases is None:
            return None
        auth = _auth_for(job)
        pins: list[Pin] = []
        complete = True
        for ref in bases:
            repository, tag = _split_ref(ref)
            if tag is None:
                continue  # pinned by digest already
            image_id = await self._pull_pinned(ref, repository, tag, job.platform, auth)
            if image_id is None:
                complete = False
                await log([f"imagebot: could not pin {ref} to {job.platform}; the build pulls it"])
                continue
            pins.append(Pin(ref, image_id, repository, tag))
        return pins if complete else None

    async def _check_public(self, job: BuildJob) -> None:
        """An untrusted build may only use images anyone may pull. A tag is checked by the
        build's own (anonymous, forced) pull; a reference by digest is not: the engine
        answers it from its store ("Image is up to date") without asking the registry, which
        would hand a fork any image the engine holds. So each is looked up in its registry,
        with no credentials, before the build; refused: a PullError, as the build would."""
        text = await asyncio.to_thread(read_dockerfile, job.dockerfile)
        refs = await asyncio.to_thread(image_references, text or "", job.build_args)
        if text is None or refs is None:
            raise BuildError("build", "an untrusted build (a fork's pull request) must name its base images "
                                      "literally or through ARGs with values, so that imagebot can check "
                                      "that they are public")
        for ref in (r for r in refs if "@" in r):
            error = await self._anonymous_lookup(ref)
            if error is not None:
                kind = classify(error)
                raise PullError(kind if kind != "unknown" else "auth",
                                f"{ref} is not public (an untrusted build pulls anonymously): {error}")

    async def _anonymous_lookup(self, ref: str) -> str | None:
        """Why the registry refuses ``ref`` to anyone without credentials, or None."""
        engine = _engine(timeout=max(1, int(self.pull_timeout)))
        try:
            async with asyncio.timeout(self.pull_timeout):
                await asyncio.to_thread(engine.inspect_distribution, ref, auth_config={})
        except APIError as exc:
            return str(exc.explanation or exc)
        except (TimeoutError, requests.exceptions.Timeout):
            raise BuildError("timeout", f"looking up the base image {ref} did not finish in "
                                        f"{self.pull_timeout:.0f}s (IMAGEBOT_PULL_TIMEOUT_SECONDS)") from None
        except (DockerException, requests.exceptions.RequestException) as exc:
            return str(exc)
        finally:
            engine.close()
        return None

    async def _pull_pinned(self, ref: str, repository: str, tag: str, platform: str,
                           auth: dict[str, dict[str, str]]) -> str | None:
        """The local image id of ``repository:tag`` for ``platform`` after pulling it by
        digest, or None; BuildError ``timeout`` past PULL_TIMEOUT_SECONDS."""
        engine = _engine(timeout=max(1, int(self.pull_timeout)))
        try:
            async with asyncio.timeout(self.pull_timeout):
                return await asyncio.to_thread(_pull_for_platform, engine, repository, tag, platform,
                                               auth.get(docker_auth.resolve_repository_name(repository)[0], {}))
        except (TimeoutError, requests.exceptions.Timeout):
            raise BuildError("timeout", f"pulling the base image {ref} did not finish in "
                                        f"{self.pull_timeout:.0f}s (IMAGEBOT_PULL_TIMEOUT_SECONDS)") from None
        finally:
            engine.close()

    async def _check_platform(self, engine: _Engine, image_id: str, platform: str) -> None:
        """The image must be for the platform asked for, whatever base the engine picked."""
        config = await asyncio.to_thread(engine.inspect_image, image_id)
        wanted_os, wanted_arch, wanted_variant = platform_parts(platform)
        got = (config.get("Os"), config.get("Architecture"))
        variant_ok = wanted_variant is None or config.get("Variant") in (None, "", wanted_variant)
        if got != (wanted_os, wanted_arch) or not variant_ok:
            raise BuildError("build", f"the image was built on a base that does not match the specified "
                                      f"platform: wanted {platform}, actual: {'/'.join(filter(None, got))}")

    async def tag(self, image_id: str, target: str) -> None:
        """Tag ``image_id`` as ``target`` (``repository:tag``)."""
        repository, _, tag = target.rpartition(":")
        engine = _engine()
        try:
            await asyncio.to_thread(engine.tag, image_id, repository, tag, force=True)
        except DockerException as exc:
            raise RegistryError.of(str(exc)) from None
        finally:
            engine.close()

    async def image_record(self, image_id: str) -> str | None:
        """The image's config (``docker inspect``) and history, as JSON text: the classic
        builder writes the build args a ``RUN`` used into the history."""
        engine = _engine()
        try:
            config = await asyncio.to_thread(engine.inspect_image, image_id)
            history = await asyncio.to_thread(engine.history, image_id)
        except DockerException as exc:
            raise BuildError("engine", f"the Docker engine could not show the built image: {exc}") from None
        finally:
            engine.close()
        return json.dumps([config, history])

    async def release(self, target: str) -> None:
        """Nothing to free: the engine keeps its images (they are the next build's cache)."""

    async def close(self) -> None:
        """Nothing held between builds (an engine client is made per call)."""

    async def push(self, target: str, credentials: Credentials | None, log: LogSink) -> Pushed:
        """Push ``target``; raises a classified :class:`RegistryError` on any failure."""
        repository, _, tag = target.rpartition(":")
        engine = _engine()
        secrets = (credentials.password.get_secret_value(),) if credentials else ()
        result: dict[str, Any] = {}
        error: Any = None

        async def handle(items: list[dict]) -> None:
            nonlocal error
            for item in items:
                if "error" in item or "errorDetail" in item:
                    error = (item.get("errorDetail") or {}).get("message") or item.get("error")
                aux = item.get("aux")
                if isinstance(aux, dict) and aux.get("Digest"):
                    result.update(aux)
            await log(_lines(items))

        def start() -> Iterator[dict]:
            return engine.push(repository, tag=tag, stream=True, decode=True,
                               auth_config=credentials.auth_config() if credentials else {})

        try:
            await _stream(engine, start, handle)
        except APIError as exc:
            raise RegistryError.of(exc.explanation or str(exc), exc.status_code if exc.status_code != 500 else None,
                                   secrets=secrets) from None
        except (DockerException, OSError) as exc:
            raise RegistryError.of(f"{type(exc).__name__}: {exc}", secrets=secrets) from None
        finally:
            engine.close()
        if error is not None:
            raise RegistryError.of(error, secrets=secrets)
        if "Digest" not in result:
            raise RegistryError("unknown", "the push ended without a digest")
        return Pushed(result["Digest"], int(result.get("Size") or 0))
