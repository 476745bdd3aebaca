"""Runtimes: where one platform's image is built and pushed.

This is the pipeline's one seam. A runtime does exactly three things for one platform: build
the context into an image (:meth:`Runtime.build`), give it its platform tag (:meth:`Runtime.tag`)
and push that tag once (:meth:`Runtime.push`, one attempt; a failure is a classified
:class:`bot.pipeline.push.RegistryError`). Everything around them — fetching, the repository's
config, names and tags, retries and their policy, credential refreshes, the manifest list,
telemetry, reports, cancellation — is the pipeline's (bot.pipeline.run), the same for every
runtime.

- ``docker`` (bot.runtimes.docker): the bot's Docker engine, through the Docker SDK.
- ``kubernetes`` (bot.runtimes.kubernetes): one batch/v1 Job per platform, its pod fetching
  the commit, building with buildah and pushing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydantic import SecretStr

from bot.pipeline import StepError

if TYPE_CHECKING:
    from bot.pipeline.credentials import Credentials
    from bot.settings import Settings

LogSink = Callable[[list[str]], Awaitable[None]]


class BuildError(StepError):
    """A platform's image could not be built; ``kind`` is build (the Dockerfile), engine
    (the Docker engine), runtime (the cluster) or unschedulable (no node can run it)."""


@dataclass(frozen=True)
class Source:
    """Where the commit came from, for runtimes that fetch it themselves (Kubernetes)."""

    root: Path  # the bot's own checkout: context and dockerfile are inside it
    clone_url: str
    sha: str
    ref: str
    token: SecretStr | None
    username: str


@dataclass(frozen=True)
class BuildJob:
    context: Path
    dockerfile: Path
    platform: str
    tag: str | None
    build_args: dict[str, str]
    labels: dict[str, str]
    target: str | None = None
    #: Credentials the engine may use to pull base images (none for untrusted builds).
    pull_credentials: dict[str, Credentials] | None = None
    #: The platform tag the image will be pushed under (a runtime may build straight into it).
    image: str | None = None
    source: Source | None = None
    build_id: int | None = None
    #: Whether a push follows the build (untrusted builds never push).
    push: bool = False
    #: Build-arg values to keep out of every spec, argv and log.
    secrets: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pushed:
    digest: str
    size: int


class Runtime(Protocol):
    async def build(self, job: BuildJob, log: LogSink) -> str:
        """Build ``job``; the image's id (or the image reference, where no id exists)."""

    async def tag(self, image_id: str, target: str) -> None:
        """Name the built image ``target`` (its platform tag)."""

    async def push(self, target: str, credentials: Credentials | None, log: LogSink) -> Pushed:
        """One push attempt of ``target``; raises a classified RegistryError."""

    async def release(self, target: str) -> None:
        """The platform is over (pushed, failed, or cancelled): free what it held."""

    async def close(self) -> None:
        """The runtime is no longer needed (its clients are closed)."""


def runtime_for(settings: Settings) -> Runtime:
    """The runtime ``IMAGEBOT_RUNTIME`` names."""
    if settings.runtime == "kubernetes":
        from bot.runtimes.kubernetes import KubernetesRuntime

        return KubernetesRuntime(settings)
    from bot.runtimes.docker import DockerRuntime

    return DockerRuntime(int(settings.build_timeout_seconds))
