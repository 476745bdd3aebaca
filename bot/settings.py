"""All of imagebot's configuration, in one object.

Settings are read once, at start-up, from ``IMAGEBOT_*`` environment variables (and an optional
``.env`` file) and then passed down explicitly; nothing deeper in the code reads the environment.
Secrets are ``SecretStr`` so that a settings object can be logged or shown in a traceback
without leaking them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from bot.repositories import EVERYTHING, pattern_problem

#: ``os/arch[/variant]`` as Docker and the OCI image index spell platforms.
_PLATFORM = re.compile(r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$")
#: ``host[:port][/namespace...]``: a registry host, optionally with a path prefix for images.
_REGISTRY = re.compile(
    r"^(?P<host>[A-Za-z0-9.-]+|\[[0-9A-Fa-f:]+\])(:(?P<port>[0-9]{1,5}))?"
    r"(?P<namespace>(/[a-z0-9]+([._-][a-z0-9]+)*)*)$"
)

#: A repository glob of IMAGEBOT_IMAGE_POLICY: path segments of letters, digits, ``._-`` and
#: ``*`` (``**`` alone for any number of segments).
_IMAGE_PREFIX = re.compile(
    r"^([A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*|\[[0-9A-Fa-f:]+\])(:[0-9]{1,5})?"
    r"(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)+/?$"
)
_NAMESPACE = re.compile(r"^/?[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*(/[a-z0-9]+(([._]|__|-+)[a-z0-9]+)*)*/?$")


#: Transports git may be allowed to use (``IMAGEBOT_GIT_PROTOCOLS``); never ``ext``.
GIT_PROTOCOLS = ("https", "http", "ssh", "git", "file")


def web_url_for_api(api_url: str) -> str:
    """GitHub's web URL for its API URL: ``https://api.github.com`` → ``https://github.com``,
    GitHub Enterprise Server's ``https://host/api/v3`` → ``https://host``; any other API URL
    (a proxy, a test stand-in) is taken as the web URL too."""
    api_url = api_url.rstrip("/")
    scheme, _, rest = api_url.partition("://")
    if rest.lower() == "api.github.com":
        return f"{scheme}://github.com"
    return api_url.removesuffix("/api/v3")


#: A Docker network name, as the engine accepts them.
_NETWORK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class SettingsError(Exception):
    """Settings that cannot start the bot; ``problems`` lists every one of them."""

    kind = "settings"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))


class Settings(BaseSettings):
    """Every knob of imagebot. Field names map to ``IMAGEBOT_<NAME>`` environment variables."""

    model_config = SettingsConfigDict(
        env_prefix="IMAGEBOT_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        frozen=True,
    )

    # Storage. A URL may carry a password, so it is a secret too.
    database_url: SecretStr = SecretStr("sqlite:///./imagebot.db")

    # Ingress.
    github_webhook_secret: SecretStr | None = None
    gitlab_webhook_token: SecretStr | None = None
    max_payload_bytes: int = Field(default=25 * 1024 * 1024, ge=1024)

    # Forges.
    github_api_url: str = "https://api.github.com"
    #: GitHub's web address, which every clone URL must be under; unset: derived from the API
    #: URL (``github_web_url``): api.github.com → github.com, ``https://host/api/v3`` → host.
    github_url: str | None = None
    github_token: SecretStr | None = None
    github_app_id: int | None = Field(default=None, gt=0)
    github_private_key: SecretStr | None = None
    github_private_key_path: Path | None = None
    gitlab_url: str = "https://gitlab.com"
    gitlab_api_token: SecretStr | None = None
    #: The repositories served (bot.repositories): globs, ``*`` one path segment, ``**`` any
    #: number, optionally ``github:``/``gitlab:``-prefixed; deliveries for others are ignored.
    repositories: Annotated[list[str], NoDecode] = [EVERYTHING]
    #: The transports git may use (GIT_ALLOW_PROTOCOL); clone URLs from webhooks are further
    #: held to the forge's own URL. ``ext`` (run any command) is never allowed.
    git_protocols: Annotated[list[str], NoDecode] = ["https", "http"]

    # Reporting (commit statuses, check runs).
    #: The status context / check run name; pull request builds add " (pull_request)".
    report_context: str = Field(default="imagebot", min_length=1, max_length=100)
    #: Interim check-run updates of one build are at most this often (GitHub's secondary rate
    #: limits allow about 80 content-creating requests a minute per installation).
    report_interval_seconds: float = Field(default=5.0, ge=0)
    #: Content-creating requests per forge and minute, and per hour, across all builds of this
    #: process (GitHub's secondary rate limits: 80 a minute, 500 an hour).
    report_requests_per_minute: int = Field(default=60, ge=1)
    report_requests_per_hour: int = Field(default=450, ge=1)
    report_retry_initial_seconds: float = Field(default=1.0, ge=0)
    report_retry_max_seconds: float = Field(default=300.0, ge=0)
    #: Attempts at a report the forge keeps refusing for a reason retrying may mend (auth,
    #: not found); 5xx, rate limits and network faults are retried for as long as it takes.
    report_max_attempts: int = Field(default=12, ge=1)
    #: Reports that ended (sent, coalesced, dropped) are kept this long for whoever asks what
    #: the forge was told, then deleted (about four rows a build would otherwise pile up).
    report_retention_hours: float = Field(default=168.0, gt=0)

    # Registry.
    registry: str | None = None
    registry_username: str | None = None
    registry_password: SecretStr | None = None
    registry_credential_helper: str | None = None
    #: A file holding the registry password (a mounted secret); read again on every refresh.
    registry_password_file: Path | None = None
    #: Manifest list format: a Docker manifest list or an OCI image index.
    manifest_format: Literal["docker", "oci"] = "docker"
    #: Credentials for registries other than IMAGEBOT_REGISTRY's host: a Docker config.json
    #: (``auths`` and ``credHelpers`` per host); a host it does not name gets no credentials.
    registry_auth_file: Path | None = None
    #: Where images may go beyond each repository's default (JSON): repository glob (``*`` one
    #: path segment, ``**`` any number; optionally ``github:``/``gitlab:`` first) -> image
    #: prefixes (``host[:port]/path``), each allowing itself and names below it.
    image_policy: dict[str, list[str]] = {}
    #: The path under IMAGEBOT_REGISTRY of each forge's images (JSON, e.g.
    #: ``{"github": "gh", "gitlab": "gl"}``); see :func:`forge_namespace`.
    image_namespaces: dict[Literal["github", "gitlab"], str] = {}

    # Pushing and publishing: retries with exponential backoff and jitter.
    push_retries: int = Field(default=3, ge=0, le=20)
    retry_initial_seconds: float = Field(default=1.0, ge=0)
    retry_max_seconds: float = Field(default=30.0, ge=0)

    # Builds.
    platforms: Annotated[list[str], NoDecode] = ["linux/amd64"]
    public_url: str = "http://localhost:8000"
    #: Bearer token for POST /api/builds/{id}/rebuild and /cancel; unset: those answer 503.
    admin_token: SecretStr | None = None

    #: The operator's build secrets (JSON or YAML: repository glob -> {NAME: value or
    #: NAME_FILE: path}, bot.pipeline.secrets); read at start-up and again for every build.
    build_secrets_file: Path | None = None

    # The status page and its API: who reads what.
    #: Bearer token (or the dashboard's login) for reading private repositories' builds; the
    #: admin token counts as one. Unset: private builds are shown to the admin token only.
    read_token: SecretStr | None = None
    #: Every read (API, streams, dashboard) needs the read token, public repositories too.
    status_private: bool = False
    #: GET /metrics needs the read token too.
    metrics_private: bool = False
    #: Hours a dashboard login lasts.
    session_hours: float = Field(default=12.0, gt=0, le=24 * 30)
    #: Live streams (SSE) open at once in this process, and per client address.
    stream_max: int = Field(default=256, ge=1)
    stream_max_per_client: int = Field(default=8, ge=1)
    #: The most of one build's log that is stored; past either, one marker line ends it.
    log_max_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    log_max_lines: int = Field(default=100_000, ge=10)

    # Pipeline.
    #: Where checkouts go while a build runs (removed afterwards); default: the system temp dir.
    work_dir: Path | None = None
    fetch_timeout_seconds: float = Field(default=300.0, gt=0)
    build_timeout_seconds: float = Field(default=3600.0, gt=0)
    #: One push attempt; a registry that accepts connections but never answers would
    #: otherwise hold the engine (and the build) forever.
    push_timeout_seconds: float = Field(default=600.0, gt=0)
    #: Platforms of one build that build at the same time.
    platform_parallelism: int = Field(default=2, ge=1, le=16)
    #: One base-image pull (a registry that accepts connections and never answers would hold
    #: the build, and with it a worker slot, forever).
    pull_timeout_seconds: float = Field(default=600.0, gt=0)
    #: The whole build, fetch to manifest list, retries included; past it: failed, ``timeout``
    #: (the Kubernetes Job's activeDeadlineSeconds is at most this).
    build_deadline_seconds: float = Field(default=7200.0, gt=0)
    #: Each platform build's containers (Docker) or Job (Kubernetes): memory (no swap on top)
    #: and CPU cores; the defaults leave the bot and the engine their share of the machine.
    build_memory_mb: int = Field(default=4096, ge=16)
    build_cpus: float = Field(default=1.0, gt=0, le=256)
    #: The network the RUN steps of untrusted builds (forks' pull requests) get on the Docker
    #: runtime: ``none``, or a named network the operator made; unset: the engine's default
    #: bridge, like every other build.
    untrusted_network: str | None = None

    # Runtime: where each platform is built and pushed.
    runtime: Literal["docker", "kubernetes"] = "docker"
    #: The namespace of the build Jobs (the bot needs jobs, pods, pods/log and secrets there).
    k8s_namespace: str = "imagebot-builds"
    #: A kubeconfig file; unset: the in-cluster config of the bot's own ServiceAccount.
    k8s_kubeconfig: Path | None = None
    k8s_context: str | None = None
    #: An image with sh, git and buildah (the default: buildah's own).
    k8s_builder_image: str = "quay.io/buildah/stable:v1.28"
    k8s_image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    #: Shell scripts the builder runs instead of the built-in buildah ones; they get the job in
    #: IMAGEBOT_* environment variables (see docs/kubernetes.md).
    k8s_build_script: str | None = None
    k8s_push_script: str | None = None
    #: Trusted builds' buildah steps run privileged: the operator's opt-in (a privileged build
    #: can leave its chroot and read the node, other builds' Secrets included). Off (the
    #: default), every build runs buildah in a user namespace of its own with three
    #: capabilities, as forks' builds always do (docs/kubernetes.md, "Isolation").
    k8s_privileged: bool = False
    #: Trusted builds only: a fork's pod is never on the host network.
    k8s_host_network: bool = False
    #: Build pull requests from forks on the cluster (unprivileged pods, no token, credentials,
    #: secrets or host network); off: such builds fail at once, saying so.
    k8s_fork_builds: bool = True
    k8s_service_account: str | None = None
    #: Per platform, e.g. {"linux/arm64": {"kubernetes.io/arch": "arm64"}} (JSON).
    k8s_node_selectors: dict[str, dict[str, str]] = {}
    #: The builder container's resources, e.g. {"requests": {"cpu": "1", "memory": "2Gi"}} (JSON).
    k8s_resources: dict[str, dict[str, str]] = {}
    #: A platform whose pod no node takes within this fails with kind ``unschedulable``.
    k8s_schedule_timeout_seconds: float = Field(default=120.0, gt=0)
    #: Pull from and push to plain-HTTP / self-signed registries (buildah --tls-verify=false).
    k8s_registry_tls_verify: bool = True
    k8s_poll_seconds: float = Field(default=1.0, gt=0)
    #: A directory on every build node under which trusted builds keep buildah's storage
    #: between builds (one subdirectory per image repository and platform, a hostPath volume),
    #: so a rebuild reuses its layers (buildah --layers); unset: no layer cache.
    k8s_layer_cache_dir: str | None = None

    # Worker.
    concurrency: int = Field(default=2, ge=1, le=64)
    lease_seconds: float = Field(default=30.0, ge=1.0)
    max_attempts: int = Field(default=3, ge=1)
    poll_seconds: float = Field(default=1.0, gt=0)
    shutdown_grace_seconds: float = Field(default=20.0, ge=0)
    #: For exercising the queue alone: builds take this long and succeed (0: run the pipeline).
    placeholder_build_seconds: float = Field(default=0.0, ge=0)

    # Retention (bot.retention): builds and their telemetry events are kept.
    #: Days a build's log is kept after the build ended (0: forever).
    log_retention_days: float = Field(default=90.0, ge=0)
    #: Days a webhook delivery record is kept; at least 4, since GitHub lets a delivery be
    #: redelivered for three days and a redelivery must still be recognised.
    delivery_retention_days: float = Field(default=30.0, ge=4)

    @field_validator("platforms")
    @classmethod
    def _check_platforms(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one platform is needed, e.g. linux/amd64")
        bad = [p for p in value if not _PLATFORM.match(p)]
        if bad:
            raise ValueError(f"not os/arch[/variant]: {', '.join(bad)}")
        return list(dict.fromkeys(value))

    @field_validator("platforms", "repositories", "git_protocols", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [p.strip() for p in value.split(",") if p.strip()]
        return value

    @field_validator("repositories")
    @classmethod
    def _check_repositories(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"give at least one repository glob ({EVERYTHING} serves every repository)")
        problems = [p for p in map(pattern_problem, value) if p]
        if problems:
            raise ValueError("; ".join(problems))
        return list(dict.fromkeys(value))

    @field_validator("git_protocols")
    @classmethod
    def _check_git_protocols(cls, value: list[str]) -> list[str]:
        value = [p.lower() for p in value]
        bad = [p for p in value if p not in GIT_PROTOCOLS]
        if bad or not value:
            raise ValueError(f"choose from {', '.join(GIT_PROTOCOLS)} (ext runs commands and is never allowed)")
        return list(dict.fromkeys(value))

    @field_validator("registry")
    @classmethod
    def _check_registry(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        value = value.strip().rstrip("/")
        if "://" in value:
            raise ValueError("give host[:port][/namespace] without a scheme, e.g. ghcr.io/acme")
        match = _REGISTRY.match(value)
        if not match or (match["port"] and not 0 < int(match["port"]) < 65536):
            raise ValueError(f"{value!r} is not host[:port][/namespace]")
        return value

    @field_validator("image_policy")
    @classmethod
    def _check_image_policy(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        problems = []
        for glob, prefixes in value.items():
            if problem := pattern_problem(glob):
                problems.append(problem)
            problems += [
                f"{glob!r}: {prefix!r} is not an image prefix host[:port]/path"
                for prefix in prefixes if not _IMAGE_PREFIX.match(prefix) or not _has_host(prefix)
            ]
        if problems:
            raise ValueError("; ".join(problems))
        return {glob: [p.lower().rstrip("/") for p in prefixes] for glob, prefixes in value.items()}

    @field_validator("image_namespaces")
    @classmethod
    def _check_image_namespaces(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [f"{forge}: {ns!r}" for forge, ns in value.items() if ns and not _NAMESPACE.match(ns)]
        if bad:
            raise ValueError(f"not a path of lower-case components: {', '.join(bad)}")
        return {forge: ns.strip("/") for forge, ns in value.items()}

    @field_validator("untrusted_network")
    @classmethod
    def _check_untrusted_network(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        value = value.strip()
        if value == "host" or value.startswith("container:") or not _NETWORK.match(value):
            raise ValueError("give none, bridge or the name of a Docker network (never host or container:...)")
        return value

    @field_validator("k8s_layer_cache_dir")
    @classmethod
    def _check_layer_cache_dir(cls, value: str | None) -> str | None:
        if value is None or value.strip() == "":
            return None
        value = value.strip().rstrip("/")
        if not value.startswith("/") or "\n" in value or "/../" in f"{value}/" or value == "":
            raise ValueError("give an absolute directory on the nodes, e.g. /var/lib/imagebot/layer-cache")
        return value

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: SecretStr) -> SecretStr:
        try:
            url = make_url(value.get_secret_value())
        except ArgumentError:
            raise ValueError("not a database URL, e.g. sqlite:///./imagebot.db") from None
        if url.get_backend_name() not in ("sqlite", "postgresql"):
            raise ValueError("only sqlite:// and postgresql:// URLs are supported")
        return value

    @field_validator("github_api_url", "github_url", "gitlab_url", "public_url")
    @classmethod
    def _check_http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL")
        return value.rstrip("/")

    @property
    def github_web_url(self) -> str:
        """Where GitHub's repositories live, the prefix every GitHub clone URL must have."""
        return self.github_url or web_url_for_api(self.github_api_url)

    @model_validator(mode="after")
    def _check_combinations(self) -> Settings:
        problems = []
        if self.github_app_id is not None:
            if self.github_private_key is None and self.github_private_key_path is None:
                problems.append(
                    "IMAGEBOT_GITHUB_APP_ID needs IMAGEBOT_GITHUB_PRIVATE_KEY or "
                    "IMAGEBOT_GITHUB_PRIVATE_KEY_PATH"
                )
            if self.github_token is not None:
                problems.append(
                    "set either IMAGEBOT_GITHUB_TOKEN or IMAGEBOT_GITHUB_APP_ID, not both"
                )
        elif self.github_private_key or self.github_private_key_path:
            problems.append("a GitHub private key is set but IMAGEBOT_GITHUB_APP_ID is not")
        if self.github_private_key and self.github_private_key_path:
            problems.append(
                "set either IMAGEBOT_GITHUB_PRIVATE_KEY or IMAGEBOT_GITHUB_PRIVATE_KEY_PATH, not both"
            )
        path = self.github_private_key_path
        if path is not None and not path.is_file():
            problems.append(f"IMAGEBOT_GITHUB_PRIVATE_KEY_PATH: no file at {path}")
        if self.registry_password is not None and self.registry_username is None:
            problems.append("IMAGEBOT_REGISTRY_PASSWORD needs IMAGEBOT_REGISTRY_USERNAME")
        if self.registry_username is not None and not (
            self.registry_password or self.registry_password_file
        ):
            problems.append(
                "IMAGEBOT_REGISTRY_USERNAME needs IMAGEBOT_REGISTRY_PASSWORD or "
                "IMAGEBOT_REGISTRY_PASSWORD_FILE"
            )
        sources = [
            name for name, value in (
                ("IMAGEBOT_REGISTRY_PASSWORD", self.registry_password),
                ("IMAGEBOT_REGISTRY_PASSWORD_FILE", self.registry_password_file),
                ("IMAGEBOT_REGISTRY_CREDENTIAL_HELPER", self.registry_credential_helper),
            ) if value
        ]
        if len(sources) > 1:
            problems.append(f"use only one of {', '.join(sources)}")
        if self.registry_password_file and not self.registry_username:
            problems.append("IMAGEBOT_REGISTRY_PASSWORD_FILE needs IMAGEBOT_REGISTRY_USERNAME")
        problems += self._namespace_problems()
        if self.registry_credential_helper and not re.match(r"^[A-Za-z0-9_.-]+$", self.registry_credential_helper):
            problems.append("IMAGEBOT_REGISTRY_CREDENTIAL_HELPER is a helper name, e.g. ecr-login")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _check_build_secrets_file(self) -> Settings:
        """A secrets file that cannot be used stops start-up (its problems never show a value)."""
        if self.build_secrets_file is not None:
            from bot.pipeline import secrets

            try:
                secrets.load(self.build_secrets_file)
            except secrets.SecretsFileError as exc:
                raise ValueError(exc.message) from None
        return self

    def _namespace_problems(self) -> list[str]:
        """Two forges serving images from one namespace could publish over each other
        (GitHub ``acme/app`` and GitLab ``acme/app``): with both configured, refuse that."""
        if not (self.github_webhook_secret and self.gitlab_webhook_token):
            return []
        github, gitlab = forge_namespace(self, "github"), forge_namespace(self, "gitlab")
        if github == gitlab:
            return [
                f"IMAGEBOT_IMAGE_NAMESPACES: GitHub and GitLab would both put images under "
                f"{self.registry or 'the registry'}/{github}; give each forge its own namespace, "
                'e.g. {"github": "gh", "gitlab": "gl"}'
            ]
        return []

    @property
    def database_url_for_display(self) -> str:
        """The database URL with any password masked, for logs and start-up banners."""
        return make_url(self.database_url.get_secret_value()).render_as_string(
            hide_password=True
        )


def _has_host(image: str) -> bool:
    """Whether docker reads the first component of ``image`` as a registry host."""
    first = image.split("/", 1)[0]
    return "." in first or ":" in first or first == "localhost"


def forge_namespace(settings: Settings, forge: str) -> str:
    """The path under IMAGEBOT_REGISTRY where ``forge``'s images go ("" for directly below).

    The operator's IMAGEBOT_IMAGE_NAMESPACES wins; otherwise GitHub's is "" and GitLab's is
    "" too unless GitHub is configured as well, when it is ``gitlab``: a GitLab ``acme/app``
    must not land on GitHub's ``acme/app``. (bot.pipeline.tags keeps a GitHub repository out
    of a namespace nested in its own, e.g. an owner called ``gitlab``.)
    """
    if forge in settings.image_namespaces:
        return settings.image_namespaces[forge]  # type: ignore[index]
    if forge == "gitlab" and settings.github_webhook_secret and settings.gitlab_webhook_token:
        return "gitlab"
    return ""


def _describe(error: dict) -> list[str]:
    """One human line per problem, named by the environment variable a user would set."""
    loc = [str(part) for part in error.get("loc", ()) if not isinstance(part, int)]
    message = error.get("msg", "invalid")
    message = message.removeprefix("Value error, ")
    if not loc:  # a whole-object check: already names its variables
        return [part.strip() for part in message.split(";")]
    return [f"IMAGEBOT_{loc[0].upper()}: {message}"]


def load_settings(**overrides: object) -> Settings:
    """Read settings, or raise :class:`SettingsError` naming every problem at once."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = [line for error in exc.errors() for line in _describe(error)]
        raise SettingsError(problems) from None
