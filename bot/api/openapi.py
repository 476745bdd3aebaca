"""``GET /openapi.json``: the HTTP interface, described by hand.

Why written rather than generated: Starlette routes carry no types, so there is nothing to
generate from short of moving to another framework, and Starlette's own ``SchemaGenerator``
only stitches together YAML that a person writes into docstrings anyway. One dict, next to the
routes, is as easy to review as the README's tables. The one part that has a single source
elsewhere is generated from it: each telemetry event's ``data`` schema comes from the pydantic
models in :mod:`bot.telemetry`. Drift is caught by the tests: schemathesis checks every
response against this description, and another test that every route is described.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bot import telemetry
from bot.models import BuildStatus

_STR = {"type": "string"}
_INT = {"type": "integer"}
_NULL_STR = {"type": ["string", "null"]}
_NULL_INT = {"type": ["integer", "null"]}
_NULL_NUM = {"type": ["number", "null"]}
_TIME = {"type": "string", "format": "date-time"}
_NULL_TIME = {"type": ["string", "null"], "format": "date-time"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _object(properties: dict[str, Any], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False, "properties": properties,
            "required": [name for name in properties if name not in optional]}


_BUILD = {
    "id": _INT, "provider": {"enum": ["github", "gitlab"]}, "repo": _STR, "ref": _STR, "sha": _STR,
    "kind": {"enum": ["branch", "tag", "pull_request"]}, "pr_number": _NULL_INT, "fork": {"type": "boolean"},
    "trigger": _STR, "status": {"enum": list(BuildStatus.__members__)},
    "visibility": {"enum": ["public", "private"], "description": "the repository's; a private build is "
                   "shown to readers only (read or admin token, or the dashboard's login)"},
    "platforms": {"type": "array", "items": _STR}, "attempts": _INT,
    "created_at": _TIME, "started_at": _NULL_TIME, "finished_at": _NULL_TIME,
    "error": {"oneOf": [{"type": "null"}, _object({"kind": _NULL_STR, "message": _NULL_STR})]},
}
_FAILURE = {"oneOf": [{"type": "null"}, _object({"step": _STR, "kind": _STR, "message": _STR})]}
_PLATFORM_RESULT = _object({
    "platform": _STR,
    "status": {"enum": ["pending", "building", "built", "tagging", "tagged", "pushing", "pushed", "failed",
                        "stopped", "not_built"]},
    "image": _NULL_STR, "image_id": _NULL_STR, "tag": _NULL_STR, "digest": _NULL_STR, "size": _NULL_INT,
    "push_attempts": _INT, "push_skipped": _NULL_STR, "retry_kinds": {"type": "array", "items": _STR},
    "build_retry_kinds": {"type": "array", "items": _STR, "description": "why the platform was built again "
                          "(its base image could not be pulled), one kind per retry"},
    "credential_refreshes": _INT,
    "refresh_outcomes": {"type": "array", "items": {"enum": ["changed", "unchanged", "failed"]}},
    "build_duration_s": _NULL_NUM, "push_duration_s": _NULL_NUM, "error": _FAILURE,
})
_MANIFEST = {"oneOf": [{"type": "null"}, _object({
    "status": {"enum": ["publishing", "published", "failed"]}, "digest": _NULL_STR,
    "tags": {"type": "array", "items": _STR}, "platforms": {"type": "array", "items": _STR},
    "media_type": _STR, "partial": {"type": ["boolean", "null"]}, "retries": _INT,
    "error": {"oneOf": [{"type": "null"}, _object({"kind": _STR, "message": _STR})]},
})]}


def _event_schema(name: str, model: type) -> dict[str, Any]:
    data = model.model_json_schema(mode="serialization")
    data["required"] = list(data["properties"])  # stored events always carry every field
    platform = (_STR if name in telemetry.PLATFORM_EVENTS else
                {"type": "null"} if name in telemetry.BUILD_WIDE_EVENTS else _NULL_STR)
    return _object({"id": _INT, "build_id": _INT, "name": {"const": name}, "platform": platform,
                    "ts": _TIME, "data": data})


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str, **headers: str) -> dict[str, Any]:
    response = _json(_ref("Error"), description)
    if headers:
        response["headers"] = {name: {"schema": _STR, "description": text} for name, text in headers.items()}
    return response


def _text(media_type: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": _STR}}}


_BUILD_ID = {"name": "build_id", "in": "path", "required": True, "schema": {"type": "integer", "minimum": 1},
             "example": 2}
_NOT_FOUND = _error("no such build, or a private one and the request is not a reader's")
#: Reads: anyone for public repositories, readers for private ones and for everything while
#: IMAGEBOT_STATUS_PRIVATE is on.
_READER = [{}, {"reader": []}, {"session": []}]
_UNREAD = _error("IMAGEBOT_STATUS_PRIVATE is on and this request is not a reader's",
                 **{"WWW-Authenticate": "Bearer challenge"})
_FULL = {
    "429": _error("this client has IMAGEBOT_STREAM_MAX_PER_CLIENT streams open", **{"Retry-After": "seconds"}),
    "503": _error("this server has IMAGEBOT_STREAM_MAX streams open", **{"Retry-After": "seconds"}),
}
_TO_LOGIN = {"description": "IMAGEBOT_STATUS_PRIVATE is on and this request is not a reader's: to /login",
             "headers": {"Location": {"schema": _STR}}}
_BAD = _error("a query parameter or header is invalid")
_ADMIN = {
    "401": _error("no bearer token", **{"WWW-Authenticate": "Bearer challenge"}),
    "403": _error("the token is wrong"),
    "404": _NOT_FOUND,
    "503": _error("IMAGEBOT_ADMIN_TOKEN is not set"),
}
_DELIVERY = {
    "type": "object",
    "properties": {"delivery": _NULL_STR, "duplicate": {"type": "boolean"},
                   "duplicate_of": {**_NULL_STR, "description": "a replay: the delivery that first carried this body"},
                   "outcome": {"enum": ["queued", "skipped", "cancelled", "ping", "ignored"]},
                   "reason": _STR, "build_id": _INT, "superseded": {"type": "array", "items": _INT},
                   "cancelled": {"type": "array", "items": _INT}},
    "required": ["delivery", "duplicate", "outcome"],
}
_WEBHOOK_RESPONSES = {
    "200": _json(_DELIVERY, "a redelivery or a replayed body, a ping or a cancelling deletion"),
    "201": _json(_DELIVERY, "a build was queued (or recorded as skipped)"),
    "202": _json(_DELIVERY, "nothing to build; the reason says why"),
    "400": _json(_ref("WebhookError"), "missing headers or a malformed payload"),
    "401": _json(_ref("WebhookError"), "bad signature or token"),
    "413": _json(_ref("WebhookError"), "the body is over IMAGEBOT_MAX_PAYLOAD_BYTES"),
    "503": _json(_ref("WebhookError"), "this forge is not configured"),
}


def _webhook(summary: str, *headers: str) -> dict[str, Any]:
    return {"post": {
        "summary": summary, "tags": ["webhooks"],
        "parameters": [{"name": name, "in": "header", "schema": _STR} for name in headers],
        "requestBody": {"content": {"application/json": {"schema": {"type": "object"}}}},
        "responses": _WEBHOOK_RESPONSES,
    }}


_SSE = _text("text/event-stream",
             "Server-Sent Events: `status`, `telemetry`, `log`, `resync`, `skipped`; see docs/api.md")


def _read(operation: dict[str, Any], dashboard: bool = False) -> dict[str, Any]:
    """A read: open to anyone for public repositories (unless the page is private)."""
    operation["security"] = _READER
    operation["responses"]["303" if dashboard else "401"] = _TO_LOGIN if dashboard else _UNREAD
    return operation


_LOGIN_FORM = {"content": {"application/x-www-form-urlencoded": {"schema": {
    "type": "object", "properties": {"token": _STR, "next": _STR}, "required": ["token"]}}}}


def _spec() -> dict[str, Any]:
    events = {f"Event_{name}": _event_schema(name, model) for name, model in telemetry.SCHEMAS.items()}
    schemas = {
        "Error": {"type": "object", "properties": {"error": _STR}, "required": ["error"]},
        "WebhookError": _object({"error": _STR, "kind": _STR}),
        "Build": _object(_BUILD),
        "BuildDetail": _object({**_BUILD, "results": {"type": "array", "items": _ref("PlatformResult")},
                                "manifest": _MANIFEST}),
        "PlatformResult": _PLATFORM_RESULT,
        "Report": _object({
            "id": _INT,
            "status": {"enum": [*BuildStatus.__members__, "progress"], "description":
                       "the build state reported, or `progress` for an interim check-run update"},
            "state": {"enum": ["pending", "sent", "coalesced", "dead"]},
            "attempts": _INT,
            "targets": {"type": "array", "items": {"enum": ["status", "check_run"]},
                        "description": "where it was delivered already"},
            "created_at": _TIME, "sent_at": _NULL_TIME,
            "next_attempt_at": {**_NULL_TIME, "description": "when it is tried next (pending only)"},
            "last_error": _NULL_STR,
        }),
        "Event": {"oneOf": [_ref(name) for name in events]},
        **events,
    }
    build_filters = [
        {"name": name, "in": "query", "schema": _STR} for name in ("repo", "ref", "sha")
    ] + [
        {"name": "status", "in": "query", "schema": {"enum": list(BuildStatus.__members__)}},
        {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
        {"name": "cursor", "in": "query", "schema": _STR, "description": "`next_cursor` of the previous page"},
    ]
    resume = [
        {"name": "Last-Event-ID", "in": "header", "schema": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"},
         "description": "resume after this position (`<event id>-<log line id>`)"},
        {"name": "after", "in": "query", "schema": {"type": "string", "pattern": "^[0-9]+-[0-9]+$"},
         "description": "the same as Last-Event-ID, for a first connection"},
    ]
    paths = {
        "/healthz": {"get": {"summary": "Whether the database answers", "responses": {
            "200": _json(_object({"status": _STR, "database": _STR}), "healthy"),
            "503": _json(_object({"status": _STR, "database": _STR}), "the database does not answer"),
        }}},
        "/webhooks/github": _webhook("A GitHub webhook delivery (HMAC-signed)",
                                     "X-GitHub-Event", "X-GitHub-Delivery", "X-Hub-Signature-256"),
        "/webhooks/gitlab": _webhook("A GitLab webhook delivery (secret token)",
                                     "X-Gitlab-Event", "X-Gitlab-Token", "Idempotency-Key"),
        "/api/builds": {"get": _read({
            "summary": "Builds, newest first (a reader's: private repositories' too)", "parameters": build_filters,
            "responses": {
                "200": _json(_object({"builds": {"type": "array", "items": _ref("Build")},
                                      "next_cursor": _NULL_STR}), "a page of builds"),
                "400": _BAD,
            }})},
        "/api/builds/{build_id}": {"get": _read({
            "summary": "One build, with per-platform results and the manifest list",
            "parameters": [_BUILD_ID],
            "responses": {"200": _json(_ref("BuildDetail"), "the build"), "404": _NOT_FOUND},
        })},
        "/api/builds/{build_id}/events": {"get": _read({
            "summary": "The build's telemetry events, as stored", "parameters": [_BUILD_ID],
            "responses": {
                "200": _json(_object({"build_id": _INT, "events": {"type": "array", "items": _ref("Event")}}),
                             "the events in order"),
                "404": _NOT_FOUND,
            }})},
        "/api/builds/{build_id}/reports": {"get": _read({
            "summary": "What the build reported to its forge (statuses, check-run updates) and how it went",
            "parameters": [_BUILD_ID],
            "responses": {
                "200": _json(_object({"build_id": _INT, "check_run_id": _NULL_INT,
                                      "reports": {"type": "array", "items": _ref("Report")}}),
                             "the reports in order; ended ones are kept for REPORT_RETENTION_HOURS"),
                "400": _BAD,
                "404": _NOT_FOUND,
            }})},
        "/api/builds/{build_id}/log": {"get": _read({
            "summary": "The build's log as text (`[platform] line`), with byte ranges",
            "parameters": [_BUILD_ID, {"name": "Range", "in": "header", "schema": _STR,
                                       "description": "`bytes=first-[last]` or `bytes=-suffix`"}],
            "responses": {
                "200": _text("text/plain", "the whole log"),
                "206": _text("text/plain", "the requested byte range (see Content-Range)"),
                "400": _BAD,
                "404": _NOT_FOUND,
                "416": _error("the range starts past the end", **{"Content-Range": "bytes */<length>"}),
            }})},
        "/api/builds/{build_id}/stream": {"get": _read({
            "summary": "The build live (SSE), from its first event or after Last-Event-ID",
            "parameters": [_BUILD_ID, *resume],
            "responses": {"200": _SSE, "400": _BAD, "404": _NOT_FOUND, **_FULL},
        })},
        "/api/events": {"get": _read({
            "summary": "All builds live (SSE): status changes, telemetry events, log lines with logs=1",
            "parameters": [{"name": "logs", "in": "query", "schema": {"enum": ["0", "1", "true", "false"]}},
                           *resume],
            "responses": {"200": _SSE, "400": _BAD, **_FULL},
        })},
        "/api/builds/{build_id}/rebuild": {"post": {
            "summary": "Queue the same repo, ref and sha again (trigger `rebuild`)",
            "security": [{"admin": []}], "parameters": [_BUILD_ID],
            "responses": {
                "201": _json(_object({"build": _ref("Build"), "rebuild_of": _INT,
                                      "superseded": {"type": "array", "items": _INT}}), "the new build"),
                **_ADMIN,
            }}},
        "/api/builds/{build_id}/cancel": {"post": {
            "summary": "End a queued or running build as cancelled",
            "security": [{"admin": []}], "parameters": [_BUILD_ID],
            "responses": {
                "200": _json(_object({"build": _ref("Build")}), "the cancelled build"),
                "409": _error("the build had already ended"),
                **_ADMIN,
            }}},
        "/api/repos": {"get": _read({"summary": "Every repo with its last build and success rate", "responses": {
            "200": _json(_object({"repos": {"type": "array", "items": _object({
                "repo": _STR, "builds": _INT, "succeeded": _INT, "failed": _INT,
                "success_rate": _NULL_NUM, "last_build": _ref("Build"),
            })}}), "repos by name (an anonymous reader's: their public builds only)"),
            "400": _BAD,
        }})},
        "/metrics": {"get": _read({"summary": "Prometheus metrics (a reader's only with IMAGEBOT_METRICS_PRIVATE)",
                                   "responses": {"200": _text("text/plain", "Prometheus text format")}})},
        "/openapi.json": {"get": {"summary": "This description", "responses": {
            "200": _json({"type": "object"}, "OpenAPI 3.1")}}},
        "/login": {
            "get": {"summary": "Dashboard: the login form", "tags": ["dashboard"],
                    "parameters": [{"name": "next", "in": "query", "schema": _STR}],
                    "responses": {"200": _text("text/html", "the form")}},
            "post": {"summary": "Dashboard: log in with the read (or admin) token", "tags": ["dashboard"],
                     "requestBody": _LOGIN_FORM, "responses": {
                         "303": {"description": "logged in: a signed, HttpOnly, SameSite session cookie, "
                                                "and on to `next` (a path on this site)",
                                 "headers": {"Location": {"schema": _STR}, "Set-Cookie": {"schema": _STR}}},
                         "401": _text("text/html", "the token is wrong: the form again"),
                         "413": _text("text/html", "the form is over 4 KiB"),
                         "503": _text("text/html", "no read or admin token is configured")}},
        },
        "/logout": {"post": {"summary": "Dashboard: log out (the session cookie is removed)", "tags": ["dashboard"],
                             "responses": {"303": {"description": "to /login", "headers": {
                                 "Location": {"schema": _STR}, "Set-Cookie": {"schema": _STR}}}}}},
        "/": {"get": _read(dashboard=True, operation={
            "summary": "Dashboard: the build list", "tags": ["dashboard"], "parameters": build_filters,
            "responses": {"200": _text("text/html", "the page"), "400": _text("text/html", "a bad filter")}})},
        "/builds/{build_id}": {"get": _read(dashboard=True, operation={
            "summary": "Dashboard: one build", "tags": ["dashboard"], "parameters": [_BUILD_ID], "responses": {
                "200": _text("text/html", "the page"), "404": _text("text/html", "no such build")}})},
        "/builds/{build_id}/live": {"get": _read(dashboard=True, operation={
            "summary": "Dashboard: the build page's live parts (header, results, timeline)",
            "tags": ["dashboard"], "parameters": [_BUILD_ID], "responses": {
                "200": _text("text/html", "an HTML fragment"), "404": _text("text/html", "no such build")}})},
        "/builds/{build_id}/row": {"get": _read(dashboard=True, operation={
            "summary": "Dashboard: the build's row of the list", "tags": ["dashboard"],
            "parameters": [_BUILD_ID], "responses": {
                "200": _text("text/html", "a table row"), "404": _text("text/html", "no such build")}})},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "imagebot", "version": "1",
                 "description": "Webhooks in; builds, their telemetry and logs out. Errors are JSON "
                                "`{\"error\": reason}` (webhooks add `kind`); dashboard pages answer HTML."},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "admin": {"type": "http", "scheme": "bearer", "description": "IMAGEBOT_ADMIN_TOKEN"},
                "reader": {"type": "http", "scheme": "bearer",
                           "description": "IMAGEBOT_READ_TOKEN (the admin token counts as one)"},
                "session": {"type": "apiKey", "in": "cookie", "name": "imagebot_session",
                            "description": "the dashboard's login (POST /login)"},
            },
        },
    }


SPEC = _spec()


async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(SPEC)


routes = [Route("/openapi.json", openapi)]
