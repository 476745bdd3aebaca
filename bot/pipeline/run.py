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
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from pydantic import SecretStr
from sqlalchemy import Connection, select

from bot import masking
from bot.masking import Masker
from bot.models import Build, BuildKind, BuildStatus, builds, utcnow
from bot.pipeline import secrets as build_secrets
from bot.pipeline import tags
from bot.pipeline.config import ConfigError, RepoConfig, load_config, resolve_paths
from bot.pipeline.credentials import Credentials, CredentialsError, RegistryCredentials
from bot.pipeline.fetch import TOKEN_USERS, Checkout, FetchError, fetch
from bot.pipeline.heads import HeadUnknown, ref_head
from bot.pipeline.manifest import Descriptor, RegistryClient, manifest_list
from bot.pipeline.push import Exhausted, RegistryError, Retry, RetryPolicy, pull_failure_kind, with_retries
from bot.reporters.errors import ReportError
from bot.reporters.github import GitHubClient
from bot.runtimes import BuildError, BuildJob, Runtime, Source, runtime_for
from bot.settings import Settings, forge_namespace
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
    #: The operator's build secrets this build asked for (none for untrusted builds).
    secrets: dict[str, str] = field(default_factory=dict, repr=False)
    #: Which of ``user_tags`` move, and why any were left out (bot.pipeline.tags.plan_tags).
    tag_plan: tags.TagPlan | None = None


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


def image_rules(build: Build, settings: Settings) -> tags.ImageRules:
    """Where ``build``'s images may go, from the operator's settings (pure)."""
    forges = [forge for forge, on in (("github", settings.github_webhook_secret),
                                      ("gitlab", settings.gitlab_webhook_token)) if on]
    registry = (settings.registry or "").lower()
    foreign = tuple(
        "/".join(filter(None, (registry, forge_namespace(settings, forge))))
        for forge in forges if forge != build.provider and registry
    )
    return tags.image_rules(settings.registry, forge_namespace(settings, build.provider), build.provider,
                            build.repo, settings.image_policy, foreign)


def make_plan(build: Build, config: RepoConfig, settings: Settings, no_push: bool = False,
              given: Mapping[str, str] | None = None) -> Plan:
    """Names, tags, platforms and permissions of ``build`` (pure; raises TagError, kind
    ``config``, for an image outside what the operator allows, before any build work, or
    ConfigError for a secret ``given`` (the operator's for this repository) lacks)."""
    platforms = [tags.normalize_platform(p) for p in (config.platforms or build.platforms)]
    reasons = ["--no-push was given"] if no_push else []
    if build.fork:
        reasons.append("a pull request from a fork is built but never pushed")
    if not config.pushes(build.kind):
        reasons.append(f"push is off for {BuildKind(build.kind).value} builds in .imagebot.yml")
    image = tags.resolve_image(image_rules(build, settings), build.repo, config.image)
    if image is None and not reasons:
        reasons.append("no registry is configured (IMAGEBOT_REGISTRY)")
    labels = {
        **config.labels,
        "org.opencontainers.image.source": source_url(build.clone_url),
        "org.opencontainers.image.revision": build.sha,
        "org.opencontainers.image.created": utcnow().isoformat().replace("+00:00", "Z"),
    }
    tag_plan = tags.plan_tags(build.kind, build.ref, build.sha, build.pr_number,
                              build.default_branch, config.tags)
    return Plan(
        image=image,
        user_tags=list(tag_plan.tags),
        tag_plan=tag_plan,
        platforms=platforms,
        push=not reasons and image is not None,
        skip_reason="; ".join(reasons) or None,
        build_args=dict(config.build_args),
        labels=labels,
        target=config.target,
        allow_partial=config.allow_partial,
        trusted=not build.fork,
        secrets=_secrets(build, config, given or {}),
    )


def _secrets(build: Build, config: RepoConfig, given: Mapping[str, str]) -> dict[str, str]:
    """What the build gets of the secrets it asks for: those named, and none for a fork."""
    if build.fork:
        return {}
    try:
        return build_secrets.select(config.secrets, given, build.repo)
    except ValueError as exc:
        raise ConfigError([f"{config.source or '.imagebot.yml'}: {exc}"]) from None


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
        #: Per running build: every secret it may meet; all it emits, logs and ends with is
        #: masked against them (bot.masking).
        self._maskers: dict[int, Masker] = {}

    async def aclose(self) -> None:
        """Close the runtime's and GitHub's clients (the worker is done with this pipeline)."""
        await self.runtime.close()
        if self.github is not None:
            await self.github.aclose()

    # -- the whole build ------------------------------------------------------------------------

    async def __call__(self, build: Build) -> BuildOutcome:
        self._maskers[build.id] = self._masker()
        try:
            outcome = await self._run_within_deadline(build)
        finally:
            masker = self._maskers.pop(build.id)
        if outcome.error_message:
            outcome = replace(outcome, error_message=masker.mask(outcome.error_message))
        return outcome

    def _masker(self) -> Masker:
        """A build's masker, knowing the operator's own secrets from the start."""
        return masking.of_settings(self.settings)

    async def _run_within_deadline(self, build: Build) -> BuildOutcome:
        """Run ``build`` within BUILD_DEADLINE_SECONDS; past it, whatever step it is at is
        stopped (the runtime removes what it started) and the build fails with kind timeout."""
        step = ["fetch"]
        deadline = self.settings.build_deadline_seconds
        try:
            async with asyncio.timeout(deadline):
                return await self._run(build, step)
        except TimeoutError:
            message = f"the build did not finish in {deadline:.0f}s (IMAGEBOT_BUILD_DEADLINE_SECONDS)"
            await self.log(build, None, [f"ERROR: {message}"])
            return _failed(step[0], "timeout", message)

    async def _run(self, build: Build, step: list[str]) -> BuildOutcome:
        started = time.monotonic()
        masker = self._maskers[build.id]
        with tempfile.TemporaryDirectory(prefix=f"imagebot-{build.id}-", dir=self.settings.work_dir) as work:
            try:
                token = await self._forge_token(build)
                masker.add_basic(TOKEN_USERS.get(build.provider, "x-access-token"),
                                 token.get_secret_value() if token else None)
                checkout = await self._fetch(build, Path(work) / "src", token)
            except FetchError as exc:
                await self.emit(build, "fetch_failed", kind=exc.kind, message=exc.message)
                return _failed("fetch", exc.kind, exc.message)
            step[0] = "config"
            try:
                # untrusted files, CPU-bound parsing: on a thread, never on the event loop
                config, dockerfile, context = await asyncio.to_thread(_read_config, checkout.path)
                given = await self._given_secrets(build, config)
                plan = make_plan(build, config, self.settings, self.no_push, given)
            except (ConfigError, tags.TagError, build_secrets.SecretsFileError) as exc:
                await self.log(build, None, [f"ERROR: {exc}"])
                return _failed("config", exc.kind, str(exc))
            if build.fork and config.secrets:
                await self.log(build, None, [f"imagebot: a fork's pull request gets no build secrets "
                                             f"(asked for: {', '.join(config.secrets)})"])
            source = Source(checkout.path, build.clone_url, checkout.sha, build.ref, token,
                            TOKEN_USERS.get(build.provider, "x-access-token"))
            step[0] = "build"
            results = await self._platforms(build, plan, context, dockerfile, source)
        step[0] = "manifest"
        return await self._conclude(build, plan, results, started)

    async def _given_secrets(self, build: Build, config: RepoConfig) -> dict[str, str]:
        """The operator's build secrets for this repository, where its config asks for some
        (none for a fork: it never gets them), read from the secrets file again for every
        build so a rotation takes effect without a restart; each is masked from here on."""
        path = self.settings.build_secrets_file
        if build.fork or path is None or not config.secrets:
            return {}
        entries = await asyncio.to_thread(build_secrets.load, path)
        given = build_secrets.for_repository(entries, build.provider, build.repo)
        for name, value in given.items():
            self._maskers[build.id].add(value, name)
        return given

    async def _fetch(self, build: Build, dest: Path, token: SecretStr | None) -> Checkout:
        username = TOKEN_USERS.get(build.provider, "x-access-token")
        checkout = await fetch(
            build.clone_url, build.sha, build.ref, dest, token=token, username=username,
            timeout=self.settings.fetch_timeout_seconds,
            log=lambda lines: self.log(build, None, lines),
            protocols=self.settings.git_protocols,
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
            image=target, source=source, build_id=build.id, push=plan.push, secrets=plan.secrets,
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
            await self._check_secrets(job, image_id)
        except BuildError as exc:
            await self.emit(build, "build_platform_failed", platform, kind=exc.kind, message=exc.message,
                            duration_s=_since(started))
            return PlatformResult(platform, False, "build", exc.kind, exc.message)
        await self.emit(build, "build_platform_succeeded", platform, image_id=image_id, duration_s=_since(started))
        if not plan.push:
            await self.emit(build, "push_skipped", platform, reason=plan.skip_reason or "not pushed")
            return PlatformResult(platform, True)
        return await self._tag_and_push(build, plan, platform, image_id, target, credentials)

    async def _check_secrets(self, job: BuildJob, image_id: str) -> None:
        """Refuse an image whose config or history carries a build secret, in any form the
        masker knows (Docker's classic builder writes the build args a ``RUN`` used into the
        history: a secret may only be used in an earlier stage of a multi-stage build)."""
        if not job.secrets:
            return
        record = await self.runtime.image_record(image_id)
        found = Masker(job.secrets).found(record) if record else []
        if found:
            raise BuildError("config", (
                f"the built image's config or history contains the build secret {', '.join(found)}, "
                "so it is not pushed: use build secrets only in an earlier stage of a multi-stage "
                "build (its final stage must not declare them as ARG or ENV)"))

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
            pull = await self._pull_credentials(build, credentials)
            generation = credentials.generation if credentials else 0
            timeout = self.settings.build_timeout_seconds
            try:
                async with asyncio.timeout(None if self.runtime.enforces_deadlines else timeout):
                    return await self.runtime.build(replace(job, pull_credentials=pull),
                                                    lambda lines: self.log(build, platform, lines))
            except TimeoutError:
                raise BuildError("timeout", f"the {platform} build did not finish in {timeout:.0f}s "
                                            f"(IMAGEBOT_BUILD_TIMEOUT_SECONDS)") from None

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

    async def _pull_credentials(self, build: Build,
                                credentials: RegistryCredentials | None) -> dict[str, Credentials] | None:
        """The registry credentials a build may pull its base images with, as they are now."""
        current = await self._quiet_get(credentials) if credentials else None
        self._note(build, current)
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
            self._note(build, creds)
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

    def _note(self, build: Build, current: Credentials | None) -> None:
        """Registry credentials a build is about to use are masked in all it says (a
        password file or helper may answer new ones at any refresh)."""
        if current is not None:
            self._mask(build).add_basic(current.username, current.password.get_secret_value())

    async def _quiet_get(self, credentials: RegistryCredentials) -> Credentials | None:
        try:
            return await credentials.get()
        except CredentialsError:
            return None  # the push will fail with kind auth and say why

    async def _refresh(self, build: Build, platform: str | None, credentials: RegistryCredentials | None,
                       generation: int, require_change: bool = False) -> bool:
        """Read the credentials again; whether the failed call is worth another attempt
        (with ``require_change``: only if the source answered different credentials)."""
        if credentials is None or not credentials.configured:
            return False  # this host gets no credentials: nothing to read again
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
        credentials = RegistryCredentials(host, self.settings)
        client = RegistryClient(host, credentials if credentials.configured else None)
        try:
            publish = await self._publishable(build, plan, client, repository)
            if not publish:
                return None
            return await self._put_lists(build, client, credentials, repository, pushed, publish, partial)
        except NotCurrent as exc:
            await self._withhold(build, exc.tags, str(exc))
            return BuildOutcome(BuildStatus.cancelled, error_message=str(exc))
        finally:
            await client.aclose()

    async def _put_lists(self, build: Build, client: RegistryClient, credentials: RegistryCredentials,
                         repository: str, pushed: list[Descriptor], publish: list[str],
                         partial: bool) -> BuildOutcome | None:
        """PUT the manifest list under each tag of ``publish``, checking right before each PUT
        that this build still holds its lease and was not superseded or cancelled meanwhile
        (in this process or another): a superseded build must never move a tag."""
        platforms = [d.platform for d in pushed]
        fmt = self.settings.manifest_format
        body_type = manifest_list([], fmt)[1]
        await self.emit(build, "manifest_started", tags=publish, platforms=platforms, media_type=body_type)

        async def attempt() -> str:
            described = [await client.describe(repository, d.digest, d.platform) for d in pushed]
            body, media_type = manifest_list(described, fmt)
            digest = ""
            for n, tag in enumerate(publish):
                await self._ensure_current(build, publish[n:])
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
        await self.emit(build, "manifest_published", digest=result.value, tags=publish,
                        platforms=platforms, media_type=body_type, partial=partial)
        return None

    async def _ensure_current(self, build: Build, remaining: list[str]) -> None:
        """Raise :class:`NotCurrent` unless ``build`` may still publish (see :func:`still_current`)."""
        if not await self.telemetry.db.read(lambda conn: still_current(conn, build)):
            raise NotCurrent(remaining, "the build is no longer current (superseded, cancelled, or its "
                                        "lease expired or moved on) and publishes no more tags")

    async def _publishable(self, build: Build, plan: Plan, client: RegistryClient, repository: str) -> list[str]:
        """The planned tags this build may publish now; says (log and telemetry) why others are not.

        Moving tags need the commit to still be its ref's head (``git ls-remote``, just before
        publishing; a failed check holds them too); a tag build's ``latest`` and version aliases
        also need that no higher version is in the registry. Immutable tags always go.
        """
        plan_ = plan.tag_plan or tags.TagPlan(tuple(plan.user_tags))
        for note in plan_.notes:
            await self._withhold(build, [], note)
        held: set[str] = set()
        if plan_.moving:
            reason = await self._head_moved(build)
            if reason is not None:
                held |= plan_.moving
                await self._withhold(build, [t for t in plan_.tags if t in plan_.moving], reason)
        if plan_.version is not None and plan_.aliases - held:
            stale, reason = await self._newer_version(client, repository, plan_)
            if stale - held:
                await self._withhold(build, [t for t in plan_.tags if t in stale - held], reason)
                held |= stale
        return [tag for tag in plan_.tags if tag not in held]

    async def _head_moved(self, build: Build) -> str | None:
        """Why moving tags must stay where they are, or None when ``build.sha`` is its ref's head."""
        short = build.sha[:7]
        try:
            token = await self._forge_token(build)
            head = await ref_head(build.clone_url, build.ref, token=token,
                                  username=TOKEN_USERS.get(build.provider, "x-access-token"),
                                  timeout=self.settings.fetch_timeout_seconds,
                                  protocols=self.settings.git_protocols)
        except (HeadUnknown, FetchError) as exc:
            return (f"could not check that {short} is still the head of {build.ref} ({exc}): "
                    "only immutable tags are published")
        if head == build.sha:
            return None
        now = f"it is {head[:7]}" if head else "the ref is gone"
        return f"{short} is no longer the head of {build.ref} ({now}): only immutable tags are published"

    async def _newer_version(self, client: RegistryClient, repository: str,
                             plan_: tags.TagPlan) -> tuple[set[str], str]:
        """(aliases not to move, why): a higher version the bot published keeps them where they are."""
        assert plan_.version is not None
        version = plan_.version.version
        try:
            published = await client.tags(repository)
        except RegistryError as exc:
            return set(plan_.aliases), (f"could not list the registry's tags to look for a version above "
                                        f"{version} ({exc.detail}): latest and version aliases are not moved")
        stale = tags.newer_version_published(plan_.version, published)
        if stale:
            stale |= {alias for alias in plan_.aliases if not tags.is_version_alias(alias)}
        return stale & set(plan_.aliases), f"a version above {version} was published already: these stay where they are"

    async def _withhold(self, build: Build, withheld: list[str], reason: str) -> None:
        await self.log(build, None, [f"NOTE: not publishing {', '.join(withheld) or 'a branch tag'}: {reason}"])
        await self.emit(build, "tags_withheld", tags=withheld, reason=reason)

    # -- telemetry ------------------------------------------------------------------------------

    async def emit(self, build: Build, name: str, platform: str | None = None, **data) -> None:
        """Emit a telemetry event, every text in it masked."""
        await self.telemetry.emit(build.id, name, platform, **self._mask(build).mask_data(data))

    async def log(self, build: Build, platform: str | None, lines: list[str]) -> None:
        """Append build-log lines, masked."""
        masker = self._mask(build)
        await self.telemetry.log_lines(build.id, platform, [masker.mask(line) for line in lines])

    def _mask(self, build: Build) -> Masker:
        return self._maskers.get(build.id) or self._masker()


class NotCurrent(Exception):
    """The build may no longer publish: superseded, cancelled, or its lease lost."""

    def __init__(self, remaining: list[str], message: str) -> None:
        super().__init__(message)
        self.tags = remaining


def still_current(conn: Connection, build: Build) -> bool:
    """Whether ``build`` may still publish: it is running under the lease it was claimed with,
    and that lease has not expired (another worker could recover it any moment). A build run
    outside the queue's worker (no lease owner) only needs not to have ended."""
    query = select(builds.c.status).where(builds.c.id == build.id)
    if build.lease_owner is not None:
        query = query.where(builds.c.lease_owner == build.lease_owner,
                            builds.c.status == BuildStatus.running.value,
                            builds.c.lease_expires_at > utcnow())
    status = conn.execute(query).scalar()
    return status is not None and not BuildStatus(status).final



def _read_config(checkout: Path) -> tuple[RepoConfig, Path, Path]:
    """The repository's config and its Dockerfile and context (blocking: run on a thread)."""
    config = load_config(checkout)
    return (config, *resolve_paths(checkout, config))


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


__all__ = ["Pipeline", "Plan", "make_plan", "runner_for"]
