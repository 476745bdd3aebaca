"""A stand-in for the slice of GitLab's REST API (v4) that imagebot calls: commit statuses.

Tests cannot reach GitLab, and a mock that accepts anything would let the bot drift away from
the real contract unnoticed.  This stand-in serves ``POST /api/v4/projects/:id/statuses/:sha``
(GitLab's "Set the pipeline status of a commit") over a real TCP socket, so the bot's real HTTP
stack is exercised, and it holds both sides to GitLab's *official* API description, the
operation cut into ``tests/data/gitlab/api-subset.json`` (see the README next to it):

* every request's parameters are validated against the operation's documented body schema,
  after the coercions GitLab's Grape layer applies; a breach gets GitLab's own 400
  (``{"error": "state does not have a valid value"}``) and is recorded in
  :attr:`GitLabStandIn.violations`;
* every 201 reply is validated against the documented ``API_Entities_CommitStatus`` before it
  is sent; a mismatch is a bug in the stand-in and turns into a loud 500 plus a violation.

Beyond the schema it mirrors what GitLab's source does for this endpoint
(``lib/api/commit_statuses.rb`` and ``app/services/ci/create_commit_status_service.rb`` in
gitlabhq/gitlabhq): the order of checks (route, body parsing, 401, parameter 400, project 404,
role 403, commit 404, ...), the error bodies, the model's 255-character limits, and the status state
machine -- a pending or running status with the same (pipeline, ref, name) is *updated* and
refuses impossible transitions with ``400 {"message": "Cannot transition status via :run from
:running (Reason(s): ...)"}``, while a finished one is *replaced by a new status* (new id).

Typical use::

    with GitLabStandIn(tokens={"glpat-t0k"}, projects={42: "group/sub/image"}) as gitlab:
        ...  # point the bot at gitlab.url (the API lives under gitlab.url + "/api/v4")
        assert gitlab.history(42, sha, "imagebot/build") == ["pending", "running", "success"]
        gitlab.assert_no_violations()

For many tests, keep one running instance per module and call :meth:`GitLabStandIn.reset`
before each test.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import itertools
import json
import re
import secrets
import threading
import time
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import formatdate
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from jsonschema import Draft4Validator, FormatChecker
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.standins._shared import Fault, ForgeStandIn, ThreadedServer, Violation

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "data" / "gitlab" / "api-subset.json"
OPERATION_KEY = "POST /api/v4/projects/{id}/statuses/{sha}"

DOCS = "https://docs.gitlab.com/api/commits/#set-the-pipeline-status-of-a-commit"
RATE_LIMIT_DOCS = "https://docs.gitlab.com/administration/settings/user_and_ip_rate_limits/#response-headers"

# Roles that may create commit statuses (``authorize! :create_commit_status``: Developer and up).
ROLES = ("guest", "reporter", "developer", "maintainer", "owner")
WRITE_ROLES = frozenset({"developer", "maintainer", "owner"})
# ``validates :ref, :target_url, :description, length: { maximum: 255 }`` (CommitStatus model),
# also stated on the docs page; the OpenAPI description does not carry it.
MAX_LENGTH = 255
TOO_LONG = f"is too long (maximum is {MAX_LENGTH} characters)"
URL_BLOCKED = "is blocked: Only allowed schemes are http, https"  # AddressableUrlValidator
# GitLab.com job ids passed 2**31 long ago (ci_builds.id had to become bigint); starting above
# it catches ids squeezed into 32-bit columns -- the description still says ``format: int32``.
FIRST_JOB_ID = 2**31 + 1
FIRST_PIPELINE_ID = 1_900_000_001
# The Entities::CommitStatus fields GitLab leaves null until they are set; the Swagger 2.0
# description has no way to say so (see README: "nullable in practice").
NULLABLE_IN_PRACTICE = ("ref", "target_url", "description", "started_at", "finished_at", "coverage")
JSON_CT = "application/json"
# Grape::Exceptions::InvalidMessageBody, as Grape composes it (problem + resolution).
INVALID_JSON_TEXT = (
    "\nProblem:\n  message body does not match declared format\nResolution:\n  when specifying "
    "application/json as content-type, you must pass valid application/json in the request's 'body' "
)
THROTTLED_TEXT = "Retry later\n"  # Gitlab::Throttle::DEFAULT_RATE_LIMITING_RESPONSE_TEXT + "\n"
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_ULID_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_INTEGER_ID = re.compile(r"-?\d+")  # API::Helpers INTEGER_ID_REGEX


# --------------------------------------------------------------------------- schemas


FORMATS = FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _is_rfc3339(value: object) -> bool:
    """``date-time`` with a zone; jsonschema skips the format without rfc3339-validator."""
    if not isinstance(value, str):
        return True
    return "T" in value.upper() and datetime.fromisoformat(value).tzinfo is not None


def response_schema_in_practice(schema: dict[str, Any]) -> dict[str, Any]:
    """The documented response schema with :data:`NULLABLE_IN_PRACTICE` fields allowed to be null.

    Swagger 2.0 cannot express null, yet GitLab's own docs example answers ``"description":
    null, "target_url": null, "started_at": null``.  Only those top-level fields change.
    """
    out = copy.deepcopy(schema)
    for name in NULLABLE_IN_PRACTICE:
        prop = out.get("properties", {}).get(name)
        if prop is not None and "type" in prop:
            prop["type"] = [prop["type"], "null"]
    return out


@dataclass(frozen=True)
class Operation:
    """The documented operation: where it lives, its parameters and body/response validators."""

    method: str
    path: str  # the OpenAPI template
    operation_id: str
    route: re.Pattern[str]  # the template with each {param} as GitLab's ``[^/]+``
    request_schema: dict[str, Any]
    request: Draft4Validator
    responses: dict[int, Draft4Validator | None]


def load_operation(path: Path = SCHEMA_FILE) -> Operation:
    """Read api-subset.json into an :class:`Operation`."""
    spec = json.loads(path.read_text())[OPERATION_KEY]
    method, template = OPERATION_KEY.split(" ", 1)
    pattern = "^" + re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$"
    Draft4Validator.check_schema(spec["request"])
    responses: dict[int, Draft4Validator | None] = {}
    for code, schema in spec["responses"].items():
        if schema is not None:
            schema = response_schema_in_practice(schema)
            Draft4Validator.check_schema(schema)
        responses[int(code)] = Draft4Validator(schema, format_checker=FORMATS) if schema else None
    return Operation(
        method=method, path=template, operation_id=spec["operationId"], route=re.compile(pattern),
        request_schema=spec["request"],
        request=Draft4Validator(spec["request"], format_checker=FORMATS),
        responses=responses,
    )


class _Invalid:
    """A value Grape could not coerce to the declared type (kept as sent, so the schema's type
    check fails on it)."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _coerce(value: Any, declared: str) -> Any:
    """Grape's coercion for a ``type: String | Float | Integer`` parameter.

    Strings take any scalar (``5`` -> ``"5"``) but not arrays or hashes; for other types an
    empty string means "absent" (Grape's ``treat_as_nil?``).
    """
    if declared == "string":
        if isinstance(value, (list, dict)):
            return _Invalid(value)
        if isinstance(value, bool):
            return "true" if value else "false"
        return value if isinstance(value, str) else json.dumps(value)
    if value == "":
        return None
    if isinstance(value, bool) or isinstance(value, (list, dict)):
        return _Invalid(value)
    if declared == "number":
        if isinstance(value, (int, float)):
            return float(value)
        try:
            number = float(str(value).strip())
        except ValueError:
            return _Invalid(value)
        return number if number == number and abs(number) != float("inf") else _Invalid(value)
    if declared == "integer":
        if isinstance(value, int):
            return value
        if isinstance(value, float):
            return int(value) if value.is_integer() else _Invalid(value)
        text = str(value).strip()
        return int(text, 10) if re.fullmatch(r"[+-]?\d+", text) else _Invalid(value)
    return value


def grape_param_errors(schema: Mapping[str, Any], params: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Coerce ``params`` like Grape, validate them against the documented body ``schema``, and
    return (coerced params, Grape-worded errors in declaration order).

    ``X is missing`` (presence), ``X is invalid`` (coercion/type), ``X does not have a valid
    value`` (``values:``, the schema's enum).  A missing required param with an enum gets both
    of the first and last, as Grape's ValuesValidator also runs on a required nil.
    """
    properties: dict[str, Any] = schema.get("properties", {})
    required = set(schema.get("required", []))
    coerced: dict[str, Any] = {}
    for name, value in params.items():
        prop = properties.get(name)
        if prop is None:
            continue  # Grape ignores undeclared params (the stand-in records them separately)
        if value is None:
            if name in required:
                coerced[name] = ""  # present but nil: presence passes, ``values`` fails
            continue  # an optional nil is skipped by every validator
        result = _coerce(value, prop.get("type", ""))
        if result is None:
            continue
        coerced[name] = result.value if isinstance(result, _Invalid) else result
    order = {name: index for index, name in enumerate(properties)}
    found: list[tuple[int, int, str, str]] = []  # (param order, validator order, param, message)
    for error in Draft4Validator(schema, format_checker=FORMATS).iter_errors(coerced):
        if error.validator == "required":
            for name in error.validator_value:
                if name not in coerced:
                    found.append((order.get(name, 99), 0, name, f"{name} is missing"))
                    if "enum" in properties.get(name, {}):
                        found.append((order.get(name, 99), 2, name, f"{name} does not have a valid value"))
            continue
        name = str(error.absolute_path[0]) if error.absolute_path else "(body)"
        if error.validator == "enum":
            found.append((order.get(name, 99), 2, name, f"{name} does not have a valid value"))
        else:
            found.append((order.get(name, 99), 1, name, f"{name} is invalid"))
    invalid = {name for _, rank, name, _ in found if rank == 1}
    messages: list[str] = []
    for _, rank, name, message in sorted(found):
        if rank == 2 and name in invalid:
            continue  # one complaint per badly typed param
        if message not in messages:
            messages.append(message)
    return coerced, messages


# --------------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    """One request as the stand-in saw it (tokens are never kept: ``private-token`` becomes
    ``[FILTERED]`` -- GitLab's own log filter word -- and ``authorization`` keeps its scheme)."""

    seq: int
    method: str
    path: str  # raw, still percent-encoded, as GitLab routes it
    query: dict[str, str]
    json: Any  # the parsed JSON body, if any
    params: dict[str, Any]  # query + body (body wins), as Grape merges them
    headers: dict[str, str]
    operation_id: str | None
    request_id: str
    project_id: int | None = None
    status: int | None = None
    response: Any = None
    faulted: bool = False


# Violations (tests.standins._shared.Violation) recorded here: A breach of the documented contract: the bot (or the stand-in) sent something GitLab
# would refuse or silently ignore, or called what the description does not cover.
#
# Outcomes that depend on GitLab's data rather than on the request's shape are *not*
# violations, as on GitHub's stand-in: 401/403, a 404 for a project (GitLab also says so for
# a private project the token cannot see), commit or pipeline, a refused state transition,
# and injected faults.  Tests see those in :attr:`GitLabStandIn.requests`.
# Kinds: unknown-route | invalid-json | unsupported-media-type | invalid-params | undocumented-param | invalid-attributes | standin-bug


@dataclass
class Project:
    """A project the stand-in knows: numeric id, full path, and (optionally) its commits.

    ``commits=None`` means every SHA exists; otherwise an unknown one is GitLab's
    ``404 Commit Not Found``.
    """

    id: int
    path_with_namespace: str
    default_branch: str = "main"
    commits: frozenset[str] | None = None


@dataclass
class _Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    violation: tuple[str, str, tuple[str, ...]] | None = None


def _iso(epoch: float) -> str:
    """GitLab's API timestamps: UTC, milliseconds, ``Z`` (``2016-01-19T09:05:50.355Z``)."""
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _request_id() -> str:
    """A correlation id shaped like GitLab's (a 26-character ULID)."""
    return "01" + "".join(secrets.choice(_ULID_ALPHABET) for _ in range(24))


def _blank(value: Any) -> bool:
    """Ruby's ``blank?`` for what params can hold."""
    return value is None or (isinstance(value, str) and value.strip() == "")


def _message(text: Any) -> dict[str, Any]:
    """``render_api_error!``: ``{"message": ...}``."""
    return {"message": text}


def _error(text: str) -> dict[str, str]:
    """Grape's ``error!`` with a string (validation errors, unknown routes): ``{"error": ...}``."""
    return {"error": text}


# The events CreateCommitStatusService#apply_job_state! fires for each requested state, and the
# states CommitStatus's state machine (app/models/commit_status.rb) lets each event leave from.
# A new status starts as ``created``; only ``pending``/``running`` ones are ever looked up again.
_EVENTS: dict[str, tuple[str, frozenset[str], str]] = {
    # requested: (event, from-states, to-state)
    "pending": ("enqueue", frozenset({"created", "skipped", "manual", "scheduled"}), "pending"),
    "running": ("run", frozenset({"pending"}), "running"),  # after a silent ``enqueue`` attempt
    "success": ("success", frozenset({"created", "waiting_for_resource", "preparing",
                                      "waiting_for_callback", "pending", "running"}), "success"),
    "failed": ("drop", frozenset({"created", "waiting_for_resource", "preparing", "waiting_for_callback",
                                  "pending", "running", "manual", "scheduled"}), "failed"),
    # CANCELABLE_STATUSES + manual; GenericCommitStatus does not support ``canceling``.
    "canceled": ("cancel", frozenset({"running", "waiting_for_resource", "preparing", "waiting_for_callback",
                                      "pending", "created", "scheduled", "manual"}), "canceled"),
    "skipped": ("skip", frozenset({"created", "waiting_for_resource", "preparing", "pending"}), "skipped"),
}


def transition_error(event: str, current: str) -> str:
    """state_machines' InvalidTransition message, as GitLab's specs pin it."""
    return f'Cannot transition status via :{event} from :{current} (Reason(s): Status cannot transition via "{event}")'


def apply_transition(current: str, requested: str) -> tuple[str | None, str]:
    """(new status or None if refused, the event that decided it)."""
    event, sources, target = _EVENTS[requested]
    if requested == "running" and current in _EVENTS["pending"][1]:
        current = "pending"  # ``job.enqueue`` (no bang) moves created -> pending first
    return (target if current in sources else None), event


# --------------------------------------------------------------------------- the stand-in


class GitLabStandIn(ForgeStandIn):
    """GitLab's commit-status API on 127.0.0.1, in a background thread.

    ``tokens`` (a set, or a mapping token -> role among :data:`ROLES`; default role
    ``developer``) are accepted as ``PRIVATE-TOKEN: X``, ``Authorization: Bearer X`` or
    ``?private_token=X``; all belong to one user, ``user_login``.  ``projects`` maps numeric id
    to full path (or is an iterable of :class:`Project`).  ``delay`` (seconds, settable later) is
    added to every request.  With ``ratelimit_headers_on_every_response`` each reply carries
    ``RateLimit-Limit/Observed/Remaining/Reset`` as GitLab.com does; a self-managed GitLab sends
    them only with a 429 (see :meth:`too_many_requests`).
    """

    def __init__(
        self,
        tokens: Iterable[str] | Mapping[str, str] = frozenset(),
        *,
        projects: Mapping[int, str] | Iterable[Project] = (),
        user_login: str = "imagebot",
        user_id: int = 4242,
        rate_limit: int = 2000,
        ratelimit_headers_on_every_response: bool = False,
        delay: float = 0.0,
        schema_file: Path = SCHEMA_FILE,
    ) -> None:
        self.tokens = self._token_roles(tokens)
        self.projects: dict[int, Project] = {}
        for project in (
            [Project(int(k), v) for k, v in projects.items()] if isinstance(projects, Mapping) else projects
        ):
            self.projects[project.id] = project
        self.user_login = user_login
        self.user_id = user_id
        self.rate_limit = rate_limit
        self.ratelimit_headers_on_every_response = ratelimit_headers_on_every_response
        self.delay = delay
        self.operation = load_operation(schema_file)

        self.requests: list[RecordedRequest] = []
        self.violations: list[Violation] = []
        # Every accepted status, as answered, in arrival order, per (project id, sha, name).
        self.statuses: dict[tuple[int, str, str], list[dict[str, Any]]] = {}
        # The statuses ("jobs") themselves, by id, in their current state (plus ``retried``).
        self.jobs: dict[int, dict[str, Any]] = {}
        self.pipelines: dict[int, dict[str, Any]] = {}

        self._faults: list[Fault] = []
        self._job_ids = itertools.count(FIRST_JOB_ID)
        self._pipeline_ids = itertools.count(FIRST_PIPELINE_ID)
        self._seq = itertools.count(1)
        # Re-entrant: request handling holds it throughout, so reset() from the test thread is
        # atomic with respect to requests, and handling may record violations under it.
        self._lock = threading.RLock()
        self._rate_observed = 0
        self._rate_reset = int(time.time()) + 60
        self._defaults = (dict(self.tokens), copy.deepcopy(self.projects), self.delay, self.rate_limit,
                          self.ratelimit_headers_on_every_response)
        self._generation = 0
        self._wake = asyncio.Event()  # set (from the loop) to end every pending ``delay`` at once
        self._http = ThreadedServer("GitLab stand-in")

    @staticmethod
    def _token_roles(tokens: Iterable[str] | Mapping[str, str]) -> dict[str, str]:
        roles = dict(tokens) if isinstance(tokens, Mapping) else {token: "developer" for token in tokens}
        unknown = {role for role in roles.values() if role not in ROLES}
        if unknown:
            raise ValueError(f"unknown role(s) {sorted(unknown)}; use one of {ROLES}")
        return roles

    @property
    def api_url(self) -> str:
        """``url + "/api/v4"``: what GitLab clients call the API base URL."""
        return f"{self.url}/api/v4"

    # ------------------------------------------------------------------ lifecycle

    def _create_app(self) -> Starlette:
        return create_app(self)

    # ------------------------------------------------------------------ test API

    def reset(self) -> None:
        """Forget everything tests did and restore the constructor's settings and projects.

        Ids keep growing (as on GitLab); ``seq`` restarts at 1.  Requests still held by
        ``delay`` are woken and dropped (503), never handled, so they cannot leak into the next
        test's state.
        """
        with self._lock:
            self._generation += 1
            for container in (self.requests, self.violations, self.statuses, self.jobs, self.pipelines,
                              self._faults):
                container.clear()
            tokens, projects, self.delay, self.rate_limit, self.ratelimit_headers_on_every_response = self._defaults
            self.tokens, self.projects = dict(tokens), copy.deepcopy(projects)
            self._seq = itertools.count(1)
            self._rate_observed, self._rate_reset = 0, int(time.time()) + 60
        self._wake_held_requests()

    def assert_no_violations(self) -> None:
        """Raise AssertionError listing every recorded contract violation."""
        if self.violations:
            listing = "\n".join(str(v) for v in self.violations)
            raise AssertionError(f"GitLab stand-in recorded {len(self.violations)} violation(s):\n{listing}")

    def add_project(
        self, project_id: int, path_with_namespace: str, *, default_branch: str = "main",
        commits: Iterable[str] | None = None,
    ) -> Project:
        """Make a project known (until the next :meth:`reset`)."""
        project = Project(project_id, path_with_namespace, default_branch,
                          frozenset(commits) if commits is not None else None)
        with self._lock:
            self.projects[project.id] = project
        return project

    def create_pipeline(self, project: int | str, sha: str, ref: str, *, source: str = "push") -> int:
        """A pipeline that already exists for ``sha`` (say, the project's own CI); returns its id.

        Statuses posted for that sha (and ref, when given) attach to the newest such pipeline,
        as on GitLab, and ``pipeline_id`` may name it.
        """
        found = self._project(project)
        if found is None:
            raise KeyError(f"unknown project {project!r}")
        with self._lock:
            return self._new_pipeline(found, sha, ref, source)["id"]

    def history(self, project: int | str, sha: str, name: str = "default") -> list[str]:
        """The states GitLab accepted for (project, sha, name), in arrival order."""
        found = self._project(project)
        key = (found.id if found else -1, sha, name)
        return [status["status"] for status in self.statuses.get(key, [])]

    def inject(
        self,
        method: str,
        path_regex: str,
        status: int,
        count: int = 1,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
        *,
        delay: float = 0.0,
    ) -> Fault:
        """Answer the next ``count`` requests matching ``method`` (``"*"`` = any) and
        ``path_regex`` (``re.search`` on the raw path) with ``status`` instead of handling them.

        ``body`` may be JSON-able (sent as JSON), ``str`` (sent as text/plain) or ``bytes``; by
        default it is GitLab's ``{"message": "<code> <reason>"}``.  A ``content-type`` in
        ``headers`` wins.  Faulted requests are recorded with ``faulted=True`` and leave no state.
        """
        fault = Fault(
            method=method.upper(), path_regex=re.compile(path_regex), status=status, remaining=count,
            headers={k.lower(): v for k, v in (headers or {}).items()},
            body=_message(f"{status} {HTTPStatus(status).phrase}") if body is None else body, delay=delay,
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def server_error(self, status: int = 502, *, method: str = "*", path_regex: str = "", count: int = 1) -> Fault:
        """A 5xx.  500 is the API's own ``{"message": "500 Internal Server Error"}``; 502/503/504
        come from in front of Rails (Workhorse/NGINX) as an HTML page, not JSON."""
        if status == 500:
            return self.inject(method, path_regex, 500, count, body=_message("500 Internal Server Error"))
        page = (
            "<!DOCTYPE html>\n<html>\n<head>\n"
            f"  <title>GitLab is not responding ({status})</title>\n</head>\n<body>\n"
            f"  <h1>{status}</h1>\n  <h3>Whoops, GitLab is taking too much time to respond.</h3>\n"
            "</body>\n</html>\n"
        )
        return self.inject(method, path_regex, status, count, headers={"content-type": "text/html; charset=utf-8"},
                           body=page)

    def too_many_requests(
        self, retry_after: int = 1, *, limit: int | None = None, name: str = "throttle_authenticated_api",
        method: str = "*", path_regex: str = "", count: int = 1,
    ) -> Fault:
        """429 exactly as GitLab's Rack::Attack throttle answers it (lib/gitlab/rack_attack.rb):
        ``text/plain`` "Retry later", ``Retry-After`` (seconds), ``RateLimit-Reset`` (epoch),
        ``RateLimit-ResetTime`` (HTTP date), ``RateLimit-Remaining: 0`` and friends."""
        limit = self.rate_limit if limit is None else limit
        reset = int(time.time()) + retry_after
        headers = {
            "content-type": "text/plain",
            "ratelimit-name": name,
            "ratelimit-limit": str(limit),
            "ratelimit-observed": str(limit + 1),
            "ratelimit-remaining": "0",
            "ratelimit-reset": str(reset),
            "ratelimit-resettime": formatdate(reset, usegmt=True),
            "retry-after": str(retry_after),
        }
        return self.inject(method, path_regex, 429, count, headers=headers, body=THROTTLED_TEXT)

    def conflict(self, *, method: str = "*", path_regex: str = "", count: int = 1) -> Fault:
        """409: another request held the per-(project, sha) lock for too long (the service's
        ``FailedToObtainLockError``, answered through ``conflict!``)."""
        return self.inject(method, path_regex, 409, count,
                           body=_message("Another update to this commit status is in progress"))

    # ------------------------------------------------------------------ request pipeline

    async def handle(self, request: Request) -> Response:
        """Record, then fault / authenticate / validate / handle, then self-check the reply."""
        raw = await request.body()
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        path = raw_path.decode("latin-1").split("?", 1)[0]
        match = self.operation.route.match(path)
        operation = self.operation if match and request.method == self.operation.method else None
        query = dict(parse_qsl(request.url.query, keep_blank_values=True))
        token = self._token(request, query)
        headers = {k.lower(): v for k, v in request.headers.items()}
        if "private-token" in headers:
            headers["private-token"] = "[FILTERED]"
        if "authorization" in headers:
            headers["authorization"] = headers["authorization"].split(" ", 1)[0]
        if "private_token" in query:
            query["private_token"] = "[FILTERED]"
        parsed, body_problem = self._parse_body(raw, headers.get("content-type", ""))
        params: dict[str, Any] = {k: v for k, v in query.items() if k != "private_token"}
        if isinstance(parsed, dict):
            params.update(parsed)
        with self._lock:
            record = RecordedRequest(
                seq=next(self._seq), method=request.method, path=path, query=query,
                json=None if headers.get("content-type", "").startswith("application/x-www-form-urlencoded")
                else parsed,
                params=params, headers=headers, operation_id=operation.operation_id if operation else None,
                request_id=_request_id(),
            )
            self.requests.append(record)
            fault = self._take_fault(record) if operation else None
            generation = self._generation
        await self._pause(self.delay + (fault.delay if fault else 0.0))
        with self._lock:
            if generation != self._generation:  # reset()/stop() while held: it belongs to no test now
                return Response(b'{"message":"stand-in was reset"}', 503, media_type=JSON_CT)
            try:
                reply = self._process(record, match, fault, token, params, body_problem, str(request.base_url))
                reply = self._self_check(record, reply, checked_shape=fault is None)
            except Exception:  # a crash in the stand-in must not look like a GitLab answer
                trace = traceback.format_exc()
                self._violate(record, "standin-bug", "stand-in raised", tuple(trace.splitlines()))
                reply = _Reply(500, _message(f"GitLab stand-in crashed:\n{trace}"))
            record.status, record.response = reply.status, reply.body
            return self._respond(record, reply)

    @staticmethod
    def _token(request: Request, query: Mapping[str, str]) -> str | None:
        """APIGuard's sources: ``private_token`` param, ``PRIVATE-TOKEN`` header, OAuth Bearer."""
        if "private_token" in query:
            return query["private_token"]
        if "private-token" in request.headers:
            return request.headers["private-token"]
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        return credential.strip() if scheme.lower() == "bearer" and credential.strip() else None

    @staticmethod
    def _parse_body(raw: bytes, content_type: str) -> tuple[Any, tuple[int, str, str] | None]:
        """(parsed body, problem) where problem is (status, kind, Grape's error text)."""
        media = content_type.split(";", 1)[0].strip().lower()
        if not raw:
            return None, None
        if media == "application/x-www-form-urlencoded":  # Rack parses forms; Grape skips them
            return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)), None
        if media not in ("", JSON_CT):  # no content-type: GitLab's default format, JSON
            return None, (415, "unsupported-media-type", f"The provided content-type '{media}' is not supported.")
        try:
            return json.loads(raw), None
        except ValueError:
            return None, (400, "invalid-json", INVALID_JSON_TEXT)

    def _take_fault(self, record: RecordedRequest) -> Fault | None:
        for fault in self._faults:
            if fault.matches(record.method, record.path):
                fault.remaining -= 1
                return fault
        return None

    async def _pause(self, seconds: float) -> None:
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=seconds)
        except TimeoutError:
            pass

    def _process(
        self, record: RecordedRequest, match: re.Match[str] | None, fault: Fault | None, token: str | None,
        params: dict[str, Any], body_problem: tuple[int, str, str] | None, base_url: str,
    ) -> _Reply:
        if match is None:
            self._violate(record, "unknown-route", "not the documented operation in api-subset.json")
            return _Reply(404, _error("404 Not Found"))  # API::API's catch-all ``route :any, '*path'``
        if record.operation_id is None:
            self._violate(record, "unknown-route", f"{record.method} is not documented here; only POST is")
            return _Reply(405, _error("405 Not Allowed"), {"allow": "OPTIONS, POST"})
        if fault is not None:
            record.faulted = True
            self._check_params(record, params, body_problem)  # a bad request is a bug even now
            return _Reply(fault.status, fault.body, dict(fault.headers))
        # Grape's order: its formatter middleware parses the body, then the endpoint runs
        # ``before { authenticate! }``, then validates parameters, then the endpoint body.
        if body_problem is not None:
            return self._check_params(record, params, body_problem)[0] or _Reply(500, _message("unreachable"))
        role = self.tokens.get(token) if token else None
        if role is None:
            return _Reply(401, _message("401 Unauthorized"))
        invalid, coerced = self._check_params(record, params, body_problem)
        if invalid is not None:
            return invalid
        project = self._project(unquote(match["id"]))
        if project is None:
            return _Reply(404, _message("404 Project Not Found"))
        record.project_id = project.id
        if role not in WRITE_ROLES:
            return _Reply(403, _message("403 Forbidden"))
        return self._create_status(project, unquote(match["sha"]), coerced, base_url.rstrip("/"))

    def _check_params(
        self, record: RecordedRequest, params: dict[str, Any], body_problem: tuple[int, str, str] | None,
    ) -> tuple[_Reply | None, dict[str, Any]]:
        if body_problem is not None:
            status, kind, text = body_problem
            self._violate(record, kind, text)
            return _Reply(status, _error(text)), {}
        schema = self.operation.request_schema
        undeclared = sorted(set(params) - set(schema["properties"]))
        if undeclared:
            self._violate(record, "undocumented-param", "GitLab ignores parameters it does not declare",
                          tuple(undeclared))
        coerced, errors = grape_param_errors(schema, params)
        if errors:
            self._violate(record, "invalid-params", "parameters do not match the documented schema", tuple(errors))
            return _Reply(400, _error(", ".join(errors))), coerced
        return None, coerced

    def _self_check(self, record: RecordedRequest, reply: _Reply, *, checked_shape: bool) -> _Reply:
        problems: list[str] = []
        validator = self.operation.responses.get(200 if reply.status == 201 else reply.status)
        if record.operation_id is not None and reply.status in (200, 201) and validator is not None:
            problems = [
                f"{'.'.join(map(str, e.absolute_path)) or '(body)'}: {e.message[:200]}"
                for e in sorted(validator.iter_errors(reply.body), key=lambda e: list(map(str, e.absolute_path)))
            ]
        elif checked_shape and reply.status >= 400 and not (
            isinstance(reply.body, dict) and len(reply.body) == 1 and set(reply.body) <= {"message", "error"}
        ):
            problems = [f"error body {reply.body!r} is neither {{'message': ...}} nor {{'error': ...}}"]
        if not problems:
            if reply.violation is not None:
                self._violate(record, *reply.violation)
            return reply
        message = f"stand-in's own {reply.status} reply breaks the documented schema"
        self._violate(record, "standin-bug", message, tuple(problems))
        return _Reply(500, _message(f"GitLab stand-in bug: {message}: " + "; ".join(problems)))

    def _respond(self, record: RecordedRequest, reply: _Reply) -> Response:
        with self._lock:
            now = time.time()
            if now >= self._rate_reset:
                self._rate_reset, self._rate_observed = int(now) + 60, 0
            self._rate_observed += 1
            headers = {
                "cache-control": "max-age=0, private, must-revalidate",
                "x-request-id": record.request_id,
                "x-gitlab-meta": json.dumps({"correlation_id": record.request_id, "version": "1"},
                                            separators=(",", ":")),
                "x-runtime": "0.031337",
                "x-frame-options": "SAMEORIGIN",
                "x-content-type-options": "nosniff",
                "vary": "Origin",
            }
            if self.ratelimit_headers_on_every_response:
                headers.update({
                    "ratelimit-name": "throttle_authenticated_api",
                    "ratelimit-limit": str(self.rate_limit),
                    "ratelimit-observed": str(self._rate_observed),
                    "ratelimit-remaining": str(max(0, self.rate_limit - self._rate_observed)),
                    "ratelimit-reset": str(self._rate_reset),
                })
        headers.update(reply.headers)
        if isinstance(reply.body, bytes):
            content, default_type = reply.body, "application/octet-stream"
        elif isinstance(reply.body, str):
            content, default_type = reply.body.encode(), "text/plain"
        else:
            content, default_type = json.dumps(reply.body, separators=(",", ":")).encode(), JSON_CT
        media_type = headers.pop("content-type", default_type)
        return Response(content, reply.status, headers, media_type=media_type)

    def _violate(self, record: RecordedRequest, kind: str, message: str, details: tuple[str, ...] = ()) -> None:
        with self._lock:
            self.violations.append(Violation(record.seq, record.method, record.path, kind, message, details))

    # ------------------------------------------------------------------ the operation

    def _project(self, ident: int | str) -> Project | None:
        """API::Helpers#find_project: an integer id, or a full path containing ``/`` (any case)."""
        if isinstance(ident, int) or _INTEGER_ID.fullmatch(ident):
            return self.projects.get(int(ident))
        if "/" not in ident:
            return None
        wanted = ident.lower()
        return next((p for p in self.projects.values() if p.path_with_namespace.lower() == wanted), None)

    def _new_pipeline(self, project: Project, sha: str, ref: str, source: str) -> dict[str, Any]:
        pipeline = {"id": next(self._pipeline_ids), "project_id": project.id, "sha": sha, "ref": ref,
                    "source": source, "created_at": _iso(time.time())}
        self.pipelines[pipeline["id"]] = pipeline
        return pipeline

    def _first_matching_pipeline(
        self, project: Project, sha: str, ref: str | None, pipeline_id: int | None
    ) -> dict[str, Any] | None:
        """Newest pipeline for the sha, narrowed to ``ref`` and ``pipeline_id`` when given."""
        for pipeline in sorted(self.pipelines.values(), key=lambda p: p["id"], reverse=True):
            if (pipeline["project_id"], pipeline["sha"]) != (project.id, sha):
                continue
            if ref is not None and pipeline["ref"] != ref:
                continue
            if pipeline_id is not None and pipeline["id"] != pipeline_id:
                continue
            return pipeline
        return None

    def _create_status(self, project: Project, sha: str, params: dict[str, Any], base: str) -> _Reply:
        """Ci::CreateCommitStatusService#execute, step by step."""
        if project.commits is not None and sha not in project.commits:
            return _Reply(404, _message("404 Commit Not Found"))
        pipeline_id = params.get("pipeline_id")
        matching = self._first_matching_pipeline(project, sha, params.get("ref"), pipeline_id)
        ref = params["ref"] if "ref" in params else (matching["ref"] if matching else project.default_branch)
        if _blank(ref):
            return _Reply(404, _message("404 References for commit Not Found"))
        if pipeline_id is not None and matching is None:
            return _Reply(404, _message("404 Pipeline for pipeline_id, sha and ref Not Found"))
        name = params.get("name", params.get("context", "default"))  # ``name || context || 'default'``
        pipeline = matching
        existing = self._running_or_pending(project, pipeline, ref, name) if pipeline else None
        job = copy.deepcopy(existing) if existing else {
            "id": None, "sha": sha, "ref": ref, "status": "created", "name": name,
            "target_url": None, "description": None, "created_at": None, "started_at": None,
            "finished_at": None, "allow_failure": False, "coverage": None, "pipeline_id": None,
            "project_id": project.id, "retried": False,
        }
        for key in ("target_url", "description", "coverage"):  # attributes_for_keys: present ones only
            if key in params and not _blank(params[key]):
                job[key] = params[key]
        errors = self._model_errors(job)
        if errors:
            details = tuple(f"{k}: {m}" for k, messages in errors.items() for m in messages)
            return _Reply(400, _message(errors), violation=("invalid-attributes", "GitLab's model refuses it", details))
        new_status, event = apply_transition(job["status"], params["state"])
        if new_status is None:  # InvalidTransition -> 400, and nothing is saved
            return _Reply(400, _message(transition_error(event, job["status"])))
        now = _iso(time.time())
        if pipeline is None:
            pipeline = self._new_pipeline(project, sha, ref, "external")
        if new_status == "running" and job["status"] in ("created", "pending", "preparing"):
            job["started_at"] = now
        if new_status in ("success", "failed", "canceled"):
            job["finished_at"] = now
        job["status"] = new_status
        if job["id"] is None:
            job.update(id=next(self._job_ids), created_at=now, pipeline_id=pipeline["id"])
            for older in self.jobs.values():  # update_older_statuses_retried!
                if older["pipeline_id"] == pipeline["id"] and older["name"] == name:
                    older["retried"] = True
        self.jobs[job["id"]] = job
        entity = self._entity(job, base)
        self.statuses.setdefault((project.id, sha, name), []).append(copy.deepcopy(entity))
        return _Reply(201, entity)

    def _running_or_pending(
        self, project: Project, pipeline: dict[str, Any], ref: str, name: str
    ) -> dict[str, Any] | None:
        for job in self.jobs.values():
            if (job["project_id"], job["pipeline_id"], job["ref"], job["name"]) == (
                project.id, pipeline["id"], ref, name
            ) and job["status"] in ("running", "pending") and not job["retried"]:
                return job
        return None

    @staticmethod
    def _model_errors(job: Mapping[str, Any]) -> dict[str, list[str]]:
        """CommitStatus / GenericCommitStatus validations, in declaration order (errors.messages)."""
        errors: dict[str, list[str]] = {}
        if _blank(job["name"]):
            errors.setdefault("name", []).append("can't be blank")
        for key in ("ref", "target_url", "description"):
            value = job[key]
            if isinstance(value, str) and len(value) > MAX_LENGTH:
                errors.setdefault(key, []).append(TOO_LONG)
        target_url = job["target_url"]
        if target_url is not None:
            if urlsplit(str(target_url)).scheme.lower() not in ("http", "https"):
                errors.setdefault("target_url", []).append(URL_BLOCKED)
            if len(str(target_url)) > MAX_LENGTH:  # GenericCommitStatus repeats the length rule
                errors.setdefault("target_url", []).append(TOO_LONG)
        return errors

    def _entity(self, job: Mapping[str, Any], base: str) -> dict[str, Any]:
        """API::Entities::CommitStatus, field for field, with an Entities::UserBasic author."""
        digest = hashlib.md5(f"{self.user_login}@example.com".encode()).hexdigest()  # noqa: S324 (gravatar)
        return {
            "id": job["id"],
            "sha": job["sha"],
            "ref": job["ref"],
            "status": job["status"],
            "name": job["name"],
            "target_url": job["target_url"],
            "description": job["description"],
            "created_at": job["created_at"],
            "started_at": job["started_at"],
            "finished_at": job["finished_at"],
            "allow_failure": job["allow_failure"],
            "coverage": job["coverage"],
            "pipeline_id": job["pipeline_id"],
            "author": {
                "id": self.user_id,
                "username": self.user_login,
                "public_email": "",
                "name": self.user_login,
                "state": "active",
                "locked": False,
                "avatar_url": f"https://secure.gravatar.com/avatar/{digest}?s=80&d=identicon",
                "web_url": f"{base}/{self.user_login}",
            },
        }


def create_app(standin: GitLabStandIn) -> Starlette:
    """The ASGI app: one catch-all route.  Routing happens in :meth:`GitLabStandIn.handle` on the
    *raw* path, because GitLab routes ``group%2Fproject`` before decoding it (``id: [^/]+``) and
    an unencoded ``group/project`` must miss, as it does there."""

    async def handle(request: Request) -> Response:
        return await standin.handle(request)

    return Starlette(routes=[Route("/{path:path}", handle, methods=_ALL_METHODS)])

