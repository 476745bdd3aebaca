"""The Docker runtime: build one platform's image through the engine, tag it, push it.

Nothing else lives here (names, retries, classification, credentials, manifests and telemetry
are the pipeline's, shared with other runtimes). The Docker SDK is synchronous, so each stream
(build, push) is read on a thread and handed to the event loop; cancelling the awaiting task
closes the engine connection, which makes the engine abandon the build or push.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import docker
from docker import auth as docker_auth
from docker.errors import APIError, DockerException

from bot.pipeline.credentials import Credentials
from bot.pipeline.push import RegistryError
from bot.pipeline.tags import platform_parts
from bot.runtimes import BuildError, BuildJob, LogSink, PullError, Pushed, last_step, pull_failure

__all__ = ["BuildError", "BuildJob", "DockerRuntime", "PullError", "Pushed"]

class _Engine(docker.APIClient):
    """An engine client that sends exactly the registry credentials it was given.

    docker-py otherwise falls back to ~/.docker/config.json whenever it has none in memory,
    which would hand the bot's own credentials to builds that must not have any.
    """

    def __init__(self, registry_auth: dict[str, Credentials] | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._registry_auth = {
            host: {"username": c.username, "password": c.password.get_secret_value(), "serveraddress": host}
            for host, c in (registry_auth or {}).items()
        }

        self._streams: list[Any] = []

    def _set_auth_headers(self, headers: dict[str, str]) -> None:
        if self._registry_auth:
            headers["X-Registry-Config"] = docker_auth.encode_header(self._registry_auth)

    def _post(self, url: str, **kwargs: Any) -> Any:
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


def _engine(registry_auth: dict[str, Credentials] | None = None, timeout: int = 3600) -> _Engine:
    kwargs = docker.utils.kwargs_from_env()
    kwargs.setdefault("version", "auto")
    return _Engine(registry_auth, timeout=timeout, **kwargs)


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


def _lines(items: list[dict]) -> list[str]:
    lines = []
    for item in items:
        text = item.get("stream") or item.get("status") or ""
        if item.get("status") and item.get("progress"):
            continue  # progress bars: one line per chunk is noise, not a log
        lines += [line.rstrip() for line in str(text).splitlines() if line.strip()]
    return lines


PLATFORM_MIXUP_ATTEMPTS = 3
_FROM_LINE = re.compile(r"^\s*FROM\s+(?:--platform=\S+\s+)?(?P<ref>\S+)(?:\s+AS\s+(?P<stage>\S+))?", re.I | re.M)


def dockerfile_bases(text: str) -> list[str]:
    """The images a Dockerfile's FROM lines pull: not ``scratch``, not earlier stages, and not
    references built from ARGs (those cannot be known before the build)."""
    stages: set[str] = set()
    bases: list[str] = []
    for match in _FROM_LINE.finditer(text):
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
    return job.masked + tuple(c.password.get_secret_value() for c in (job.pull_credentials or {}).values())


def platform_mixup(message: str) -> bool:
    """The engine's error when a shared base image tag moved to another platform mid-build."""
    return "does not match the specified platform" in message


class FromWatch:
    """Watches a classic build's log for its first ``FROM`` step being resolved (the
    `` ---> <id>`` line that follows ``Step 1/N : FROM ...``)."""

    def __init__(self) -> None:
        self.resolved = asyncio.Event()
        self._in_from = False

    def feed(self, lines: list[str]) -> None:
        for line in lines:
            if _FIRST_FROM.match(line):
                self._in_from = True
            elif self._in_from and line.startswith(" ---> "):
                self.resolved.set()


_FIRST_FROM = re.compile(r"^Step 1/\d+ : FROM ", re.IGNORECASE)


class DockerRuntime:
    name = "docker"

    def __init__(self, timeout: int = 3600) -> None:
        self.timeout = timeout
        self._from_lock = asyncio.Lock()

    async def build(self, job: BuildJob, log: LogSink) -> str:
        """Build ``job`` for its platform; return the image id. Raises :class:`BuildError`, or
        :class:`PullError` when the registry refused (or could not serve) a base image.

        The classic builder resolves ``FROM name:tag`` through the engine's one local tag, so
        two platforms of one build pulling the same base at once can find each other's image
        ("... does not match the specified platform"); such a build is simply run again.
        """
        for attempt in range(1, PLATFORM_MIXUP_ATTEMPTS + 1):
            try:
                return await self._build_once(job, log)
            except BuildError as exc:
                if not platform_mixup(exc.message) or attempt == PLATFORM_MIXUP_ATTEMPTS:
                    raise
                await log([f"imagebot: the engine mixed up the base image's platforms; building again ({attempt})"])
        raise AssertionError("unreachable")

    async def _build_once(self, job: BuildJob, log: LogSink) -> str:
        engine = _engine(job.pull_credentials, self.timeout)
        image_id: str | None = None
        error: str | None = None
        step: str | None = None  # the step the build is at, as its log says
        first_from = FromWatch()

        async def handle(items: list[dict]) -> None:
            nonlocal image_id, error, step
            for item in items:
                if "error" in item or "errorDetail" in item:
                    detail = item.get("errorDetail") or {}
                    error = str(detail.get("message") or item.get("error") or "build failed")
                aux = item.get("aux")
                if isinstance(aux, dict) and aux.get("ID"):
                    image_id = aux["ID"]
            lines = _lines(items)
            first_from.feed(lines)
            step = last_step(lines, step)
            await log(lines)

        pinned = False

        def start() -> Iterator[dict]:
            return engine.build(
                path=str(job.context), dockerfile=str(job.dockerfile), tag=job.tag,
                platform=job.platform, pull=not pinned, rm=True, forcerm=True, decode=True,
                buildargs=job.build_args, labels=job.labels, target=job.target,
            )

        async def pin() -> None:
            nonlocal pinned
            pinned = await self._pin_bases(engine, job, log)

        try:
            await self._staggered(_stream(engine, start, handle), first_from.resolved, pin)
            if error is None and image_id is not None:
                await self._check_platform(engine, image_id, job.platform)
        except APIError as exc:
            raise BuildError("build", str(exc.explanation or exc)) from None
        except DockerException as exc:
            raise BuildError("engine", f"the Docker engine is unreachable: {exc}") from None
        finally:
            engine.close()
        if error is not None:
            await log([f"ERROR: {error}"])
            raise pull_failure(step, error, _secrets(job)) or BuildError("build", error)
        if image_id is None:
            raise BuildError("build", "the engine finished the build without an image id")
        return image_id

    async def _staggered(self, stream: Awaitable[None], resolved: asyncio.Event,
                         pin: Callable[[], Awaitable[None]]) -> None:
        """Pin the base images to this platform, start the build, and hold the runtime's FROM
        lock until its first FROM is resolved: no other platform moves the base tags between
        the pin and the moment the engine reads them."""
        task: asyncio.Future | None = None
        try:
            async with self._from_lock:
                await pin()
                task = asyncio.ensure_future(stream)
                waiter = asyncio.ensure_future(resolved.wait())
                try:
                    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    waiter.cancel()
            await task
        finally:
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
            elif task is None and asyncio.iscoroutine(stream):
                stream.close()

    async def _pin_bases(self, engine: _Engine, job: BuildJob, log: LogSink) -> bool:
        """Point each base image's tag at its image for ``job.platform``.

        The engine keeps one local tag per name; pulling a platform whose image is already
        present leaves the tag where another platform's pull put it, and the classic builder
        then resolves FROM to the wrong platform. Returns whether every base was pinned (then
        the build need not pull again).
        """
        try:
            text = job.dockerfile.read_text(errors="replace")
        except OSError:
            return False
        if re.search(r"^\s*FROM\s+(--platform=\S+\s+)?\S*\$", text, re.I | re.M):
            return False  # a base named by an ARG: only the build knows it
        wanted = platform_parts(job.platform)
        pinned = True
        for ref in dockerfile_bases(text):
            repository, tag = _split_ref(ref)
            if tag is None:
                continue  # pinned by digest already
            digest = await asyncio.to_thread(self._pull, engine, repository, tag, job.platform)
            image_id = (await asyncio.to_thread(self._local_image, engine, repository, digest, wanted)
                        if digest else None)
            if image_id is None:
                pinned = False  # the build's own pull will report the problem
                if digest:
                    await log([f"imagebot: no local {job.platform} image of {ref} after pulling it"])
                continue
            await asyncio.to_thread(engine.tag, image_id, repository, tag, force=True)
        return pinned

    @staticmethod
    def _pull(engine: _Engine, repository: str, tag: str, platform: str) -> str | None:
        """Pull ``repository:tag`` for ``platform``; the digest the registry named, or None."""
        digest = None
        try:
            for item in engine.pull(repository, tag=tag, platform=platform, stream=True, decode=True):
                if "error" in item:
                    return None
                status = str(item.get("status", ""))
                if status.startswith("Digest: "):
                    digest = status.removeprefix("Digest: ").strip()
        except DockerException:
            return None
        return digest

    @staticmethod
    def _local_image(engine: _Engine, repository: str, digest: str, wanted: tuple) -> str | None:
        os_, arch, variant = wanted
        for summary in engine.images(name=repository):
            if f"{repository}@{digest}" not in (summary.get("RepoDigests") or []):
                continue
            config = engine.inspect_image(summary["Id"])
            if (config.get("Os"), config.get("Architecture")) == (os_, arch) and (
                variant is None or config.get("Variant") in (None, "", variant)
            ):
                return summary["Id"]
        return None

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
