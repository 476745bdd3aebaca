"""A stand-in for the slice of GitHub's REST API that imagebot calls.

Tests cannot reach GitHub, and a mock that accepts anything would let the bot drift away from
the real contract unnoticed.  This stand-in serves the five operations of
``tests/data/github/api-subset.json`` (cut from GitHub's own OpenAPI description) over a real
TCP socket, so the bot's real HTTP stack (gidgethub + httpx) is exercised, and it holds *both*
sides to that description:

* every request body is validated against the operation's request schema, and every query
  parameter against its documented schema; a bad body or parameter gets GitHub's 422 and is
  recorded in :attr:`GitHubStandIn.violations`;
* every response is validated against the documented response schema before it is sent; a
  mismatch is a bug in the stand-in and turns into a loud 500 plus a recorded violation.

Typical use::

    with GitHubStandIn(tokens={"t0k"}) as github:
        ...  # point the bot at github.url (gidgethub: base_url=github.url)
        assert github.statuses[("octo", "repo", sha)][-1]["state"] == "success"
        github.assert_no_violations()

For many tests, keep one running instance per module and call :meth:`GitHubStandIn.reset`
before each test.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import itertools
import json
import re
import secrets
import string
import threading
import time
import traceback
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jwt
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from jsonschema import Draft4Validator, FormatChecker
from jsonschema.exceptions import best_match
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.standins._shared import Fault, ForgeStandIn, ThreadedServer, Violation

SCHEMA_FILE = Path(__file__).resolve().parents[1] / "data" / "github" / "api-subset.json"

DOCS_ROOT = "https://docs.github.com/rest"
DOCS = {
    "repos/create-commit-status": f"{DOCS_ROOT}/commits/statuses#create-a-commit-status",
    "checks/create": f"{DOCS_ROOT}/checks/runs#create-a-check-run",
    "checks/update": f"{DOCS_ROOT}/checks/runs#update-a-check-run",
    "checks/list-for-ref": f"{DOCS_ROOT}/checks/runs#list-check-runs-for-a-git-reference",
    "apps/create-installation-access-token":
        f"{DOCS_ROOT}/apps/apps#create-an-installation-access-token-for-an-app",
}
PRIMARY_RATE_LIMIT_DOCS = f"{DOCS_ROOT}/overview/rate-limits-for-the-rest-api#about-primary-rate-limits"
SECONDARY_RATE_LIMIT_DOCS = (
    f"{DOCS_ROOT}/overview/rate-limits-for-the-rest-api#about-secondary-rate-limits"
)
SECONDARY_RATE_LIMIT_MESSAGE = (
    "You have exceeded a secondary rate limit. Please wait a few minutes before you try again."
)
# Which installation-token permission each repository operation needs (GitHub answers 403
# "Resource not accessible by integration" otherwise).
REQUIRED_PERMISSION = {
    "repos/create-commit-status": ("statuses", "write"),
    "checks/create": ("checks", "write"),
    "checks/update": ("checks", "write"),
    "checks/list-for-ref": ("checks", "read"),
}
PERMISSION_RANK = {"read": 1, "write": 2, "admin": 3}
# GitHub's page size cap for list endpoints.
MAX_PER_PAGE = 100
DEFAULT_APP_PERMISSIONS = {"checks": "write", "statuses": "write", "metadata": "read", "contents": "read"}
# Real ids have long passed 2**31; starting above it catches ids squeezed into 32-bit columns.
FIRST_ID = 2**31 + 1
# GitHub's App JWT rules: at most ten minutes of lifetime; clocks may drift a little.
MAX_JWT_LIFETIME = 600
JWT_CLOCK_DRIFT = 60
STATUS_DESCRIPTION_MAX = 140  # GitHub's real 422; the OpenAPI description does not say it.
JSON_UTF8 = "application/json; charset=utf-8"
_ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_TOKEN_ALPHABET = string.ascii_letters + string.digits


# --------------------------------------------------------------------------- schemas


def openapi_to_draft4(node: Any) -> Any:
    """Return a copy of an OpenAPI 3.0 schema with ``nullable: true`` made JSON Schema.

    Draft 4 has no ``nullable``: it ignores the keyword, so a status without ``target_url`` or
    a queued check run (``conclusion: null``) would look invalid.  ``nullable`` becomes
    ``"type": [T, "null"]`` (and ``null`` joins any ``enum``); nothing else changes.
    """
    if isinstance(node, list):
        return [openapi_to_draft4(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        key: value if key in ("enum", "example", "examples", "default") else openapi_to_draft4(value)
        for key, value in node.items()
    }
    if out.pop("nullable", False) is True:
        if "type" not in out:
            return {"anyOf": [out, {"type": "null"}]}
        types = out["type"] if isinstance(out["type"], list) else [out["type"]]
        out["type"] = [*types, "null"]
        if "enum" in out and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
    return out


FORMATS = FormatChecker()


@FORMATS.checks("date-time", raises=ValueError)
def _is_rfc3339(value: object) -> bool:
    """``date-time`` as GitHub documents it (``YYYY-MM-DDTHH:MM:SSZ``): RFC 3339 with a zone.

    jsonschema only checks this format when the optional ``rfc3339-validator`` is installed; a
    timestamp GitHub would refuse must not pass silently here.
    """
    if not isinstance(value, str):
        return True
    return "T" in value.upper() and datetime.fromisoformat(value).tzinfo is not None


def _validator(schema: dict[str, Any] | None) -> Draft4Validator | None:
    if schema is None:
        return None
    converted = openapi_to_draft4(schema)
    Draft4Validator.check_schema(converted)
    return Draft4Validator(converted, format_checker=FORMATS)


@dataclass(frozen=True)
class Operation:
    """One documented operation: where it lives and the validators for its bodies."""

    method: str
    path: str  # the OpenAPI template; Starlette understands the same ``{name}`` syntax
    operation_id: str
    request: Draft4Validator | None
    responses: dict[int, Draft4Validator | None]
    query: dict[str, Draft4Validator] = field(default_factory=dict)  # documented query parameters

    @property
    def docs(self) -> str:
        return DOCS.get(self.operation_id, DOCS_ROOT)


def load_operations(path: Path = SCHEMA_FILE) -> dict[str, Operation]:
    """Read api-subset.json into :class:`Operation` objects keyed by operationId."""
    operations = {}
    for key, spec in json.loads(path.read_text()).items():
        method, template = key.split(" ", 1)
        operations[spec["operationId"]] = Operation(
            method=method,
            path=template,
            operation_id=spec["operationId"],
            request=_validator(spec["request"]),
            responses={int(code): _validator(schema) for code, schema in spec["responses"].items()},
            query={name: _validator(schema) for name, schema in spec.get("parameters", {}).items()},
        )
    return operations


def _error_item(resource: str, field_: str, code: str, message: str) -> dict[str, str]:
    return {"resource": resource, "field": field_, "code": code, "message": message}


def _schema_errors(validator: Draft4Validator, body: Any, resource: str) -> list[dict[str, str]]:
    """jsonschema's findings, shaped like the ``errors`` of GitHub's "Validation Failed"."""
    items = []
    for error in sorted(validator.iter_errors(body), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(part) for part in error.absolute_path)
        if error.validator == "required":
            present = error.instance if isinstance(error.instance, dict) else {}
            for name in error.validator_value:
                if name not in present:
                    field_ = f"{where}.{name}" if where else name
                    items.append(_error_item(resource, field_, "missing_field", f"{field_} wasn't supplied"))
            continue
        if error.validator in ("maxLength", "maxItems"):
            unit = "characters" if error.validator == "maxLength" else "items"
            message = f"{where} is too long (maximum is {error.validator_value} {unit})"
        else:
            message = _shorten(error.message)
            if error.context:
                message += f" ({_shorten(best_match(error.context).message)})"
        items.append(_error_item(resource, where, "invalid", message))
    return items


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_run_rules(body: Mapping[str, Any], creating: bool) -> list[dict[str, str]]:
    """Check-run rules GitHub enforces but the schema states only in prose (descriptions)."""
    errors = []
    if body.get("conclusion") == "stale":
        errors.append(_error_item("CheckRun", "conclusion", "invalid", "only GitHub can set stale"))
    if "conclusion" not in body and (body.get("status") == "completed" or "completed_at" in body):
        errors.append(_error_item(
            "CheckRun", "conclusion", "missing_field",
            "conclusion is required with completed_at or a status of completed",
        ))
    output = body.get("output")
    if not creating and isinstance(output, dict) and "title" not in output:
        errors.append(_error_item("CheckRun", "output.title", "missing_field", "output.title is required"))
    return errors


def _status_rules(body: Mapping[str, Any]) -> list[dict[str, str]]:
    description = body.get("description")
    if isinstance(description, str) and len(description) > STATUS_DESCRIPTION_MAX:
        return [_error_item(
            "Status", "description", "custom",
            f"description is too long (maximum is {STATUS_DESCRIPTION_MAX} characters)",
        )]
    return []


# --------------------------------------------------------------------------- records


@dataclass
class RecordedRequest:
    """One request as the stand-in saw it (the Authorization value is reduced to its scheme)."""

    seq: int
    method: str
    path: str
    json: Any
    headers: dict[str, str]
    operation_id: str | None
    request_id: str
    status: int | None = None
    response: Any = None
    faulted: bool = False
    query: str = ""  # the raw query string
    at: float = 0.0  # time.monotonic() when it arrived


# Violations (tests.standins._shared.Violation) recorded here: A breach of the documented contract: the bot (or the stand-in) did something GitHub wouldn't accept.
# Kinds: unknown-route | invalid-json | invalid-body | invalid-query | unknown-check-run |
# standin-limit (a request GitHub would answer that this stand-in cannot) | standin-bug


@dataclass
class InstallationToken:
    """An installation access token issued by the stand-in."""

    token: str
    installation_id: int
    expires_at: float
    permissions: dict[str, str]
    repository_selection: str

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at


@dataclass
class _Reply:
    status: int
    body: Any
    headers: dict[str, str] = field(default_factory=dict)
    violation: tuple[str, str] | None = None  # (kind, message) when the bot broke the contract


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _node_id(prefix: str, number: int) -> str:
    return prefix + base64.urlsafe_b64encode(number.to_bytes(8, "big")).decode().rstrip("=")


def _request_id() -> str:
    parts = (secrets.token_hex(2), secrets.token_hex(2), secrets.token_hex(3), secrets.token_hex(4))
    return ":".join(part.upper() for part in parts) + f":{int(time.time()):X}"


def _basic_error(message: str, status: int, docs: str = DOCS_ROOT) -> dict[str, str]:
    return {"message": message, "documentation_url": docs, "status": str(status)}


# --------------------------------------------------------------------------- the stand-in


class GitHubStandIn(ForgeStandIn):
    """GitHub's REST API for imagebot's five operations, on 127.0.0.1 in a background thread.

    ``tokens`` are accepted as ``Authorization: token X`` or ``Bearer X`` on repository
    endpoints.  With ``app_id`` and ``public_key`` (PEM) the installation-token endpoint accepts
    App JWTs signed by the matching private key and issues ``ghs_`` tokens that live
    ``token_ttl_seconds``.  ``delay`` (seconds, also settable later) is added to every request
    to simulate a slow GitHub.
    """

    def __init__(
        self,
        tokens: set[str] | frozenset[str] = frozenset(),
        *,
        app_id: int | str | None = None,
        public_key: str | bytes | None = None,
        app_slug: str = "imagebot",
        app_permissions: Mapping[str, str] | None = None,
        token_ttl_seconds: float = 3600,
        user_login: str = "octocat",
        rate_limit: int = 5000,
        delay: float = 0.0,
        schema_file: Path = SCHEMA_FILE,
    ) -> None:
        if (app_id is None) != (public_key is None):
            raise ValueError("app_id and public_key go together")
        self.tokens = set(tokens)
        self.app_id = int(app_id) if app_id is not None else None
        self._public_key = (
            load_pem_public_key(public_key.encode() if isinstance(public_key, str) else public_key)
            if public_key is not None else None
        )
        self.app_slug = app_slug
        self.app_permissions = dict(app_permissions or DEFAULT_APP_PERMISSIONS)
        self.token_ttl_seconds = token_ttl_seconds
        self.user_login = user_login
        self.rate_limit = rate_limit
        self.delay = delay
        self.operations = load_operations(schema_file)

        self.requests: list[RecordedRequest] = []
        self.violations: list[Violation] = []
        self.statuses: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        self.check_runs: dict[int, dict[str, Any]] = {}
        self.check_run_history: dict[int, list[dict[str, Any]]] = {}
        self.annotations: dict[int, list[dict[str, Any]]] = {}
        self.installation_tokens: dict[str, InstallationToken] = {}

        # handlers take (path and query parameters, body, caller, base URL)
        self._handlers: dict[str, Callable[[dict[str, Any], Any, Any, str], _Reply]] = {
            "repos/create-commit-status": self._create_status,
            "checks/create": self._create_check_run,
            "checks/update": self._update_check_run,
            "checks/list-for-ref": self._list_check_runs,
            "apps/create-installation-access-token": self._create_installation_token,
        }
        if set(self._handlers) != set(self.operations):
            raise RuntimeError(f"operations {sorted(self.operations)} != handlers {sorted(self._handlers)}")
        self._faults: list[Fault] = []
        self._check_run_repo: dict[int, tuple[str, str]] = {}
        self._suites: dict[tuple[str, str, str], int] = {}
        self._ids = itertools.count(FIRST_ID)
        self._seq = itertools.count(1)
        # Re-entrant: request handling holds it throughout, so reset() from the test thread is
        # atomic with respect to requests, and handling may record violations under it.
        self._lock = threading.RLock()
        self._rate_used = 0
        self._rate_reset = int(time.time()) + 3600
        self._defaults = (set(self.tokens), self.token_ttl_seconds, self.delay, dict(self.app_permissions),
                          self.rate_limit)
        self._generation = 0
        self._wake = asyncio.Event()  # set (from the loop) to end every pending ``delay`` at once
        self._http = ThreadedServer("GitHub stand-in")

    # ------------------------------------------------------------------ lifecycle

    def _create_app(self) -> Starlette:
        return create_app(self)

    # ------------------------------------------------------------------ test API

    def reset(self) -> None:
        """Forget everything tests did and restore the constructor's settings.

        Stopping uvicorn costs ~0.2 s, so one running stand-in can serve a whole module with
        ``reset()`` between tests.  Ids keep growing (as on GitHub); ``seq`` restarts at 1.
        Requests still held by ``delay`` are woken and dropped (503), never handled, so they
        cannot leak into the next test's state.
        """
        with self._lock:
            self._generation += 1
            for container in (
                self.requests, self.violations, self.statuses, self.check_runs, self.check_run_history,
                self.annotations, self.installation_tokens, self._faults, self._check_run_repo, self._suites,
            ):
                container.clear()
            tokens, self.token_ttl_seconds, self.delay, permissions, self.rate_limit = self._defaults
            self.tokens, self.app_permissions = set(tokens), dict(permissions)
            self._seq = itertools.count(1)
            self._rate_used, self._rate_reset = 0, int(time.time()) + 3600
        self._wake_held_requests()

    def assert_no_violations(self) -> None:
        """Raise AssertionError listing every recorded contract violation."""
        if self.violations:
            listing = "\n".join(str(v) for v in self.violations)
            raise AssertionError(f"GitHub stand-in recorded {len(self.violations)} violation(s):\n{listing}")

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
        handled: bool = False,
    ) -> Fault:
        """Answer the next ``count`` requests matching ``method`` (``"*"`` = any) and
        ``path_regex`` (``re.search`` on the path) with ``status`` instead of handling them.

        ``body`` may be JSON-able, ``str`` or ``bytes``; by default it is ``{"message": <reason>}``.
        Faulted requests are recorded with ``faulted=True`` and leave no state behind, unless
        ``handled``: then the request is handled first and only its answer is replaced (GitHub
        did it, the answer was lost: a 502 from a proxy, a connection cut).
        """
        fault = Fault(
            method=method.upper(), path_regex=re.compile(path_regex), status=status, remaining=count,
            headers={k.lower(): v for k, v in (headers or {}).items()},
            body={"message": HTTPStatus(status).phrase} if body is None else body, delay=delay,
            handled=handled,
        )
        with self._lock:
            self._faults.append(fault)
        return fault

    def lost_answer(self, status: int = 502, *, method: str = "*", path_regex: str = "", count: int = 1) -> Fault:
        """The next matching requests take effect, but the bot sees a 5xx instead of the answer."""
        return self.inject(method, path_regex, status, count, body={"message": "Server Error"}, handled=True)

    def server_error(self, status: int = 502, *, method: str = "*", path_regex: str = "", count: int = 1) -> Fault:
        """GitHub's occasional 5xx (``{"message": "Server Error"}``)."""
        return self.inject(method, path_regex, status, count, body={"message": "Server Error"})

    def secondary_rate_limit(
        self, retry_after: int = 1, *, method: str = "*", path_regex: str = "", count: int = 1
    ) -> Fault:
        """403 with ``retry-after``; rate-limit headers still show quota left, as on GitHub."""
        return self.inject(
            method, path_regex, 403, count, headers={"retry-after": str(retry_after)},
            body={"message": SECONDARY_RATE_LIMIT_MESSAGE, "documentation_url": SECONDARY_RATE_LIMIT_DOCS},
        )

    def too_many_requests(
        self, retry_after: int = 1, *, method: str = "*", path_regex: str = "", count: int = 1
    ) -> Fault:
        """429 with ``retry-after`` (GitHub's other secondary-rate-limit answer)."""
        return self.inject(
            method, path_regex, 429, count, headers={"retry-after": str(retry_after)},
            body={"message": SECONDARY_RATE_LIMIT_MESSAGE, "documentation_url": SECONDARY_RATE_LIMIT_DOCS},
        )

    def rate_limited(
        self, reset_in: int = 1, *, status: int = 403, method: str = "*", path_regex: str = "", count: int = 1
    ) -> Fault:
        """Primary rate limit exhausted: ``x-ratelimit-remaining: 0`` and a reset epoch ``reset_in`` s ahead."""
        if status not in (403, 429):
            raise ValueError("GitHub answers an exhausted primary rate limit with 403 or 429")
        headers = {
            "x-ratelimit-remaining": "0",
            "x-ratelimit-used": str(self.rate_limit),
            "x-ratelimit-reset": str(int(time.time()) + reset_in),
        }
        body = {"message": "API rate limit exceeded.", "documentation_url": PRIMARY_RATE_LIMIT_DOCS}
        return self.inject(method, path_regex, status, count, headers=headers, body=body)

    def expire_tokens(self) -> None:
        """Make every issued installation token expired, as if an hour had passed."""
        with self._lock:
            for issued in self.installation_tokens.values():
                issued.expires_at = min(issued.expires_at, time.time() - 1)

    # ------------------------------------------------------------------ request pipeline

    async def handle(self, request: Request, operation: Operation | None) -> Response:
        """Record, then fault / authenticate / validate / handle, then self-check the reply."""
        raw = await request.body()
        try:
            parsed, parse_ok = (json.loads(raw) if raw else None), True
        except ValueError:
            parsed, parse_ok = None, False
        headers = {k.lower(): v for k, v in request.headers.items()}
        if "authorization" in headers:
            headers["authorization"] = headers["authorization"].split(" ", 1)[0]
        with self._lock:
            record = RecordedRequest(
                seq=next(self._seq), method=request.method, path=request.url.path, json=parsed,
                headers=headers, operation_id=operation.operation_id if operation else None,
                request_id=_request_id(), query=request.url.query, at=time.monotonic(),
            )
            self.requests.append(record)
            fault = self._take_fault(record) if operation else None
            generation = self._generation
        await self._pause(self.delay + (fault.delay if fault else 0.0))
        with self._lock:
            if generation != self._generation:  # reset()/stop() while held: it belongs to no test now
                return Response(b'{"message": "stand-in was reset"}', 503, media_type=JSON_UTF8)
            try:
                reply = self._process(request, record, operation, fault, parsed, parse_ok)
                reply = self._self_check(record, operation, reply)
            except Exception:  # a crash in the stand-in must not look like a GitHub answer
                trace = traceback.format_exc()
                self._violate(record, "standin-bug", "stand-in raised", tuple(trace.splitlines()))
                reply = _Reply(500, {"message": "GitHub stand-in crashed", "details": trace})
            record.status, record.response = reply.status, reply.body
            return self._respond(record, reply)

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
        self, request: Request, record: RecordedRequest, operation: Operation | None,
        fault: Fault | None, parsed: Any, parse_ok: bool,
    ) -> _Reply:
        if operation is None:
            self._violate(record, "unknown-route", "not one of the documented operations in api-subset.json")
            return _Reply(404, _basic_error("Not Found", 404))
        if fault is not None and not fault.handled:
            record.faulted = True
            self._validate_body(record, operation, parsed, parse_ok)  # a bad body is a bug even now
            return _Reply(fault.status, fault.body, dict(fault.headers))
        identity = self._authenticate(request, operation)
        if isinstance(identity, _Reply):
            return identity
        invalid = self._validate_body(record, operation, parsed, parse_ok)
        if invalid is not None:
            return invalid
        query = self._validate_query(record, operation, request)
        if isinstance(query, _Reply):
            return query
        base = str(request.base_url).rstrip("/")
        params = {**request.path_params, **query}
        reply = self._handlers[operation.operation_id](params, parsed or {}, identity, base)
        if reply.violation is not None:
            self._violate(record, *reply.violation)
        if fault is not None:  # handled: done, but the answer is lost
            record.faulted = True
            return _Reply(fault.status, fault.body, dict(fault.headers))
        return reply

    def _validate_body(
        self, record: RecordedRequest, operation: Operation, parsed: Any, parse_ok: bool
    ) -> _Reply | None:
        if not parse_ok:
            self._violate(record, "invalid-json", "request body is not JSON")
            return _Reply(400, {"message": "Problems parsing JSON", "documentation_url": operation.docs})
        if operation.request is None:
            return None
        body = {} if parsed is None else parsed
        resource = {"repos/create-commit-status": "Status"}.get(operation.operation_id, "CheckRun")
        errors = _schema_errors(operation.request, body, resource)
        if not errors and operation.operation_id in ("checks/create", "checks/update"):
            errors = _check_run_rules(body, creating=operation.operation_id == "checks/create")
        if not errors and operation.operation_id == "repos/create-commit-status":
            errors = _status_rules(body)
        if not errors:
            return None
        details = tuple(f"{e['field'] or '(body)'}: {e['code']}: {e['message']}" for e in errors)
        self._violate(record, "invalid-body", "request body does not match the documented schema", details)
        return _Reply(422, {"message": "Validation Failed", "errors": errors, "documentation_url": operation.docs})

    def _validate_query(self, record: RecordedRequest, operation: Operation, request: Request) -> dict[str, Any] | _Reply:
        """The query parameters, typed as documented, or GitHub's 422 for one that is not.

        GitHub ignores parameters it does not know; a stand-in that did too would let a typo
        (``checkname=``) pass silently, so an unknown one is a recorded violation as well.
        """
        values: dict[str, Any] = {}
        problems = []
        for name, raw in request.query_params.multi_items():
            validator = operation.query.get(name)
            if validator is None:
                problems.append(f"{name}: not a documented parameter of {operation.operation_id}")
                continue
            value: Any = raw
            if validator.schema.get("type") == "integer":
                value = int(raw) if raw.lstrip("-").isdigit() else raw
            error = best_match(validator.iter_errors(value))
            if error is not None:
                problems.append(f"{name}: {_shorten(error.message)}")
            values[name] = value
        if not problems:
            return values
        self._violate(record, "invalid-query", "query parameters do not match the documented ones", tuple(problems))
        return _Reply(422, {"message": "Invalid request.\n\n" + "\n".join(problems), "documentation_url": operation.docs})

    def _authenticate(self, request: Request, operation: Operation) -> Any:
        """Return the caller (``None`` for a static token, or an InstallationToken) or a 401/403 reply."""
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        scheme, credential = scheme.lower(), credential.strip()
        if operation.operation_id == "apps/create-installation-access-token":
            problem = self._jwt_problem(credential if scheme == "bearer" else "")
            return _Reply(401, _basic_error(problem, 401)) if problem else "app"
        if scheme not in ("token", "bearer") or not credential:
            return _Reply(401, _basic_error("Requires authentication", 401))
        if credential in self.tokens:
            return None
        issued = self.installation_tokens.get(credential)
        if issued is None or issued.expired:
            return _Reply(401, _basic_error("Bad credentials", 401))
        needed, level = REQUIRED_PERMISSION[operation.operation_id]
        if PERMISSION_RANK.get(issued.permissions.get(needed, ""), 0) < PERMISSION_RANK[level]:
            return _Reply(403, _basic_error("Resource not accessible by integration", 403, operation.docs))
        return issued

    def _jwt_problem(self, token: str) -> str | None:
        """Why GitHub would refuse this App JWT, or None if it is acceptable."""
        if self._public_key is None or not token:
            return "A JSON web token could not be decoded"
        try:
            claims = jwt.decode(
                token, self._public_key, algorithms=["RS256"],
                options={"verify_exp": False, "verify_iat": False, "verify_iss": False,
                         "require": ["iat", "exp", "iss"]},
            )
        except jwt.PyJWTError:
            return "A JSON web token could not be decoded"
        now = time.time()
        iat, exp = claims["iat"], claims["exp"]
        if not isinstance(iat, int) or iat > now + JWT_CLOCK_DRIFT:
            return ("'Issued at' claim ('iat') must be an Integer representing the time"
                    " that the assertion was issued")
        if not isinstance(exp, int) or exp <= now:
            return ("'Expiration time' claim ('exp') must be a numeric value representing"
                    " the future time at which the assertion expires")
        if exp - iat > MAX_JWT_LIFETIME:
            return "'Expiration time' claim ('exp') is too far in the future"
        if str(claims["iss"]) not in (str(self.app_id), self.client_id):
            return "'Issuer' claim ('iss') does not name this GitHub App"
        return None

    def _self_check(self, record: RecordedRequest, operation: Operation | None, reply: _Reply) -> _Reply:
        validator = operation.responses.get(reply.status) if operation else None
        if validator is None:
            return reply
        problems = sorted(validator.iter_errors(reply.body), key=lambda e: list(map(str, e.absolute_path)))
        if not problems:
            return reply
        details = tuple(
            f"{'.'.join(map(str, e.absolute_path)) or '(body)'}: {_shorten(e.message)}" for e in problems
        )
        message = f"stand-in's own {reply.status} reply breaks the documented schema"
        self._violate(record, "standin-bug", message, details)
        return _Reply(500, {"message": f"GitHub stand-in bug: {message}", "errors": list(details)})

    def _respond(self, record: RecordedRequest, reply: _Reply) -> Response:
        with self._lock:
            now = time.time()
            if now >= self._rate_reset:
                self._rate_reset, self._rate_used = int(now) + 3600, 0
            self._rate_used += 1
            headers = {
                "server": "github.com",
                "x-github-request-id": record.request_id,
                "x-github-api-version-selected": "2022-11-28",
                "x-github-media-type": "github.v3; format=json",
                "x-ratelimit-limit": str(self.rate_limit),
                "x-ratelimit-remaining": str(max(0, self.rate_limit - self._rate_used)),
                "x-ratelimit-reset": str(self._rate_reset),
                "x-ratelimit-used": str(self._rate_used),
                "x-ratelimit-resource": "core",
            }
        headers.update(reply.headers)
        if isinstance(reply.body, bytes):
            content = reply.body
        elif isinstance(reply.body, str):
            content = reply.body.encode()
        else:
            content = json.dumps(reply.body).encode()
        return Response(content, reply.status, headers, media_type=JSON_UTF8)

    def _violate(self, record: RecordedRequest, kind: str, message: str, details: tuple[str, ...] = ()) -> None:
        with self._lock:
            self.violations.append(Violation(record.seq, record.method, record.path, kind, message, details))

    # ------------------------------------------------------------------ operations

    def _create_status(self, params: dict[str, str], body: Any, caller: Any, base: str) -> _Reply:
        owner, repo, sha = params["owner"], params["repo"], params["sha"]
        status_id, now = next(self._ids), _iso(time.time())
        creator = self._creator(caller, base)
        status = {
            "url": f"{base}/repos/{owner}/{repo}/statuses/{sha}",
            "avatar_url": creator["avatar_url"],
            "id": status_id,
            "node_id": _node_id("SC_kwDO", status_id),
            "state": body["state"],
            "description": body.get("description"),
            "target_url": body.get("target_url"),
            "context": body.get("context", "default"),
            "created_at": now,
            "updated_at": now,
            "creator": creator,
        }
        self.statuses.setdefault((owner, repo, sha), []).append(status)
        return _Reply(201, copy.deepcopy(status), {"location": status["url"]})

    def _create_check_run(self, params: dict[str, str], body: Any, caller: Any, base: str) -> _Reply:
        owner, repo = params["owner"], params["repo"]
        run_id, now = next(self._ids), _iso(time.time())
        suite_key = (owner, repo, body["head_sha"])
        if suite_key not in self._suites:  # one check suite per commit, as for a single App
            self._suites[suite_key] = next(self._ids)
        suite_id = self._suites[suite_key]
        url = f"{base}/repos/{owner}/{repo}/check-runs/{run_id}"
        app = self._app(base)
        run = {
            "id": run_id,
            "node_id": _node_id("CR_kwDO", run_id),
            "head_sha": body["head_sha"],
            "external_id": "",
            "url": url,
            "html_url": f"{base}/{owner}/{repo}/runs/{run_id}",
            "details_url": app["external_url"],  # GitHub's fallback: the App's homepage
            "status": "queued",
            "conclusion": None,
            "started_at": now,
            "completed_at": None,
            "output": {"title": None, "summary": None, "text": None, "annotations_count": 0,
                       "annotations_url": f"{url}/annotations"},
            "name": body["name"],
            "check_suite": {"id": suite_id},
            "app": app,
            "pull_requests": [],
        }
        self._check_run_repo[run_id] = (owner, repo)
        self.annotations[run_id] = []
        self._merge_check_run(run, body)
        self.check_runs[run_id] = run
        self.check_run_history[run_id] = [copy.deepcopy(run)]
        return _Reply(201, copy.deepcopy(run), {"location": url})

    def _update_check_run(self, params: dict[str, str], body: Any, caller: Any, base: str) -> _Reply:
        run_id = int(params["check_run_id"]) if params["check_run_id"].isdigit() else -1
        if self._check_run_repo.get(run_id) != (params["owner"], params["repo"]):
            return _Reply(404, _basic_error("Not Found", 404, DOCS["checks/update"]),
                          violation=("unknown-check-run", "no such check run in this repository"))
        run = self.check_runs[run_id]
        self._merge_check_run(run, body)
        self.check_run_history[run_id].append(copy.deepcopy(run))
        return _Reply(200, copy.deepcopy(run))

    def _list_check_runs(self, params: dict[str, Any], body: Any, caller: Any, base: str) -> _Reply:
        """Check runs of a commit, newest first, filtered and paged as GitHub does."""
        owner, repo, ref = params["owner"], params["repo"], params["ref"]
        if not re.fullmatch(r"[0-9a-f]{40}", ref):
            return _Reply(404, _basic_error("No commit found for SHA: " + ref, 404, DOCS["checks/list-for-ref"]),
                          violation=("standin-limit", "this stand-in resolves full commit SHAs only"))
        runs = [run for run_id, run in sorted(self.check_runs.items(), reverse=True)
                if self._check_run_repo[run_id] == (owner, repo) and run["head_sha"] == ref]
        if "check_name" in params:
            runs = [run for run in runs if run["name"] == params["check_name"]]
        if "status" in params:
            runs = [run for run in runs if run["status"] == params["status"]]
        if "app_id" in params:
            runs = [run for run in runs if run["app"]["id"] == params["app_id"]]
        if params.get("filter", "latest") == "latest":  # the newest run of each name
            seen: set[str] = set()
            runs = [run for run in runs if not (run["name"] in seen or seen.add(run["name"]))]
        per_page = max(1, min(int(params.get("per_page", 30)), MAX_PER_PAGE))
        page = max(1, int(params.get("page", 1)))
        last = max(1, -(-len(runs) // per_page))
        shown = runs[(page - 1) * per_page: page * per_page]
        return _Reply(200, {"total_count": len(runs), "check_runs": copy.deepcopy(shown)},
                      self._links(f"{base}/repos/{owner}/{repo}/commits/{ref}/check-runs", params, page, last))

    @staticmethod
    def _links(url: str, params: dict[str, Any], page: int, last: int) -> dict[str, str]:
        """GitHub's ``Link`` header for a paged list (none when one page holds everything)."""
        if last == 1:
            return {}
        query = {k: v for k, v in params.items() if k not in ("owner", "repo", "ref", "page")}

        def at(n: int) -> str:
            return url + "?" + "&".join(f"{k}={quote(str(v), safe='')}" for k, v in {**query, "page": n}.items())

        rels = [("prev", page - 1), ("next", page + 1), ("last", last), ("first", 1)]
        links = [f'<{at(n)}>; rel="{rel}"' for rel, n in rels if 1 <= n <= last and n != page]
        return {"link": ", ".join(links)}

    def _merge_check_run(self, run: dict[str, Any], body: Mapping[str, Any]) -> None:
        """Apply a create/update body the way GitHub does.

        Plain fields are replaced; a ``conclusion`` implies ``status: completed``; completing
        stamps ``completed_at``; ``output`` title/summary/text are replaced as sent while
        annotations append (so ``annotations_count`` accumulates).
        """
        for key in ("name", "details_url", "external_id", "started_at"):
            if key in body:
                run[key] = body[key]
        if "status" in body:
            run["status"] = body["status"]
            if body["status"] != "completed":
                run["conclusion"] = run["completed_at"] = None
        if "conclusion" in body:
            run["conclusion"], run["status"] = body["conclusion"], "completed"
        if "completed_at" in body:
            run["completed_at"] = body["completed_at"]
        if run["status"] == "completed" and run["completed_at"] is None:
            run["completed_at"] = _iso(time.time())
        if "output" in body:
            sent = body["output"]
            new_annotations = list(sent.get("annotations", []))
            self.annotations[run["id"]].extend(new_annotations)
            run["output"] = {
                **run["output"],
                "title": sent.get("title"),
                "summary": sent.get("summary"),
                "text": sent.get("text"),
                "annotations_count": run["output"]["annotations_count"] + len(new_annotations),
            }

    def _create_installation_token(self, params: dict[str, str], body: Any, caller: Any, base: str) -> _Reply:
        raw_id = params["installation_id"]
        if not raw_id.isdigit():
            return _Reply(404, _basic_error("Not Found", 404, DOCS["apps/create-installation-access-token"]),
                          violation=("unknown-route", "installation_id must be an integer"))
        rank = {"read": 1, "write": 2, "admin": 3}
        wanted = dict(body.get("permissions") or self.app_permissions)
        if any(rank.get(self.app_permissions.get(k, ""), 0) < rank[v] for k, v in wanted.items()):
            return _Reply(422, {
                "message": "The permissions requested are not granted to this installation.",
                "documentation_url": DOCS["apps/create-installation-access-token"],
            }, violation=("invalid-body", f"permissions {wanted} exceed the App's {self.app_permissions}"))
        issued = InstallationToken(
            token="ghs_" + "".join(secrets.choice(_TOKEN_ALPHABET) for _ in range(36)),
            installation_id=int(raw_id),
            expires_at=time.time() + self.token_ttl_seconds,
            permissions=wanted,
            repository_selection="selected" if body.get("repositories") or body.get("repository_ids") else "all",
        )
        self.installation_tokens[issued.token] = issued
        return _Reply(201, {
            "token": issued.token,
            "expires_at": _iso(issued.expires_at),
            "permissions": dict(issued.permissions),
            "repository_selection": issued.repository_selection,
        })

    # ------------------------------------------------------------------ realistic objects

    def _user(self, base: str, login: str, user_id: int, kind: str) -> dict[str, Any]:
        url = f"{base}/users/{quote(login)}"
        return {
            "login": login, "id": user_id, "node_id": _node_id("U_kgDO", user_id),
            "avatar_url": f"{base}/avatars/u/{user_id}?v=4", "gravatar_id": "",
            "url": url, "html_url": f"{base}/{quote(login)}",
            "followers_url": f"{url}/followers", "following_url": f"{url}/following{{/other_user}}",
            "gists_url": f"{url}/gists{{/gist_id}}", "starred_url": f"{url}/starred{{/owner}}{{/repo}}",
            "subscriptions_url": f"{url}/subscriptions", "organizations_url": f"{url}/orgs",
            "repos_url": f"{url}/repos", "events_url": f"{url}/events{{/privacy}}",
            "received_events_url": f"{url}/received_events",
            "type": kind, "user_view_type": "public", "site_admin": False,
        }

    def _creator(self, caller: Any, base: str) -> dict[str, Any]:
        if isinstance(caller, InstallationToken):
            return self._user(base, f"{self.app_slug}[bot]", 41898282, "Bot")
        return self._user(base, self.user_login, 583231, "User")

    @property
    def client_id(self) -> str:
        """The App's client ID; GitHub accepts it as the JWT ``iss`` as well as the App ID."""
        return f"Iv1.{self.app_id or 1:016x}"

    def _app(self, base: str) -> dict[str, Any]:
        app_id = self.app_id if self.app_id is not None else 1
        return {
            "id": app_id,
            "slug": self.app_slug,
            "node_id": _node_id("A_kwHO", app_id),
            "client_id": self.client_id,
            "owner": self._user(base, f"{self.app_slug}-org", 9919, "Organization"),
            "name": self.app_slug,
            "description": "Container images for every push (GitHub stand-in)",
            "external_url": f"{base}/{self.app_slug}-org/{self.app_slug}",
            "html_url": f"{base}/apps/{self.app_slug}",
            "created_at": "2024-01-01T00:00:00Z",
            "updated_at": "2024-01-01T00:00:00Z",
            "permissions": dict(self.app_permissions),
            "events": ["check_run", "check_suite", "pull_request", "push"],
        }


def create_app(standin: GitHubStandIn) -> Starlette:
    """The ASGI app: one route per documented operation (paths straight from api-subset.json)
    and a catch-all so any other method or path is a recorded 404, not a silent pass."""

    def endpoint(operation: Operation | None) -> Callable[[Request], Awaitable[Response]]:
        async def handle(request: Request) -> Response:
            return await standin.handle(request, operation)
        return handle

    routes = [Route(op.path, endpoint(op), methods=[op.method]) for op in standin.operations.values()]
    routes.append(Route("/{path:path}", endpoint(None), methods=_ALL_METHODS))
    return Starlette(routes=routes)
