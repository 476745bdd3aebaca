"""The status page: server-rendered HTML (Jinja2) with a little JavaScript on top.

``/`` lists builds (filters and paging are plain links and a GET form, so it works without
JavaScript); ``/builds/{id}`` shows one build: its per-platform results and digests, a timeline
with one lane per platform, and the tail of its log. ``bot/api/static/dashboard.js`` keeps both
live over the SSE streams by fetching the server's own fragments (``/builds/{id}/row``,
``/builds/{id}/live``) when something changes, so every piece of HTML has one template. Reports
link here (``{IMAGEBOT_PUBLIC_URL}/builds/{id}``). Pages answer errors in HTML; the API in JSON.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import Connection, func, select
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from bot import telemetry
from bot import retention, summary
from bot.api import auth
from bot.api.rest import build_detail, build_id_of, build_json, build_row, page_of_builds, read
from bot.api.stream import Position, current_position
from bot.models import BuildStatus, build_logs, telemetry_events, utcnow
from bot.reporters import outbox

#: Log lines a build page shows at first (the whole log is at /api/builds/{id}/log).
LOG_TAIL = 300


def _seconds(value: float | None) -> str:
    if value is None:
        return "–"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(round(value)), 60)
    return f"{minutes} min {seconds:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


def _when(value: str | None) -> str:
    return "–" if value is None else value.replace("T", " ")[:19] + " UTC"


def _took(build: dict[str, Any]) -> float | None:
    if not build["started_at"]:
        return None
    end = build["finished_at"] or utcnow().isoformat()
    return (_parse(end) - _parse(build["started_at"])).total_seconds()


def _parse(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _size(value: int | None) -> str:
    return "–" if value is None else f"{value:,} B"  # manifests: bytes, not megabytes


def _short_ref(ref: str) -> str:
    for prefix in ("refs/heads/", "refs/tags/"):
        if ref.startswith(prefix):
            return ref[len(prefix):]
    return ref


_env = Environment(loader=PackageLoader("bot.api", "templates"), autoescape=select_autoescape())
_env.filters.update(seconds=_seconds, when=_when, size=_size, short_ref=_short_ref)
_env.globals.update(statuses=list(BuildStatus.__members__), took=_took)
templates = Jinja2Templates(env=_env)


def _page(request: Request, name: str, context: dict[str, Any], status: int = 200) -> Response:
    context = {"reader": auth.is_reader(request), "logins": auth.logins_on(request.app.state.settings), **context}
    return templates.TemplateResponse(request, name, context, status_code=status)


def _error(request: Request, exc: HTTPException) -> Response:
    if exc.status_code == 401:  # the page is private (IMAGEBOT_STATUS_PRIVATE): log in first
        return RedirectResponse("/login?" + urlencode({"next": request.url.path}), 303)
    return _page(request, "error.html", {"status": exc.status_code, "reason": exc.detail}, exc.status_code)


async def build_list(request: Request) -> Response:
    try:
        page, next_cursor = await page_of_builds(request)
        position = await read(request.app, current_position)  # the script goes on from here
    except HTTPException as exc:
        return _error(request, exc)
    filters = {name: request.query_params.get(name, "") for name in ("repo", "ref", "sha", "status")}
    kept = {name: value for name, value in request.query_params.items() if value and name != "cursor"}
    return _page(request, "builds.html", {
        "builds": [build_json(row) for row in page],
        "filters": filters,
        "first_page": not request.query_params.get("cursor"),
        "position": str(position),
        "newest_url": "/?" + urlencode(kept),
        "older_url": "/?" + urlencode({**kept, "cursor": next_cursor}) if next_cursor else None,
    })


def _read_build(conn: Connection, build_id: int, tail: int, logs_since: datetime | None = None,
                public_only: bool = False) -> dict[str, Any]:
    row = build_row(conn, build_id, public_only)
    events = telemetry.events_of(conn, build_id)
    lines = []
    if tail:
        lines = list(conn.execute(
            select(build_logs).where(build_logs.c.build_id == build_id).order_by(build_logs.c.id.desc()).limit(tail)
        ))[::-1]
    last_log = conn.execute(
        select(func.coalesce(func.max(build_logs.c.id), 0)).where(build_logs.c.build_id == build_id)
    ).scalar_one()
    last_event = conn.execute(
        select(func.coalesce(func.max(telemetry_events.c.id), 0)).where(telemetry_events.c.build_id == build_id)
    ).scalar_one()
    detail = build_detail(row, events)
    owed = outbox.reports_of(conn, build_id)
    return {
        "build": detail,
        "reports": {"rows": [r for r in owed if r["state"] != "coalesced"],
                    "coalesced": sum(1 for r in owed if r["state"] == "coalesced")},
        "timeline": summary.timeline(row.platforms, events, utcnow()),
        "lines": lines,
        "position": str(Position(last_event, last_log)),
        "log_lines": last_log,
        # its log was deleted (bot.retention): say so rather than show an empty log
        "log_pruned": not last_log and logs_since is not None and row.finished_at is not None
                      and row.finished_at < logs_since,
    }


async def _build_context(request: Request, tail: int) -> dict[str, Any] | Response:
    try:
        build_id = build_id_of(request)
        hidden = auth.public_only(request)
        logs_since = retention.logs_kept_since(request.app.state.settings, utcnow())
        return await read(request.app, lambda conn: _read_build(conn, build_id, tail, logs_since, hidden))
    except HTTPException as exc:
        return _error(request, exc)


async def build_page(request: Request) -> Response:
    context = await _build_context(request, LOG_TAIL)
    if isinstance(context, Response):
        return context
    return _page(request, "build.html", {**context, "log_tail": LOG_TAIL,
                                         "settings_log_days": f"{request.app.state.settings.log_retention_days:g}"})


async def build_live(request: Request) -> Response:
    """The parts of a build page that change (header, results, timeline), for the script."""
    context = await _build_context(request, 0)
    if isinstance(context, Response):
        return context
    return _page(request, "_live.html", context)


async def build_list_row(request: Request) -> Response:
    try:
        build_id = build_id_of(request)
        hidden = auth.public_only(request)
        row = await read(request.app, lambda conn: build_row(conn, build_id, hidden))
    except HTTPException as exc:
        return _error(request, exc)
    return _page(request, "_row.html", {"build": build_json(row)})


async def login(request: Request) -> Response:
    """The login form (GET) and its answer (POST): the right token sets the signed session
    cookie and goes on to ``next``; a wrong one shows the form again (401)."""
    settings = request.app.state.settings
    if request.method == "GET":
        return _page(request, "login.html", {"next": auth.next_path(request.query_params.get("next")),
                                             "error": None})
    if not auth.logins_on(settings):
        return _page(request, "login.html", {"next": "/", "error": "logins are off: no read token is "
                                                                    "configured (IMAGEBOT_READ_TOKEN)"}, 503)
    try:
        token, target = await auth.login_form(request)
    except HTTPException as exc:
        return _error(request, exc)
    if not auth.token_ok(settings, token):
        return _page(request, "login.html", {"next": target, "error": "that token is wrong"}, 401)
    response = RedirectResponse(target, 303)
    auth.start_session(response, settings)
    return response


async def logout(request: Request) -> Response:
    response = RedirectResponse("/login", 303)
    auth.end_session(response)
    return response


routes = [
    Route("/login", login, methods=["GET", "POST"]),
    Route("/logout", logout, methods=["POST"]),
    Route("/", build_list),
    Route("/builds/{build_id}", build_page),
    Route("/builds/{build_id}/live", build_live),
    Route("/builds/{build_id}/row", build_list_row),
    Mount("/static", StaticFiles(packages=[("bot.api", "static")]), name="static"),
]
