"""The Starlette application: routes, error handling, and the lifespan that owns the database
and (unless disabled) the in-process worker."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bot.api import admin, dashboard, metrics, openapi, rest, stream
from bot.db import Database
from bot.settings import Settings
from bot.webhooks import github, gitlab
from bot.webhooks.ingress import WebhookError
from bot.pipeline.run import Pipeline, runner_for
from bot.reporters import outbox
from bot.reporters.sender import Sender
from bot.telemetry import LogCaps, Telemetry
from bot.worker import RunBuild, Worker

log = logging.getLogger(__name__)


async def healthz(request: Request) -> JSONResponse:
    try:
        await request.app.state.db.read(lambda conn: conn.exec_driver_sql("SELECT 1").scalar())
    except Exception as exc:  # noqa: BLE001 - any failure means "not healthy"
        log.warning("health check failed: %s", type(exc).__name__)
        return JSONResponse({"status": "unhealthy", "database": "unreachable"}, 503)
    return JSONResponse({"status": "ok", "database": "ok"})


async def _webhook_error(request: Request, exc: WebhookError) -> JSONResponse:
    return JSONResponse({"error": exc.reason, "kind": exc.kind}, exc.status)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse({"error": exc.detail}, exc.status_code, headers=exc.headers)


async def _client_gone(request: Request, exc: ClientDisconnect) -> Response:
    """The client closed the connection before it sent its whole request: nothing to answer
    and nothing wrong with the bot (a forge's timeout, a proxy, a port scan)."""
    log.debug("client went away during %s %s", request.method, request.url.path)
    return Response(status_code=400)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": "internal error; see the bot's log"}, 500)


def create_app(
    settings: Settings,
    *,
    run_worker: bool = True,
    run_build: RunBuild | None = None,
    db: Database | None = None,
) -> Starlette:
    """The bot as an ASGI app. ``db`` may be passed in (tests); otherwise the app owns one."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        database = db or Database(settings.database_url.get_secret_value())
        app.state.db = database
        app.state.telemetry = Telemetry(database, progress_to=outbox.progress_to(settings),
                                        log_caps=LogCaps.of(settings))
        runner = run_build or runner_for(settings, app.state.telemetry)
        worker = Worker(database, settings, runner, bus=app.state.telemetry.bus) if run_worker else None
        sender = Sender(database, settings, bus=app.state.telemetry.bus)
        app.state.worker, app.state.sender = worker, sender

        def notify_queued() -> None:
            sender.wake()
            if worker:
                worker.wake()

        def notify_ended(build_ids: list[int]) -> None:
            sender.wake()
            if worker:
                worker.stop_builds(build_ids)

        app.state.notify_queued, app.state.notify_ended = notify_queued, notify_ended
        task = asyncio.create_task(worker.run(), name="worker") if worker else None
        sending = asyncio.create_task(sender.run(), name="report-sender")
        try:
            yield
        finally:
            watcher = getattr(app.state, "stream_watcher", None)
            if watcher is not None:
                watcher.cancel()
            if worker and task:
                worker.stop()
                await task
            if isinstance(runner, Pipeline):
                await runner.aclose()
            sender.stop()  # after the worker: its last reports are owed by now
            await sending
            if db is None:
                database.close()

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/webhooks/github", metrics.observed("github", github.webhook), methods=["POST"]),
            Route("/webhooks/gitlab", metrics.observed("gitlab", gitlab.webhook), methods=["POST"]),
            *rest.routes,
            *admin.routes,
            *stream.routes,
            *metrics.routes,
            *openapi.routes,
            *dashboard.routes,
        ],
        exception_handlers={
            WebhookError: _webhook_error,
            ClientDisconnect: _client_gone,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    app.state.settings = settings
    return app
