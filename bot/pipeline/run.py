"""One build, end to end: fetch → config → per platform (build → tag → push) → manifest list.

Every step emits its telemetry event; the runtime (Docker here) only builds, tags and pushes
one platform's image. What a build may do is decided up front in a :class:`Plan`, a plain
value: an untrusted build (a fork's pull request) never pushes and never gets credentials.
"""

from __future__ import annotations

import asyncio
import platform as host_platform
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import SecretStr

from bot.models import Build, BuildKind, BuildStatus, utcnow
from bot.pipeline import tags
from bot.pipeline.config import ConfigError, RepoConfig, load_config, resolve_paths
from bot.pipeline.credentials import Credentials, CredentialsError, RegistryCredentials
from bot.pipeline.fetch import TOKEN_USERS, Checkout, FetchError, fetch, masker
from bot.pipeline.manifest import Descriptor, RegistryClient, manifest_list
from bot.pipeline.push import Exhausted, RegistryError, Retry, RetryPolicy, pull_failure_kind, with_retries
from bot.reporters.errors import ReportError
from bot.reporters.github import GitHubClient
from bot.runtimes import BuildError, BuildJob, Runtime, Source, runtime_for
from bot.settings import Settings
from bot.telemetry import Telemetry
from bot.worker import BuildOutcome

_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}


def build_platform() -> str:
    """The platform builds run on (BuildKit's BUILDPLATFORM)."""
    return f"linux/{_ARCH.get(host_platform.machine().lower(), host_platform.machine().lower())}"


@dataclass(frozen=True)
class Plan:
    """What one build will do, decided before any work starts."""

    image: str | None  # None: nowhere to push (build only)
    user_tags: list[str]
    platforms: list[str]
    push: bool
    skip_reason: str | None  # why it will not push
    build_args: dict[str, str]
    labels: dict[str, str]
    target: str | None
    allow_partial: bool
    #: Trusted builds may use the bot's registry credentials (to pull private base images
    #: too); an untrusted one (a fork's pull request) never gets them.
    trusted: bool = True
    secrets: tuple[str, ...] = ()


@dataclass
class PlatformResult:
    platform: str
    ok: bool
    step: str | None = None
    kind: str | None = None
    message: str | None = None
    descriptor: Descriptor | None = None


def source_url(clone_url: str) -> str:
    return clone_url.removesuffix(".git")


def make_plan(build: Build, config: RepoConfig, settings: Settings, no_push: bool = False) -> Plan:
    """Names, tags, platforms and permissions of ``build`` (pure; raises TagError)."""
    platforms = [tags.normalize_platform(p) for p in (config.platforms or build.platforms)]
    reasons = ["--no-push was given"] if no_push else []
    if build.fork:
        reasons.append("a pull request from a fork is built but never pushed")
    if not config.pushes(build.kind):
        reasons.append(f"push is off for {BuildKind(build.kind).value} builds in .imagebot.yml")
    image = None
    if settings.registry or config.image:
        image = tags.image_name(settings.registry, build.repo, config.image)
    elif not reasons:
        reasons.append("no registry is configured (IMAGEBOT_REGISTRY)")
    labels = {
        **config.labels,
        "org.opencontainers.image.source": source_url(build.clone_url),
        "org.opencontainers.image.revision": build.sha,
        "org.opencontainers.image.created": utcnow().isoformat().replace("+00:00", "Z"),
    }
    return Plan(
        image=image,
        user_tags=tags.user_tags(build.kind, build.ref, build.sha, build.pr_number,
                                 build.default_branch, config.tags),
        platforms=platforms,
        push=not reasons and image is not None,
        skip_reason="; ".join(reasons) or None,
        build_args=dict(config.build_args),
        labels=labels,
        target=config.target,
        allow_partial=config.allow_partial,
        trusted=not build.fork,
        secrets=tuple(config.build_args[name] for name in config.secret_build_args),
    )


class Pipeline:
    def __init__(self, settings: Settings, telemetry: Telemetry, runtime: Runtime | None = None,
                 forge_tokens: dict[str, str] | None = None, no_push: bool = False,
                 github: GitHubClient | None = None) -> None:
        self.settings = settings
        self.github = github
        self.no_push = no_push
        self.telemetry = telemetry
        self.runtime = runtime or runtime_for(settings)
        self.policy = RetryPolicy(settings.push_retries, settings.retry_initial_seconds,
                                  settings.retry_max_seconds)
        self.forge_tokens = forge_tokens

    async def aclose(self) -> None:
        """Close the runtime's and GitHub's clients (the worker is done with this pipeline)."""
        await self.runtime.close()
        if self.github is not None:
            await self.github.aclose()

    # -- the whole build ------------------------------------------------------------------------

    async def __call__(self, build: Build) -> BuildOutcome:
        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix=f"imagebot-{build.id}-", dir=self.settings.work_dir) as work:
            try:
                token = await self._forge_token(build)
                checkout = await self._fetch(build, Path(work) / "src", token)
            except FetchError as exc:
                await self.emit(build, "fetch_failed", kind=exc.kind, message=exc.message)
                return _failed("fetch", exc.kind, exc.message)
            try:
                config = load_config(checkout.path)
                dockerfile, context = resolve_paths(checkout.path, config)
                plan = make_plan(build, config, self.settings, self.no_push)
            except (ConfigError, tags.TagError) as exc:
                await self.log(build, None, [f"ERROR: {exc}"])
                return _failed("config", "config", str(exc))
            source = Source(checkout.path, build.clone_url, checkout.sha, build.ref, token,
                            TOKEN_USERS.get(build.provider, "x-access-token"))
            results = await self._platforms(build, plan, context, dockerfile, source)
        return await self._conclude(build, plan, results, started)

    async def _fetch(self, build: Build, dest: Path, token: SecretStr | None) -> Checkout:
        username = TOKEN_USERS.get(build.provider, "x-access-token")
        checkout = await fetch(
            build.clone_url, build.sha, build.ref, dest, token=token, username=username,
            timeout=self.settings.fetch_timeout_seconds,
            log=lambda lines: self.log(build, None, lines),
        )
        await self.emit(build, "fetch_succeeded", duration_s=checkout.duration_s, sha=checkout.sha,
                        method=checkout.method)
        return checkout

    async def _forge_token(self, build: Build) -> SecretStr | None:
        """The token git fetches with: the forge's token, or in GitHub App mode the build's
        installation token (the same cached one the reporters use)."""
        if self.forge_tokens is not None:
            token = self.forge_tokens.get(build.provider)
            return SecretStr(token) if token else None
        if build.provider == "gitlab":
            return self.settings.gitlab_api_token
        if self.settings.github_app_id is None or build.installation_id is None:
            return self.settings.github_token
        if self.github is None:
            self.github = GitHubClient(self.settings)
        try:
            return SecretStr(await self.github.token(build.installation_id))
        except ReportError as exc:
            raise FetchError(exc.kind if exc.kind in ("auth", "network") else "failed",
                             f"no GitHub App installation token for the fetch: {exc}") from None

    async def _platforms(self, build: Build, plan: Plan, context: Path, dockerfile: Path,
                         source: Source) -> list[PlatformResult]:
        credentials = None
        if plan.trusted and plan.image:
            credentials = RegistryCredentials(tags.split_image(plan.image)[0], self.settings)
        gate = asyncio.Semaphore(self.settings.platform_parallelism)

        async def one(platform: str) -> PlatformResult:
            async with gate:
                return await self._platform(build, plan, platform, context, dockerfile, source, credentials)

        # Emulated platforms are the long pole: start them first, report in the plan's order.
        native = build_platform()
        order = sorted(plan.platforms, key=lambda p: p == native)
        tasks = {p: asyncio.ensure_future(one(p)) for p in order}
        try:
            await asyncio.gather(*tasks.values())
        except BaseException:
            # Stop the other platforms (once: a cancelled gather has cancelled them already, and
            # a second cancel would cut short the release of what they hold, e.g. their Jobs),
            # then wait until each has let go.
            for task in tasks.values():
                if not task.done() and not task.cancelling():
                    task.cancel()
            await asyncio.wait(tasks.values())
            raise
        return [tasks[p].result() for p in plan.platforms]

    async def _conclude(self, build: Build, plan: Plan, results: list[PlatformResult], started: float) -> BuildOutcome:
        good = [r for r in results if r.ok]
        bad = [r for r in results if not r.ok]
        if bad and not (plan.allow_partial and good):
            first = bad[0]
            names = ", ".join(r.platform for r in bad)
            return _failed(first.step or "build", first.kind or "unknown",
                           f"{names}: {first.message}" if len(bad) > 1 else f"{first.platform}: {first.message}")
        partial = bool(bad)
        if plan.push:
            error = await self._publish(build, plan, [r.descriptor for r in good if r.descriptor], partial)
            if error is not None:
                return error
        return BuildOutcome(BuildStatus.succeeded, platforms=tuple(r.platform for r in good), partial=partial)

    # -- one platform ---------------------------------------------------------------------------

    async def _platform(self, build: Build, plan: Plan, platform: str, context: Path, dockerfile: Path,
                        source: Source, credentials: RegistryCredentials | None) -> PlatformResult:
        target = f"{plan.image or 'imagebot.invalid/' + build.repo.lower()}:{tags.platform_tag(build.sha, platform)}"
        await self.emit(build, "build_platform_started", platform, image=target)
        started = time.monotonic()
        job = BuildJob(
            context=context, dockerfile=dockerfile, platform=platform, tag=None,
            build_args={**plan.build_args, **tags.buildkit_args(platform, build_platform())},
            labels=plan.labels, target=plan.target, pull_credentials=None,
            image=target, source=source, build_id=build.id, push=plan.push, masked=plan.secrets,
            trusted=plan.trusted,
        )
        try:
            return await self._build_and_push(build, plan, job, target, credentials, started)
        finally:
            await asyncio.shield(self.runtime.release(target))

    async def _build_and_push(self, build: Build, plan: Plan, job: BuildJob, target: str,
                              credentials: RegistryCredentials | None, started: float) -> PlatformResult:
        platform = job.platform
        try:
            image_id = await self._build(build, plan, job, credentials)
        except BuildError as exc:
            await self.emit(build, "build_platform_failed", platform, kind=exc.kind, message=exc.message,
                            duration_s=_since(started))
            return PlatformResult(platform, False, "build", exc.kind, exc.message)
        await self.emit(build, "build_platform_succeeded", platform, image_id=image_id, duration_s=_since(started))
        if not plan.push:
            await self.emit(build, "push_skipped", platform, reason=plan.skip_reason or "not pushed")
            return PlatformResult(platform, True)
        return await self._tag_and_push(build, plan, platform, image_id, target, credentials)

    async def _build(self, build: Build, plan: Plan, job: BuildJob, credentials: RegistryCredentials | None) -> str:
        """Build one platform; the image id. Raises BuildError.

        Pulling a base image from an authenticated registry is a registry call like a push,
        and fails the same ways: a refused pull (credentials rotated since the build got them)
        refreshes the credentials once and builds again with the new ones, a network fault is
        retried under the push's policy, a denial (or credentials that are still refused after
        the refresh) fails at once with kind ``auth`` and the registry's words.
        """
        platform = job.platform
        generation = 0

        async def attempt() -> str:
            nonlocal generation
            pull = await self._pull_credentials(credentials)
            generation = credentials.generation if credentials else 0
            return await self.runtime.build(replace(job, pull_credentials=pull),
                                            lambda lines: self.log(build, platform, lines, plan.secrets))

        async def on_retry(retry: Retry) -> None:
            await self.emit(build, "build_platform_retry", platform, attempt=retry.attempt, delay_s=retry.delay_s,
                            kind=retry.kind, refreshed=retry.refreshed, detail=retry.detail)

        async def refresh() -> bool:
            # building again with the very credentials the registry just refused is pointless
            return await self._refresh(build, platform, credentials, generation, require_change=True)

        try:
            return (await with_retries(attempt, self.policy, refresh=refresh, on_retry=on_retry)).value
        except Exhausted as exc:
            tries = f" ({exc.attempts} attempts)" if exc.attempts > 1 else ""
            raise BuildError(pull_failure_kind(exc.error.kind),
                             f"pulling a base image failed{tries}: {exc.error.detail}") from None

    async def _pull_credentials(self, credentials: RegistryCredentials | None) -> dict[str, Credentials] | None:
        """The registry credentials a build may pull its base images with, as they are now."""
        current = await self._quiet_get(credentials) if credentials else None
        return {credentials.registry: current} if credentials and current else None

    async def _tag_and_push(self, build: Build, plan: Plan, platform: str, image_id: str, target: str,
                            credentials: RegistryCredentials | None) -> PlatformResult:
        await self.emit(build, "tag_started", platform, image_id=image_id, tag=target)
        try:
            await self.runtime.tag(image_id, target)
        except RegistryError as exc:
            await self.emit(build, "tag_failed", platform, tag=target, kind=exc.kind, message=exc.detail)
            return PlatformResult(platform, False, "tag", exc.kind, exc.detail)
        await self.emit(build, "tag_succeeded", platform, tag=target)
        return await self._push(build, plan, platform, target, credentials)

    async def _push(self, build: Build, plan: Plan, platform: str, target: str,
                    credentials: RegistryCredentials | None) -> PlatformResult:
        await self.emit(build, "push_started", platform, tag=target)
        started = time.monotonic()
        generation = 0

        async def attempt():
            nonlocal generation
            creds = await credentials.get() if credentials else None
            generation = credentials.generation if credentials else 0
            try:
                return await asyncio.wait_for(
                    self.runtime.push(target, creds, lambda lines: self.log(build, platform, lines)),
                    self.settings.push_timeout_seconds,
                )
            except TimeoutError:
                raise RegistryError(
                    "network", f"the push did not finish in {self.settings.push_timeout_seconds:.0f}s"
                ) from None

        async def on_retry(retry: Retry) -> None:
            await self.emit(build, "push_retry", platform, tag=target, attempt=retry.attempt,
                            delay_s=retry.delay_s, kind=retry.kind, refreshed=retry.refreshed,
                            detail=retry.detail)

        try:
            result = await with_retries(
                attempt, self.policy,
                refresh=lambda: self._refresh(build, platform, credentials, generation),
                on_retry=on_retry,
            )
        except Exhausted as exc:
            await self.emit(build, "push_failed", platform, tag=target, kind=exc.error.kind,
                            attempts=exc.attempts, retries=exc.attempts - 1, detail=exc.error.detail)
            return PlatformResult(platform, False, "push", exc.error.kind, exc.error.detail)
        pushed = result.value
        await self.emit(build, "push_succeeded", platform, tag=target, digest=pushed.digest, size=pushed.size,
                        duration_s=_since(started), attempts=result.attempts, retries=result.retries)
        return PlatformResult(platform, True, descriptor=Descriptor(platform, pushed.digest, pushed.size, ""))

    async def _quiet_get(self, credentials: RegistryCredentials) -> Credentials | None:
        try:
            return await credentials.get()
        except CredentialsError:
            return None  # the push will fail with kind auth and say why

    async def _refresh(self, build: Build, platform: str | None, credentials: RegistryCredentials | None,
                       generation: int, require_change: bool = False) -> bool:
        """Read the credentials again; whether the failed call is worth another attempt
        (with ``require_change``: only if the source answered different credentials)."""
        if credentials is None:
            return False
        try:
            _, changed = await credentials.refresh(generation)
        except CredentialsError as exc:
            await self.emit(build, "auth_refresh_failed", platform, registry=credentials.registry,
                            source=credentials.source, kind="auth", message=str(exc))
            return False
        await self.emit(build, "auth_refresh_succeeded", platform, registry=credentials.registry,
                        source=credentials.source, changed=changed)
        return changed or not require_change

    # -- the manifest list ----------------------------------------------------------------------

    async def _publish(self, build: Build, plan: Plan, pushed: list[Descriptor], partial: bool) -> BuildOutcome | None:
        assert plan.image is not None
        host, repository = tags.split_image(plan.image)
        platforms = [d.platform for d in pushed]
        fmt = self.settings.manifest_format
        credentials = RegistryCredentials(host, self.settings)
        client = RegistryClient(host, credentials if credentials.configured else None)
        body_type = manifest_list([], fmt)[1]
        await self.emit(build, "manifest_started", tags=plan.user_tags, platforms=platforms, media_type=body_type)

        async def attempt() -> str:
            described = [await client.describe(repository, d.digest, d.platform) for d in pushed]
            body, media_type = manifest_list(described, fmt)
            digest = ""
            for tag in plan.user_tags:
                digest = await client.put_list(repository, tag, body, media_type)
            return digest

        async def on_retry(retry: Retry) -> None:
            await self.emit(build, "manifest_retry", attempt=retry.attempt, delay_s=retry.delay_s,
                            kind=retry.kind, refreshed=retry.refreshed, detail=retry.detail)

        try:
            result = await with_retries(attempt, self.policy, on_retry=on_retry,
                                        refresh=lambda: self._refresh(build, None, credentials, credentials.generation))
        except Exhausted as exc:
            await self.emit(build, "manifest_failed", kind=exc.error.kind, message=exc.error.detail,
                            attempts=exc.attempts)
            return _failed("manifest", exc.error.kind, exc.error.detail)
        finally:
            await client.aclose()
        await self.emit(build, "manifest_published", digest=result.value, tags=plan.user_tags,
                        platforms=platforms, media_type=body_type, partial=partial)
        return None

    # -- telemetry ------------------------------------------------------------------------------

    async def emit(self, build: Build, name: str, platform: str | None = None, **data) -> None:
        await self.telemetry.emit(build.id, name, platform, **data)

    async def log(self, build: Build, platform: str | None, lines: list[str], secrets: tuple[str, ...] = ()) -> None:
        if secrets:
            lines = [_mask(line, secrets) for line in lines]
        await self.telemetry.log_lines(build.id, platform, lines)


def _mask(line: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        if secret:
            line = line.replace(secret, "***")
    return line


def _since(started: float) -> float:
    return round(time.monotonic() - started, 3)


def _failed(step: str, kind: str, message: str) -> BuildOutcome:
    return BuildOutcome(BuildStatus.failed, error_kind=kind, error_message=message[:2000], step=step)


def runner_for(settings: Settings, telemetry: Telemetry):
    """What the worker runs for each build: the pipeline, or (tests of the queue only) a
    placeholder that takes ``IMAGEBOT_PLACEHOLDER_BUILD_SECONDS`` and succeeds."""
    if settings.placeholder_build_seconds > 0:
        from bot.worker import placeholder_runner

        return placeholder_runner(settings)
    return Pipeline(settings, telemetry)


__all__ = ["Pipeline", "Plan", "make_plan", "masker", "runner_for"]
