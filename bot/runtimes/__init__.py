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

A build that fails while pulling a base image (the registry refused the credentials, denied
the image, or could not be reached) raises :class:`PullError`, a classified registry failure
like a push's, so the pipeline can refresh the credentials and build again under the same
policy as a push; any other failure of the build is a :class:`BuildError`.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from pydantic import SecretStr

from bot.pipeline import StepError
from bot.pipeline.push import RegistryError, classify, sanitize

if TYPE_CHECKING:
    from bot.pipeline.credentials import Credentials
    from bot.settings import Settings

LogSink = Callable[[list[str]], Awaitable[None]]


class BuildError(StepError):
    """A platform's image could not be built; ``kind`` is build (the Dockerfile), engine
    (the Docker engine), runtime (the cluster) or unschedulable (no node can run it)."""


class PullError(RegistryError):
    """A base image of the build could not be pulled; ``kind`` is the registry failure's
    (bot.pipeline.push.classify), never ``unknown``: the pipeline treats it as it treats a
    failed push (refresh on ``auth``, retry ``network``/``registry``, give up otherwise)."""


# A build's step lines, as the engines print them before running the step: the Docker
# engine's classic builder "Step 2/5 : FROM x", buildah "STEP 2/5: FROM x" or, in a
# multi-stage build, "[2/2] STEP 1/3: FROM x".
_STEP = re.compile(r"^(?:\[\d+/\d+\] )?step \d+/\d+ ?: ?(?P<instruction>[a-z]+)\b(?P<rest>.*)$", re.I)
_FROM_REF = re.compile(r"^\s*(?:--platform=\S+\s+)?(?P<ref>[^\s$]+)")
#: A command of the build failed (a base image's ONBUILD trigger runs in its FROM step too).
_COMMAND_FAILED = ("returned a non-zero code", "building at step")


def is_step(line: str) -> bool:
    """Whether ``line`` is a step line (an engine announcing the instruction it runs next)."""
    return _STEP.match(line.strip()) is not None


def last_step(lines: Iterable[str], previous: str | None = None) -> str | None:
    """The last step line among ``lines`` (``previous`` where they name none): the step a
    build was running when it failed."""
    for line in lines:
        if _STEP.match(line.strip()):
            previous = line.strip()
    return previous


def pull_failure(step: str | None, error: str, secrets: tuple[str, ...] = ()) -> PullError | None:
    """The registry's refusal of a base image, if that is what failed a build (pure).

    It is one when the failing step was a ``FROM`` (both engines pull the base there) and the
    error reads as a registry failure. Anything else failing a FROM step (an invalid reference,
    the engine mixing up platforms, a base image's ONBUILD command) stays a build failure. The
    base's own name is left out of what is classified: a repository called ``team/denied-app``
    must not read as a denial.
    """
    match = _STEP.match(step.strip()) if step else None
    if match is None or match["instruction"].upper() != "FROM":
        return None
    text = sanitize(error, secrets)
    if any(words in text.lower() for words in _COMMAND_FAILED):
        return None
    kind = classify(_without_reference(text, match["rest"]))
    return None if kind == "unknown" else PullError(kind, text)


def _without_reference(text: str, from_args: str) -> str:
    """``text`` without the repository a FROM step names (with or without its tag)."""
    ref = _FROM_REF.match(from_args)
    if ref is None:
        return text
    repository = re.split(r"@|:(?=[^/]*$)", ref["ref"])[0]
    return re.sub(re.escape(repository) + r"\S*", " ", text, flags=re.I) if repository else text


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
    #: Not a fork's pull request (bot.pipeline.run.Plan.trusted). An untrusted job always
    #: pulls its bases, anonymously; the default is the safe side.
    trusted: bool = False
    #: The operator's build secrets this build asked for, name -> value (bot.pipeline.secrets);
    #: always empty for untrusted builds (a fork's pull request). Each runtime hands them to
    #: the build its own way (Docker: build args; Kubernetes: buildah ``--secret`` mounts) and
    #: keeps them out of every spec, argv and message.
    secrets: dict[str, str] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Pushed:
    digest: str
    size: int


class Runtime(Protocol):
    #: The runtime cuts a build attempt at its own deadline (Kubernetes: each build run at the
    #: pull and build timeouts, the Job at activeDeadlineSeconds), naming the step it was at;
    #: otherwise the pipeline cuts each attempt at BUILD_TIMEOUT_SECONDS.
    enforces_deadlines: bool

    async def build(self, job: BuildJob, log: LogSink) -> str:
        """Build ``job`` once; the image's id (or the image reference, where no id exists).

        Raises :class:`PullError` when a base image could not be pulled, BuildError otherwise.
        Called again (with fresh ``pull_credentials``) after a PullError, it builds again.
        """

    async def tag(self, image_id: str, target: str) -> None:
        """Name the built image ``target`` (its platform tag)."""

    async def push(self, target: str, credentials: Credentials | None, log: LogSink) -> Pushed:
        """One push attempt of ``target``; raises a classified RegistryError."""

    async def image_record(self, image_id: str) -> str | None:
        """The built image's config and history as text, for the pipeline's check that no
        build secret is in it; None where the runtime cannot show the image before pushing it."""

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

    return DockerRuntime.from_settings(settings)
