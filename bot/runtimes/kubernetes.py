"""The Kubernetes runtime: each platform is a batch/v1 Job in ``IMAGEBOT_K8S_NAMESPACE``.

The Job's pod has three containers sharing an ``emptyDir``, each with what it needs only:

- ``fetch`` (an init container) fetches exactly the build's commit with git; it is the only
  one that gets the forge token (``GIT_CONFIG_*`` variables from a per-build Secret), and a
  fork's build gets none;
- ``build`` (an init container) builds the context for the platform with buildah into the
  platform tag. It runs the repository's Dockerfile, so no variable of it holds a credential: a
  trusted build's registry config.json is a file of a Secret volume (``--authfile``), its
  operator build secrets files (``--secret``); a fork's gets neither, and is never privileged;
- ``push`` pushes that tag, once, writing the digest (or the registry's error) as its
  termination message. The registry credentials come from the per-build Secret (a config.json
  holding only the hosts this build may use, never another build's) as an environment
  variable, which the kubelet reads again at every container start (the build step's file
  follows a patched Secret too: the kubelet refreshes Secret volumes when it syncs the pod,
  which a failed run makes it do).

Every container has the build's memory and CPU limits, the Job a deadline (kind ``timeout``).

With ``IMAGEBOT_K8S_LAYER_CACHE_DIR``, a trusted build keeps buildah's storage in a ``hostPath``
directory of its node instead (one per image repository and platform) and builds with
``--layers``, so a rebuild reuses its unchanged steps; builds from forks never get it.

A failed push ends the ``push`` container; with ``restartPolicy: OnFailure`` the kubelet starts
it again (after its own back-off, 10 s, 20 s, ...) from the same built image. The bot is the one
that decides: each termination is one push attempt, classified with the same rules as the
Docker engine's errors (bot.pipeline.push) and retried, refreshed or given up by the same
policy in the pipeline. A refresh patches the Secret before the next start, so a rotated
password heals without anyone stepping in. Giving up, finishing or being cancelled deletes the
Job (its pod with it) and the per-build Secret (the registry credentials with it).

Every step runs unprivileged by default (IMAGEBOT_K8S_PRIVILEGED=false): buildah builds in a
user namespace of its own with three capabilities, so a RUN step's root is no root of the
node; only an operator who opts in runs trusted builds privileged.

The ``build`` container is followed the same way: a run that failed pulling a base image (its
termination message names the failing FROM step and buildah's error) is one build attempt, a
classified PullError, and the kubelet's next run (with the patched Secret) is the next one.

The client is kubernetes_asyncio: the official client's generated code for asyncio, which loads
kubeconfigs and in-cluster config like kubectl does; its core/v1 and batch/v1 calls are the
same on 1.20 and on current servers. Answers are read as plain JSON (``_preload_content=False``)
rather than the generated models, whose newest fields an old server never sends.

A worker that restarts while Jobs run finds them by their labels (build id and platform) and
adopts them instead of starting the platform again.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from bot.pipeline.credentials import Credentials
from bot.pipeline.fetch import git_env
from bot.pipeline.manifest import RegistryClient
from bot.pipeline.push import RegistryError, sanitize
from bot.pipeline.tags import platform_parts, split_image
from bot.runtimes import BuildError, BuildJob, LogSink, PullError, Pushed, is_step, last_step, pull_failure
from bot.settings import Settings

log = logging.getLogger(__name__)

#: The per-build Secret's key holding that build's registry config.json (its own hosts only).
REGISTRY_KEY = "registry-auth"
LABEL_BUILD = "imagebot.dev/build"
LABEL_PLATFORM = "imagebot.dev/platform"
#: Waiting reasons that will not heal by waiting.
STUCK = frozenset({"ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError",
                   "CreateContainerError", "ImageInspectError"})
PULL_TROUBLE = frozenset({"ErrImagePull", "ImagePullBackOff"})
#: ... except when the kubelet only has not caught up with a Secret yet (it tries again).
CACHE_CATCHING_UP = ("failed to sync secret cache", "failed to sync configmap cache")
#: How long a failed build run's log may take to reach the build log.
LOG_DRAIN_SECONDS = 5.0

# The default scripts: POSIX sh, every input from the environment (never spliced into the
# script), so a branch name or a build arg cannot become a command.
#: The fetch step: the only container that gets the forge token (as GIT_CONFIG_* variables; a
#: fork's build gets none). It runs git only, never the repository's code.
FETCH_SCRIPT = r"""set -eu
rm -rf /work/src
git init -q /work/src && cd /work/src
if ! git fetch -q --depth 1 -- "$IMAGEBOT_CLONE_URL" "$IMAGEBOT_SHA" 2>/tmp/err; then
  if ! git fetch -q --depth 50 -- "$IMAGEBOT_CLONE_URL" "$IMAGEBOT_REF" 2>/tmp/err; then
    cat /tmp/err >&2; tail -c 2000 /tmp/err > /dev/termination-log; exit 1
  fi
fi
git checkout -q "$IMAGEBOT_SHA"
echo "imagebot: fetched $IMAGEBOT_SHA"
"""
#: The build step: runs the repository's Dockerfile, so it gets no token and no variable with a
#: credential; a trusted build's pull credentials are a file buildah reads (--authfile), its
#: operator build secrets files buildah mounts for RUN --mount=type=secret (--secret).
BUILD_SCRIPT = r"""set -eu
cd /work/src
rm -f /work/build.rc
auth=${IMAGEBOT_AUTHFILE:-}
[ -n "$auth" ] && [ -s "$auth" ] || auth=
used=$({ [ -z "$auth" ] || cat "$auth"; } | sha256sum | cut -d' ' -f1)
set -- --platform "$IMAGEBOT_PLATFORM" -f "$IMAGEBOT_DOCKERFILE" -t "$IMAGEBOT_IMAGE"
if [ -n "$auth" ]; then set -- "$@" --authfile "$auth"; fi
if [ -n "${IMAGEBOT_TARGET:-}" ]; then set -- "$@" --target "$IMAGEBOT_TARGET"; fi
while IFS= read -r arg; do [ -n "$arg" ] && set -- "$@" --build-arg "$arg"; done < /imagebot/build-args
while IFS= read -r label; do [ -n "$label" ] && set -- "$@" --label "$label"; done < /imagebot/labels
for secret in /imagebot/secrets/*; do [ -f "$secret" ] && set -- "$@" --secret "id=${secret##*/},src=$secret"; done
# a trusted build with the layer cache on keeps its storage on the node (IMAGEBOT_STORAGE)
if [ "${IMAGEBOT_LAYERS:-false}" = true ]; then set -- "$@" --layers; fi
# an unprivileged build's RUN steps: root there is an unprivileged uid of the node
if [ -n "${IMAGEBOT_USERNS:-}" ]; then set -- "$@" --userns-uid-map "$IMAGEBOT_USERNS" --userns-gid-map "$IMAGEBOT_USERNS"; fi
store=${IMAGEBOT_STORAGE:-/work}
started=$(date +%s)
{ timeout -k 10 "$IMAGEBOT_BUILD_TIMEOUT" buildah --root "$store/storage" --runroot "$store/run" \
  --storage-driver vfs bud --isolation chroot --tls-verify="$IMAGEBOT_TLS_VERIFY" "$@" "$IMAGEBOT_CONTEXT" 2>&1 \
  || echo "$?" > /work/build.rc; } | tee /work/build.log
[ -s /work/build.rc ] || exit 0
# the step that failed and buildah's error lines (a FROM step: the registry's words on a base
# image), and which credentials this run had: the kubelet may restart it before it sees a new Secret
{ grep -E '^(\[[0-9]+/[0-9]+\] )?STEP [0-9]+/[0-9]+: ' /work/build.log | tail -n 1 | cut -c 1-500
  if [ $(( $(date +%s) - started )) -ge "$IMAGEBOT_BUILD_TIMEOUT" ]; then
    echo "imagebot-timeout: $IMAGEBOT_BUILD_TIMEOUT"
  else { sed -n '/^Error: /,$p' /work/build.log | grep . || tail -n 5 /work/build.log; } | tail -c 2000; echo
  fi
  echo "imagebot-auth: $used"; } > /dev/termination-log
exit "$(cat /work/build.rc)"
"""
PUSH_SCRIPT = r"""set -u
auth=${REGISTRY_AUTH:-}
[ -n "$auth" ] || auth='{"auths": {}}'
printf '%s' "$auth" > /tmp/auth.json
used=$(printf '%s' "${REGISTRY_AUTH:-}" | sha256sum | cut -d' ' -f1)
store=${IMAGEBOT_STORAGE:-/work}
buildah --root "$store/storage" --runroot "$store/run" --storage-driver vfs push --quiet --authfile /tmp/auth.json \
  --tls-verify="$IMAGEBOT_TLS_VERIFY" --digestfile /tmp/digest "$IMAGEBOT_IMAGE" "docker://$IMAGEBOT_IMAGE" \
  2>/tmp/err
rc=$?
cat /tmp/err >&2
if [ "$rc" -eq 0 ]; then cat /tmp/digest > /dev/termination-log; exit 0; fi
# the registry's words are on the error lines; progress output would crowd them out
# and which credentials this run had: the kubelet may restart it before it sees a new Secret
{ { sed -n '/[Ee]rror/,$p' /tmp/err | grep . || cat /tmp/err; } | tail -c 2000; echo; echo "imagebot-auth: $used"; } \
  > /dev/termination-log
exit "$rc"
"""
DONE_SCRIPT = "echo 'imagebot: built; this build pushes nothing'"
#: Where the build step finds a trusted build's registry config.json (a per-build Secret volume).
AUTH_DIR = "/imagebot-auth"
#: The per-build Secret's keys holding operator build secrets (files below /imagebot/secrets).
SECRET_KEY_PREFIX = "secret."
_SECRET_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
#: Every build step unless the operator opts in to privileged trusted builds (a fork's always):
#: not privileged, no privilege to gain, every capability dropped but the three buildah needs
#: to make its own user namespace (SETUID, SETGID, and SETFCAP, which Linux >= 5.12 asks for to
#: map root). buildah (--isolation chroot, vfs) then builds as root of that namespace only, and
#: its RUN steps run as host uids 100000-165535 (UNTRUSTED_USERNS), never as root of the node. Seen on the test node (1.20, containerd 1.6, kernel 6.x): this builds;
#: seccomp RuntimeDefault does not (containerd's profile refuses unshare(CLONE_NEWUSER)).
UNTRUSTED_BUILD_SECURITY: dict[str, Any] = {
    "privileged": False, "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"], "add": ["SETUID", "SETGID", "SETFCAP"]},
}
#: Every fetch step, and a fork's (no-)push step: git and echo need no capability at all.
UNTRUSTED_SECURITY: dict[str, Any] = {"privileged": False, "allowPrivilegeEscalation": False,
                                      "capabilities": {"drop": ["ALL"]}}
#: buildah --userns-uid-map/--userns-gid-map of a fork's RUN steps: container root is host uid 100000.
UNTRUSTED_USERNS = "0:100000:65536"
FORKS_OFF = ("builds of pull requests from forks are off on Kubernetes (IMAGEBOT_K8S_FORK_BUILDS=false): "
             "they would run the fork's Dockerfile in the cluster; see docs/kubernetes.md")


def slug(platform: str) -> str:
    return "-".join(filter(None, platform_parts(platform)))


def trusted(job: BuildJob) -> bool:
    """Whether the build is trusted (not a fork's pull request): only then does its pod get
    a token, credentials, secrets, privileges, the host network or the layer cache."""
    return job.trusted


def build_secrets(job: BuildJob) -> dict[str, str]:
    """The operator's build secrets this build may mount: a trusted build's, a fork never."""
    if not trusted(job):
        return {}
    bad = sorted(name for name in job.secrets if not _SECRET_NAME.match(name))
    if bad:
        raise BuildError("config", f"build secret names must be letters, digits, '.', '_' or '-': {', '.join(bad)}")
    return dict(job.secrets)


def gets_registry_auth(job: BuildJob) -> bool:
    """Whether the pod gets the registry Secret: a trusted build that pushes or pulls with it."""
    return trusted(job) and bool(job.push or job.pull_credentials)


def job_name(build_id: int, platform: str) -> str:
    return f"imagebot-{build_id}-{slug(platform)}"


def dockerconfigjson(creds: dict[str, Credentials]) -> str:
    """A docker config.json (the Secret's ``.dockerconfigjson``) for these registries."""
    auths = {
        host: {"auth": base64.b64encode(f"{c.username}:{c.password.get_secret_value()}".encode()).decode()}
        for host, c in sorted(creds.items())
    }
    return json.dumps({"auths": auths}, sort_keys=True)


def _seconds(value: float) -> int:
    return max(1, int(value + 0.999))


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# -- what the pod says (pure) -----------------------------------------------------------------


@dataclass(frozen=True)
class Termination:
    attempt: int  # 1 for the container's first run
    exit_code: int
    message: str
    reason: str = ""  # the kubelet's: "Error", "Completed", "OOMKilled", ...


def container_status(pod: dict[str, Any], name: str, init: bool = False) -> dict[str, Any] | None:
    key = "initContainerStatuses" if init else "containerStatuses"
    return next((s for s in pod.get("status", {}).get(key) or [] if s["name"] == name), None)


def terminations(status: dict[str, Any] | None) -> list[Termination]:
    """The runs of a container that ended, as far as the pod still tells (the current state
    and the last one before a restart)."""
    if not status:
        return []
    restarts = status.get("restartCount", 0)
    seen = []
    last = (status.get("lastState") or {}).get("terminated")
    if last and restarts:
        seen.append(Termination(restarts, last.get("exitCode", 1), last.get("message") or "", last.get("reason") or ""))
    now = (status.get("state") or {}).get("terminated")
    if now:
        seen.append(Termination(restarts + 1, now.get("exitCode", 1), now.get("message") or "", now.get("reason") or ""))
    return seen


def stuck_reason(pod: dict[str, Any]) -> str | None:
    """Why the pod will never run, if it says so: a container that cannot start."""
    statuses = (pod.get("status", {}).get("initContainerStatuses") or []) + \
        (pod.get("status", {}).get("containerStatuses") or [])
    for status in statuses:
        waiting = (status.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK | PULL_TROUBLE:
            return f"{status['name']}: {waiting['reason']}: {waiting.get('message', '')}".strip()
    return None


def never_heals(reason: str) -> bool:
    """Whether a stuck reason (:func:`stuck_reason`) is final, rather than the kubelet's Secret
    cache lagging behind a Secret created a moment before the pod ("failed to sync secret
    cache: timed out waiting for the condition", seen on 1.20), which it retries by itself."""
    return any(r in reason for r in STUCK) and not any(words in reason for words in CACHE_CATCHING_UP)


def split_auth_note(message: str) -> tuple[str, str | None]:
    """A failed push's termination message: the registry's words, and the fingerprint of the
    credentials that run had (None when the script did not say)."""
    match = re.search(r"\n?imagebot-auth: ([0-9a-f]{64})\s*$", message)
    if match is None:
        return message.strip(), None
    return message[: match.start()].strip(), match.group(1)


def masked(job: BuildJob) -> tuple[str, ...]:
    """What must not reach a message of this job: the operator's build secrets."""
    return tuple(job.secrets.values())


def failed_fetch(pod: dict[str, Any]) -> Termination | None:
    """The fetch step's failed run, if it failed (it runs once: git only)."""
    return next((t for t in terminations(container_status(pod, "fetch", init=True)) if t.exit_code != 0), None)


def limit_failure(run: Termination, settings: Settings) -> BuildError | None:
    """A build run that a limit ended (pure): the memory limit (the kubelet says OOMKilled:
    kind ``build``, out of memory) or the build step's own deadline (kind ``timeout``)."""
    if run.reason == "OOMKilled":
        return BuildError("build", f"out of memory: the build went past its memory limit of {settings.build_memory_mb} "
                                   f"MiB (IMAGEBOT_BUILD_MEMORY_MB) and was killed (OOMKilled)"
                                   + (f" in {step}" if (step := last_step(run.message.splitlines())) else ""))
    match = re.search(r"^imagebot-timeout: (\d+)$", run.message, re.M)
    if match:
        step = last_step(run.message.splitlines())
        return BuildError("timeout", f"the build did not finish in {match[1]} s (IMAGEBOT_BUILD_TIMEOUT_SECONDS "
                                     f"and IMAGEBOT_PULL_TIMEOUT_SECONDS)" + (f"; it was at {step}" if step else ""))
    return None


def unschedulable(pod: dict[str, Any]) -> str | None:
    for cond in pod.get("status", {}).get("conditions") or []:
        if cond["type"] == "PodScheduled" and cond["status"] == "False":
            return cond.get("message") or cond.get("reason") or "unschedulable"
    return None


# -- the runtime ------------------------------------------------------------------------------


@dataclass
class _Platform:
    """One platform's Job, as this process follows it."""

    name: str
    job: BuildJob
    log: LogSink
    built: int = 0  # build runs already handed to the pipeline
    seen: int = 0  # push attempts already handed to the pipeline
    followers: dict[int, asyncio.Task] = field(default_factory=dict)  # build run -> its log stream
    #: This build's registry credentials (its own hosts only), as last written to its Secret.
    registry: dict[str, Credentials] = field(default_factory=dict, repr=False)

    @property
    def has_registry_auth(self) -> bool:
        return gets_registry_auth(self.job)

    def fingerprint(self) -> str:
        """What the build and push scripts print of the credentials they ran with."""
        return hashlib.sha256(dockerconfigjson(self.registry).encode()).hexdigest()


class KubernetesRuntime:
    name = "kubernetes"
    enforces_deadlines = True

    def __init__(self, settings: Settings, api: k8s.ApiClient | None = None) -> None:
        self.settings = settings
        self.namespace = settings.k8s_namespace
        self._api = api
        self._platforms: dict[str, _Platform] = {}

    # -- the API ----------------------------------------------------------------------------

    async def api(self) -> k8s.ApiClient:
        if self._api is None:
            configuration = k8s.Configuration()
            if self.settings.k8s_kubeconfig is not None:
                await k8s_config.load_kube_config(
                    config_file=str(self.settings.k8s_kubeconfig), context=self.settings.k8s_context,
                    client_configuration=configuration)
            else:
                k8s_config.load_incluster_config(client_configuration=configuration)
            self._api = k8s.ApiClient(configuration)
        return self._api

    async def _call(self, what: str, call: Callable[..., Awaitable[Any]], *args: Any,
                    allow: tuple[int, ...] = (), **kwargs: Any) -> Any:
        """One API call, answered as JSON (None for an ``allow``-ed error status); other
        failures become BuildError kind ``runtime``, with the API server's reason."""
        try:
            response = await call(*args, _preload_content=False, **kwargs)
            body = await response.read()
        except ApiException as exc:
            raise BuildError("runtime", f"{what}: {exc.status} {exc.reason}: {_api_message(exc.body)}") from None
        except (OSError, asyncio.TimeoutError) as exc:
            raise BuildError("runtime", f"{what}: {type(exc).__name__}: {exc}") from None
        if response.status in allow:
            return None
        if response.status >= 400:
            raise BuildError("runtime", f"{what}: {response.status} {_api_message(body)}")
        return json.loads(body) if body else None

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    # -- Secrets ----------------------------------------------------------------------------

    async def _put_secret(self, name: str, body: dict[str, Any]) -> None:
        core = k8s.CoreV1Api(await self.api())
        created = await self._call(f"creating Secret {name}", core.create_namespaced_secret, self.namespace,
                                   body, allow=(409,))
        if created is None:
            await self._call(f"replacing Secret {name}", core.replace_namespaced_secret, name, self.namespace, body)

    async def _write_registry(self, state: _Platform, creds: dict[str, Credentials] | None) -> bool:
        """Write the build's own Secret with ``creds`` merged into its registry credentials
        (always: no cache of this process decides, the Secret is the build's alone); True if
        the credentials changed."""
        before = state.fingerprint()
        state.registry.update(creds or {})
        await self._put_secret(state.name, self.job_secret(state.name, state.job, state.registry))
        return state.fingerprint() != before

    def job_secret(self, name: str, job: BuildJob, registry: dict[str, Credentials] | None = None) -> dict[str, Any]:
        """What the pod must know but no spec may show: the fetch token (trusted builds only,
        and only the fetch step reads it), the build args, a trusted build's operator build
        secrets (as files, only the build step reads them) and its registry config.json (only
        this build's hosts: the build step's authfile and the push step's variable)."""
        args = "\n".join(f"{k}={v}" for k, v in job.build_args.items() if "\n" not in v)
        labels = "\n".join(f"{k}={v}" for k, v in job.labels.items() if "\n" not in v)
        data = {**({k: _b64(v) for k, v in self._fetch_env(job).items()} if trusted(job) else {}),
                "build-args": _b64(args + "\n"), "labels": _b64(labels + "\n")}
        data.update({f"{SECRET_KEY_PREFIX}{k}": _b64(v) for k, v in build_secrets(job).items()})
        if gets_registry_auth(job):
            data[REGISTRY_KEY] = _b64(dockerconfigjson(registry or {}))
        return {"metadata": {"name": name, "labels": self._labels(job)}, "type": "Opaque", "data": data}

    @staticmethod
    def _fetch_env(job: BuildJob) -> dict[str, str]:
        """git's isolated configuration (GIT_*: no system config, only the allowed protocols)
        for every fetch step; the token's header (GIT_CONFIG_*) for a trusted build's only."""
        assert job.source is not None
        token = job.source.token if trusted(job) else None
        return {k: v for k, v in git_env(job.source.clone_url, token, job.source.username,
                                         home=Path("/work")).items() if k.startswith("GIT_")}

    # -- the Job ----------------------------------------------------------------------------

    def _labels(self, job: BuildJob) -> dict[str, str]:
        return {LABEL_BUILD: str(job.build_id), LABEL_PLATFORM: slug(job.platform),
                "app.kubernetes.io/managed-by": "imagebot"}

    def layer_cache_path(self, job: BuildJob) -> str | None:
        """The node directory holding this build's layer cache: one per source repository (its
        clone URL's host and path) and platform (a name nobody can choose: a hash; never the
        image name, which a repository picks, so one repository cannot poison another's cache),
        none for builds that do not push."""
        root = self.settings.k8s_layer_cache_dir
        if root is None or not job.push or job.source is None:
            return None
        url = urlsplit(job.source.clone_url)
        repository = f"{url.hostname}{url.path.removesuffix('.git')}".lower()
        key = hashlib.sha256(f"{repository}\n{job.platform}".encode()).hexdigest()[:32]
        return f"{root}/{key}-{slug(job.platform)}"

    def job_manifest(self, name: str, job: BuildJob) -> dict[str, Any]:
        """The Job for one platform (pure, given the settings).

        Three containers, each with what it needs and nothing more: ``fetch`` (init) gets the
        token, ``build`` (init, the repository's Dockerfile) the build args and, for a trusted
        build, the registry's config.json and the operator's build secrets as files, ``push``
        the registry credentials. A fork's pod gets no token, credential or secret, is never
        privileged and never on the host network."""
        s = self.settings
        assert job.source is not None and job.image is not None
        if not trusted(job) and not s.k8s_fork_builds:
            raise BuildError("config", FORKS_OFF)
        env = [
            {"name": "IMAGEBOT_PLATFORM", "value": job.platform},
            {"name": "IMAGEBOT_IMAGE", "value": job.image},
            {"name": "IMAGEBOT_TLS_VERIFY", "value": "true" if s.k8s_registry_tls_verify else "false"},
            {"name": "HOME", "value": "/work"},
        ]
        mounts = [{"name": "work", "mountPath": "/work"}]
        volumes: list[dict[str, Any]] = [{"name": "work", "emptyDir": {}}, self._job_volume(name, job)]
        if (cache := self.layer_cache_path(job)) is not None:
            # Trusted builds keep buildah's storage on the node, one directory per image
            # repository and platform, and build with --layers: a rebuild reuses every step
            # up to the first changed one. containers/storage locks its own files, so pods of
            # the same repository on one node may share the directory. Untrusted builds (forks)
            # never get it: they can neither read another build's layers nor plant their own.
            # Not buildah's registry cache (--cache-from/--cache-to, which would need no volume
            # and work across nodes): in buildah 1.28.2 no step after an ARG ever hits it (the
            # ARG's cache image is pushed, never pulled, and later keys change from build to
            # build; containers/buildah#4315), and multi-arch Dockerfiles declare TARGETARCH &
            # co. right after FROM. See docs/kubernetes.md, "The layer cache".
            env += [{"name": "IMAGEBOT_STORAGE", "value": "/cache"}, {"name": "IMAGEBOT_LAYERS", "value": "true"}]
            mounts.append({"name": "cache", "mountPath": "/cache"})
            volumes.append({"name": "cache", "hostPath": {"path": cache, "type": "DirectoryOrCreate"}})
        if gets_registry_auth(job):  # untrusted builds never get registry credentials
            # the build's own Secret: its config.json holds this build's hosts only ("auths"
            # empty for an anonymous registry), and goes with the Job
            volumes.append({"name": "registry", "secret": {"secretName": name, "items": [
                {"key": REGISTRY_KEY, "path": "auth.json"}]}})
        containers = [self._fetch_container(name, job), self._build_container(job, env, mounts),
                      self._push_container(name, job, env, mounts)]
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "labels": self._labels(job)},
            "spec": {
                # the bot decides when to give up; the Job controller must not decide first:
                # each build and each push may run ``attempts`` times, and once more each when
                # the kubelet restarted it before it saw refreshed credentials
                "backoffLimit": 2 * (s.push_retries + 2) + 3,
                "activeDeadlineSeconds": self.deadline(job),
                "template": {"metadata": {"labels": self._labels(job)},
                             "spec": self._pod_spec(job, containers, volumes)},
            },
        }

    def _pod_spec(self, job: BuildJob, containers: list[dict[str, Any]], volumes: list[dict[str, Any]]) -> dict[str, Any]:
        s = self.settings
        host_network = s.k8s_host_network and trusted(job)  # a fork's pod: the cluster's network
        pod: dict[str, Any] = {
            "restartPolicy": "OnFailure",
            "initContainers": containers[:2],
            "containers": containers[2:],
            "volumes": volumes,
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 5,
            "hostNetwork": host_network,
            "nodeSelector": {"kubernetes.io/os": platform_parts(job.platform)[0],
                             **s.k8s_node_selectors.get(job.platform, {})},
        }
        if host_network:
            pod["dnsPolicy"] = "ClusterFirstWithHostNet"
        if s.k8s_service_account:
            pod["serviceAccountName"] = s.k8s_service_account
        return pod

    def _container(self, job: BuildJob, name: str, script: str, env: list[dict[str, Any]],
                   mounts: list[dict[str, Any]]) -> dict[str, Any]:
        s = self.settings
        return {"name": name, "image": s.k8s_builder_image, "imagePullPolicy": s.k8s_image_pull_policy,
                "command": ["/bin/sh", "-c", script], "env": env, "volumeMounts": mounts,
                "securityContext": self._security(job, name), "resources": self.resources(),
                "terminationMessagePolicy": "File"}

    def _fetch_container(self, name: str, job: BuildJob) -> dict[str, Any]:
        """git, with its isolated configuration: a trusted build's one by one from the per-build
        Secret (it holds the token), a fork's as plain values (it has no token)."""
        assert job.source is not None
        git = self._fetch_env(job)
        env = [{"name": "IMAGEBOT_CLONE_URL", "value": job.source.clone_url},
               {"name": "IMAGEBOT_SHA", "value": job.source.sha},
               {"name": "IMAGEBOT_REF", "value": job.source.ref},
               {"name": "HOME", "value": "/work"},
               *({"name": k, "valueFrom": {"secretKeyRef": {"name": name, "key": k}}} if trusted(job)
                 else {"name": k, "value": git[k]} for k in sorted(git))]
        return self._container(job, "fetch", FETCH_SCRIPT, env, [{"name": "work", "mountPath": "/work"}])

    def _build_container(self, job: BuildJob, env: list[dict[str, Any]], mounts: list[dict[str, Any]]) -> dict[str, Any]:
        """buildah, and files only: no variable a RUN inherits holds a credential."""
        s = self.settings
        assert job.source is not None
        env = [*env,
               {"name": "IMAGEBOT_CONTEXT", "value": str(job.context.relative_to(job.source.root)) or "."},
               {"name": "IMAGEBOT_DOCKERFILE", "value": str(job.dockerfile.relative_to(job.source.root))},
               {"name": "IMAGEBOT_TARGET", "value": job.target or ""},
               {"name": "IMAGEBOT_BUILD_TIMEOUT", "value": str(_seconds(s.pull_timeout_seconds + s.build_timeout_seconds))}]
        mounts = [*mounts, {"name": "job", "mountPath": "/imagebot", "readOnly": True}]
        if gets_registry_auth(job):
            mounts.append({"name": "registry", "mountPath": AUTH_DIR, "readOnly": True})
            env.append({"name": "IMAGEBOT_AUTHFILE", "value": f"{AUTH_DIR}/auth.json"})
        if not self._privileged(job):
            env.append({"name": "IMAGEBOT_USERNS", "value": UNTRUSTED_USERNS})
        return self._container(job, "build", s.k8s_build_script or BUILD_SCRIPT, env, mounts)

    def _push_container(self, name: str, job: BuildJob, env: list[dict[str, Any]],
                        mounts: list[dict[str, Any]]) -> dict[str, Any]:
        """buildah push only: the build's registry credentials may be a variable here."""
        env = list(env)
        if job.push and gets_registry_auth(job):
            env.append({"name": "REGISTRY_AUTH", "valueFrom": {"secretKeyRef": {"name": name, "key": REGISTRY_KEY}}})
        script = (self.settings.k8s_push_script or PUSH_SCRIPT) if job.push else DONE_SCRIPT
        return self._container(job, "push", script, env, mounts)

    def _job_volume(self, name: str, job: BuildJob) -> dict[str, Any]:
        """The build step's files from the per-build Secret: never the token's keys."""
        items = [{"key": "build-args", "path": "build-args"}, {"key": "labels", "path": "labels"}]
        items += [{"key": f"{SECRET_KEY_PREFIX}{k}", "path": f"secrets/{k}"} for k in sorted(build_secrets(job))]
        return {"name": "job", "secret": {"secretName": name, "items": items}}

    def _privileged(self, job: BuildJob) -> bool:
        """Only a trusted build, and only when the operator opts in (IMAGEBOT_K8S_PRIVILEGED)."""
        return trusted(job) and self.settings.k8s_privileged

    def _security(self, job: BuildJob, step: str) -> dict[str, Any]:
        """The fetch step (git), and a push step that pushes nothing, need no capability. The
        build and push steps (buildah) build in a user namespace of their own with three
        capabilities, unless the operator made trusted builds privileged; a fork's never are
        (see docs/kubernetes.md)."""
        if step == "fetch" or (step == "push" and not job.push):
            return copy.deepcopy(UNTRUSTED_SECURITY)
        if self._privileged(job):
            return {"privileged": True}
        return copy.deepcopy(UNTRUSTED_BUILD_SECURITY)

    def resources(self) -> dict[str, dict[str, str]]:
        """Every container's requests and limits: IMAGEBOT_BUILD_MEMORY_MB and _CPUS, with
        K8S_RESOURCES' own values on top (e.g. smaller requests on a shared cluster)."""
        s = self.settings
        derived = {"cpu": f"{max(1, round(s.build_cpus * 1000))}m", "memory": f"{s.build_memory_mb}Mi"}
        return {key: {**derived, **s.k8s_resources.get(key, {})} for key in ("requests", "limits")}

    def deadline(self, job: BuildJob) -> int:
        """The Job's activeDeadlineSeconds: every build attempt (its pulls and its build), and
        every push attempt, after the fetch; never more than the whole build's deadline."""
        s = self.settings
        attempts = s.push_retries + 1
        natural = s.fetch_timeout_seconds + attempts * (s.pull_timeout_seconds + s.build_timeout_seconds)
        if job.push:
            natural += attempts * s.push_timeout_seconds
        return _seconds(min(natural, s.build_deadline_seconds))

    async def build(self, job: BuildJob, log: LogSink) -> str:
        """One build attempt: start (or adopt) the platform's Job and wait for its build step's
        run; the image is the platform tag itself (buildah built straight into it).

        Called again after a PullError, it patches the build's Secret with the new
        ``pull_credentials`` and waits for the build step's next run (the kubelet restarts a
        failed init container by itself, reading the Secret again)."""
        if job.source is None or job.image is None or job.build_id is None:
            raise BuildError("runtime", "the Kubernetes runtime needs the commit's source and the image name")
        if not trusted(job) and not self.settings.k8s_fork_builds:
            raise BuildError("config", FORKS_OFF)
        name = job_name(job.build_id, job.platform)
        state = self._platforms.get(job.image)
        if state is None or state.name != name:
            state = await self._start(name, job, log)
        elif state.has_registry_auth and await self._write_registry(state, job.pull_credentials):
            await log(["imagebot: registry credentials updated for the next build run"])
        return await self._build_run(state)

    async def _start(self, name: str, job: BuildJob, log: LogSink) -> _Platform:
        """Create the platform's Job (or adopt the one an earlier worker left running)."""
        state = _Platform(name, job, log)
        self._platforms[job.image] = state
        await self._write_registry(state, job.pull_credentials if state.has_registry_auth else None)
        batch = k8s.BatchV1Api(await self.api())
        existing = await self._find_job(name)
        if existing is not None and not _job_failed(existing):
            await log([f"imagebot: adopting Job {self.namespace}/{name} from an earlier attempt"])
        else:
            if existing is not None:
                await self._delete_job(name)
                await self._until_gone(name)
            await self._call(f"creating Job {name}", batch.create_namespaced_job, self.namespace,
                             self.job_manifest(name, job))
            await log([f"imagebot: Job {self.namespace}/{name} created"])
        return state

    async def _build_run(self, state: _Platform) -> str:
        """Wait for the build step's next run; its image, or why it failed."""
        def ended(pod: dict[str, Any]) -> bool:
            return (_next_run(pod, "build", state.built, init=True) is not None or _pod_over(pod)
                    or failed_fetch(pod) is not None)

        while True:
            pod = await self._until(state, ended, "its build step")
            if (fetch := failed_fetch(pod)) is not None:
                # the bot fetched the same commit a moment ago: the pod's own network is at fault
                raise BuildError("runtime", f"the pod's fetch step exited {fetch.exit_code}: "
                                            f"{sanitize(fetch.message, self._secrets(state)) or 'see the log'}")
            runs = _unseen_runs(pod, "build", state.built, init=True)
            # a run that built is the end (an adopted Job may also show a failed run before it)
            run = next((r for r in runs if r.exit_code == 0), runs[0] if runs else None)
            if run is None:
                raise BuildError("runtime", f"the pod of {state.name} ended ({pod['status']['phase']}) "
                                            "with no build run left to wait for")
            state.built = run.attempt
            # the run's log reaches the build log before anything can release the Job (which
            # stops the streams): a build without a push step is released at once
            await self._drained(state, run.attempt)
            if run.exit_code == 0:
                assert state.job.image is not None
                return state.job.image
            failure, used = self._failure(state, run)
            if not (isinstance(failure, PullError) and self._replaced(state, used)):
                raise failure
            # As with a push: the kubelet restarted the build before it saw the patched Secret;
            # that run could not have pulled, and is not an attempt.
            await state.log([f"imagebot: build run {run.attempt} had replaced credentials; waiting for the next run"])

    def _failure(self, state: _Platform, run: Termination) -> tuple[BuildError | PullError, str | None]:
        """Why a build run failed, from its termination message (the failing step, the
        engine's error lines), and the fingerprint of the credentials it had."""
        detail, used = split_auth_note(run.message)
        secrets = self._secrets(state)
        if (limited := limit_failure(run, self.settings)) is not None:
            return limited, used
        pulled = pull_failure(last_step(detail.splitlines()), _error_lines(detail), secrets)
        if pulled is not None:
            return pulled, used
        return BuildError("build", f"the build step exited {run.exit_code}: "
                                   f"{sanitize(detail, secrets) if detail else 'see the log'}"), used

    def _replaced(self, state: _Platform, used: str | None) -> bool:
        """Whether a run had registry credentials the bot has replaced since."""
        return state.has_registry_auth and used is not None and used != state.fingerprint()

    def _secrets(self, state: _Platform) -> tuple[str, ...]:
        """What must not reach a message: secret build args and the registry passwords."""
        token = state.job.source.token if state.job.source else None
        return (*masked(state.job), *((token.get_secret_value(),) if token else ()),
                *(c.password.get_secret_value() for c in state.registry.values()))

    async def tag(self, image_id: str, target: str) -> None:
        """Nothing to do: the image was built under its platform tag."""

    async def image_record(self, image_id: str) -> str | None:
        """None: the pod pushes the image it built; buildah's ``--secret`` mounts never enter it."""
        return None

    async def push(self, target: str, credentials: Credentials | None, log: LogSink) -> Pushed:
        """One push attempt: the ``push`` container's next run."""
        state = self._platforms[target]
        host = split_image(target)[0]
        if credentials is not None and state.has_registry_auth and \
                await self._write_registry(state, {host: credentials}):
            await log(["imagebot: registry credentials updated for the next push attempt"])

        def ended(pod: dict[str, Any]) -> bool:
            return _next_run(pod, "push", state.seen) is not None or _pod_over(pod)

        while True:
            pod = await self._until(state, ended, "a push attempt")
            attempt = _next_run(pod, "push", state.seen)
            if attempt is None:  # the pod is over: no run will come again
                raise RegistryError("unknown", f"the pod of {state.name} ended ({pod['status']['phase']}) "
                                               "with no push run left to wait for")
            state.seen = attempt.attempt
            detail, used = split_auth_note(attempt.message)
            if attempt.exit_code == 0 or used is None or used == state.fingerprint():
                break
            # The kubelet restarted the container before it saw the patched Secret: that run
            # could not have worked, and is not an attempt. The next run (after the kubelet's
            # back-off) gets the new credentials.
            await log([f"imagebot: push run {attempt.attempt} had replaced credentials; waiting for the next run"])
        secrets = masked(state.job) + ((credentials.password.get_secret_value(),) if credentials else ())
        if attempt.exit_code != 0:
            raise RegistryError.of(detail or f"the push step exited {attempt.exit_code}", secrets=secrets)
        digest = attempt.message.strip()
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise RegistryError("unknown", f"the push step reported no digest: {sanitize(digest, secrets)}")
        return Pushed(digest, await self._size(state, digest, credentials, log))

    async def _size(self, state: _Platform, digest: str, credentials: Credentials | None, log: LogSink) -> int:
        """The pushed manifest's size, read from the registry with the newest credentials (the
        push has succeeded: a failure to read its size must not make it an attempt to repeat,
        since the pod will not push again)."""
        assert state.job.image is not None
        host, repository = split_image(state.job.image.rpartition(":")[0])
        credentials = state.registry.get(host, credentials)
        registry = RegistryClient(host, _Fixed(credentials) if credentials else None)
        try:
            return (await registry.describe(repository, digest, "")).size
        except RegistryError as exc:
            await log([f"imagebot: pushed, but the size of {digest} could not be read: {exc.kind}"])
            return 0
        finally:
            await registry.aclose()

    async def release(self, target: str) -> None:
        """Delete the platform's Job (its pod with it) and Secret (its registry credentials with it)."""
        state = self._platforms.pop(target, None)
        if state is None:
            return
        for task in state.followers.values():
            task.cancel()
        await self._delete_job(state.name)
        core = k8s.CoreV1Api(await self.api())
        await self._call(f"deleting Secret {state.name}", core.delete_namespaced_secret, state.name,
                         self.namespace, allow=(404,))

    # -- watching ---------------------------------------------------------------------------

    async def _find_job(self, name: str) -> dict[str, Any] | None:
        batch = k8s.BatchV1Api(await self.api())
        return await self._call(f"reading Job {name}", batch.read_namespaced_job, name, self.namespace, allow=(404,))

    async def _delete_job(self, name: str) -> None:
        batch = k8s.BatchV1Api(await self.api())
        await self._call(f"deleting Job {name}", batch.delete_namespaced_job, name, self.namespace,
                         propagation_policy="Background", grace_period_seconds=0, allow=(404,))

    async def _until_gone(self, name: str) -> None:
        deadline = time.monotonic() + 60
        while await self._find_job(name) is not None and time.monotonic() < deadline:
            await asyncio.sleep(self.settings.k8s_poll_seconds)

    async def _pod(self, name: str) -> dict[str, Any] | None:
        core = k8s.CoreV1Api(await self.api())
        pods = await self._call(f"listing the pods of Job {name}", core.list_namespaced_pod, self.namespace,
                                label_selector=f"job-name={name}")
        live = [p for p in pods["items"] if not p["metadata"].get("deletionTimestamp")]
        return max(live, key=lambda p: p["metadata"]["creationTimestamp"]) if live else None

    async def _until(self, state: _Platform, done: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
        """Poll the Job's pod until ``done`` says so; fail clearly if it can never happen."""
        since = podless = time.monotonic()
        while True:
            pod = await self._pod(state.name)
            if pod is not None:
                podless = time.monotonic()
                self._follow(state, pod)
                if _pod_over(pod) and (job := await self._find_job(state.name)) is not None:
                    raise_if_failed(state.name, job)
                if done(pod):
                    return pod
                if reason := stuck_reason(pod):
                    if never_heals(reason) or time.monotonic() - since > self.settings.k8s_schedule_timeout_seconds:
                        raise BuildError("runtime", f"the pod of {state.name} cannot start: {reason}")
                if (why := unschedulable(pod)) and time.monotonic() - since > self.settings.k8s_schedule_timeout_seconds:
                    raise BuildError("unschedulable", f"no node runs {state.job.platform} "
                                                      f"(waited {self.settings.k8s_schedule_timeout_seconds:.0f} s): {why}")
            else:
                job = await self._find_job(state.name)
                if job is None:
                    raise BuildError("runtime", f"Job {state.name} is gone (deleted by someone else?)")
                raise_if_failed(state.name, job)  # e.g. past its deadline: its pod was deleted
                if time.monotonic() - podless > self.settings.k8s_schedule_timeout_seconds:
                    raise BuildError("unschedulable", f"Job {state.name} made no pod in "
                                                      f"{self.settings.k8s_schedule_timeout_seconds:.0f} s")
            await asyncio.sleep(self.settings.k8s_poll_seconds)

    def _follow(self, state: _Platform, pod: dict[str, Any]) -> None:
        """Stream each run of the build step's log into the build log, once it has started
        (a run after a refused base image pull is followed too)."""
        status = container_status(pod, "build", init=True)
        if not status:
            return
        current = status.get("state") or {}
        run = status.get("restartCount", 0) + 1
        if run > max(state.followers, default=0) and (current.get("running") or current.get("terminated")):
            state.followers[run] = asyncio.create_task(self._stream(state, pod["metadata"]["name"], "build"))

    async def _drained(self, state: _Platform, run: int) -> None:
        """Let a failed run's log reach the build log before the failure ends the platform
        (which stops the streams): the log is what people read to see why."""
        task = state.followers.get(run)
        if task is not None:
            await asyncio.wait({task}, timeout=LOG_DRAIN_SECONDS)

    async def _stream(self, state: _Platform, pod_name: str, container: str) -> None:
        core = k8s.CoreV1Api(await self.api())
        try:
            response = await core.read_namespaced_pod_log(pod_name, self.namespace, container=container,
                                                          follow=True, _preload_content=False)
            async for raw in response.content:  # the sink masks secrets and batches the writes
                await state.log([raw.decode("utf-8", "replace").rstrip("\n")])
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a lost log stream must not fail the build
            log.warning("log stream of %s/%s ended: %s", pod_name, container, exc)


class _Fixed:
    """Credentials as RegistryClient asks for them, fixed for one call."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials

    async def get(self) -> Credentials:
        return self._credentials


def _unseen_runs(pod: dict[str, Any], container: str, seen: int, init: bool = False) -> list[Termination]:
    """The ended runs of ``container`` that were not handed to the pipeline yet, oldest first."""
    return [t for t in terminations(container_status(pod, container, init)) if t.attempt > seen]


def _next_run(pod: dict[str, Any], container: str, seen: int, init: bool = False) -> Termination | None:
    """The first ended run of ``container`` that was not handed to the pipeline yet."""
    return next(iter(_unseen_runs(pod, container, seen, init)), None)


def _pod_over(pod: dict[str, Any]) -> bool:
    """No container of the pod will run again."""
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def _error_lines(detail: str) -> str:
    """A failed build's termination message without its step line: the engine's error."""
    lines = [line for line in detail.splitlines() if not is_step(line)]
    return "\n".join(lines).strip().removeprefix("Error: ")


def raise_if_failed(name: str, job: dict[str, Any]) -> None:
    """A Job the controller has failed: past its deadline (kind ``timeout``) or otherwise."""
    for cond in job.get("status", {}).get("conditions") or []:
        if cond["type"] == "Failed" and cond["status"] == "True":
            if cond.get("reason") == "DeadlineExceeded":
                raise BuildError("timeout", f"Job {name} ran past its deadline of "
                                            f"{job['spec'].get('activeDeadlineSeconds')} s (activeDeadlineSeconds, from "
                                            "IMAGEBOT_BUILD_DEADLINE_SECONDS and the build, pull and push timeouts)")
            raise BuildError("runtime", f"Job {name} failed: {cond.get('message') or cond.get('reason') or 'failed'}")


def _job_failed(job: dict[str, Any]) -> str | None:
    for cond in job.get("status", {}).get("conditions") or []:
        if cond["type"] == "Failed" and cond["status"] == "True":
            return cond.get("message") or cond.get("reason") or "failed"
    return None


def _api_message(body: Any) -> str:
    try:
        return str(json.loads(body).get("message", ""))[:300]
    except (TypeError, ValueError, AttributeError):
        return str(body)[:300]
