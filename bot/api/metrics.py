"""``GET /metrics``: Prometheus metrics, fed from the stored telemetry.

Why from storage, not from the bus: the worker may run in another process (``imagebot
worker``), whose bus this process never sees, and a bus consumer that falls behind is told to
resync, which a counter cannot do. So each scrape reads the telemetry events stored since the
previous one (by id, a page at a time) and counts them; build counts and the queue depth are
read as they are. Counters start at this process's first scrape, as any process's counters
start at zero; Prometheus' ``rate()`` and ``increase()`` take that in their stride. (Several
serving processes on one database each count every event: aggregate those with ``max``.)

Webhook deliveries are counted where they arrive, around the webhook endpoints
(:func:`observed`), so refused ones (bad signature, too large) count too. The same wrapper tells
the live streams which builds a delivery queued, superseded or cancelled.

Each app has its own :class:`~prometheus_client.CollectorRegistry`, so apps in one process
(tests) never share series.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from sqlalchemy import Connection, func, select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bot import queue, telemetry
from bot.api import auth
from bot.api.rest import read
from bot.api.stream import announce
from bot.models import BuildStatus, ReportState, builds, reports, telemetry_events, utcnow
from bot.webhooks.ingress import WebhookError

#: Events read per scrape at most (the rest are counted by the next one).
MAX_EVENTS_PER_SCRAPE = 50_000
_PAGE = 5_000
_BUILD_BUCKETS = (5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)
_PUSH_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
#: Forges reports go to (a series for each, zero until used, so an alert has something to read).
_FORGES = ("github", "gitlab")
#: The header naming a delivery's event, per provider.
_EVENT_HEADER = {"github": "x-github-event", "gitlab": "x-gitlab-event"}
_END_STATUS = {"build_succeeded": "succeeded", "build_failed": "failed", "build_cancelled": "cancelled"}


class Metrics:
    """One app's series, and how far into the telemetry they have counted."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.builds = Gauge("imagebot_builds", "Builds in the database, by status.", ["status"], registry=r)
        self.queue_depth = Gauge("imagebot_queue_depth", "Builds waiting to be claimed.", registry=r)
        self.build_duration = Histogram(
            "imagebot_build_duration_seconds", "Duration of ended builds, by how they ended.",
            ["status"], buckets=_BUILD_BUCKETS, registry=r,
        )
        self.pushes = Counter(
            "imagebot_pushes", "Per-platform image pushes, by result (succeeded, failed, skipped), "
            "failure kind and platform.", ["result", "kind", "platform"], registry=r,
        )
        self.push_duration = Histogram(
            "imagebot_push_duration_seconds", "Duration of successful pushes, retries included.",
            ["platform"], buckets=_PUSH_BUCKETS, registry=r,
        )
        self.push_retries = Counter(
            "imagebot_push_retries", "Retries of pushes (platform set) and manifest publications "
            "(platform empty), by the failure kind that caused them.", ["kind", "platform"], registry=r,
        )
        self.build_retries = Counter(
            "imagebot_build_retries", "Builds run again because a base image could not be pulled, by the "
            "failure kind that caused them.", ["kind", "platform"], registry=r,
        )
        self.credential_refreshes = Counter(
            "imagebot_credential_refreshes", "Registry credential refreshes, by outcome.", ["outcome"], registry=r,
        )
        self.manifests = Counter(
            "imagebot_manifest_publications", "Manifest list publications, by result (published, failed).",
            ["result"], registry=r,
        )
        self.deliveries = Counter(
            "imagebot_webhook_deliveries", "Webhook deliveries received, by provider, event and outcome "
            "(queued, skipped, cancelled, ping, ignored, duplicate, rejected_<why>).",
            ["provider", "event", "outcome"], registry=r,
        )
        self.reports = Gauge(
            "imagebot_reports", "Reports to the forges in the outbox, by forge and state (pending, sent, "
            "coalesced, dead), at scrape; ended ones until REPORT_RETENTION_HOURS.", ["forge", "state"], registry=r,
        )
        self.oldest_pending_report = Gauge(
            "imagebot_report_oldest_pending_seconds", "Age of the oldest report not yet delivered, by forge "
            "(0: none); grows while a forge is down or refuses.", ["forge"], registry=r,
        )
        self.cursor: int | None = None  # the last telemetry event id counted
        self._lock = asyncio.Lock()

    def count(self, event: dict[str, Any]) -> None:
        """Add one stored event (``telemetry.as_dict`` shape) to the series."""
        name, data, platform = event["name"], event["data"], event["platform"] or ""
        if name in _END_STATUS:
            self.build_duration.labels(_END_STATUS[name]).observe(data["duration_s"])
        elif name == "push_succeeded":
            self.pushes.labels("succeeded", "", platform).inc()
            self.push_duration.labels(platform).observe(data["duration_s"])
        elif name == "push_failed":
            self.pushes.labels("failed", data["kind"], platform).inc()
        elif name == "push_skipped":
            self.pushes.labels("skipped", "", platform).inc()
        elif name in ("push_retry", "manifest_retry"):
            self.push_retries.labels(data["kind"], platform).inc()
        elif name == "build_platform_retry":
            self.build_retries.labels(data["kind"], platform).inc()
        elif name == "auth_refresh_succeeded":
            self.credential_refreshes.labels("succeeded").inc()
        elif name == "auth_refresh_failed":
            self.credential_refreshes.labels("failed").inc()
        elif name == "manifest_published":
            self.manifests.labels("published").inc()
        elif name == "manifest_failed":
            self.manifests.labels("failed").inc()

    def _read(self, conn: Connection) -> None:
        if self.cursor is None:
            self.cursor = conn.execute(select(func.coalesce(func.max(telemetry_events.c.id), 0))).scalar_one()
        for _ in range(MAX_EVENTS_PER_SCRAPE // _PAGE):
            rows = conn.execute(
                select(telemetry_events).where(telemetry_events.c.id > self.cursor)
                .order_by(telemetry_events.c.id).limit(_PAGE)
            ).all()
            for row in rows:
                self.count(telemetry.as_dict(row))
                self.cursor = row.id
            if len(rows) < _PAGE:
                break
        by_status = dict(conn.execute(select(builds.c.status, func.count()).group_by(builds.c.status)).all())
        for status in BuildStatus:
            self.builds.labels(status.value).set(by_status.get(status.value, 0))
        self.queue_depth.set(queue.queue_depth(conn))
        self._read_reports(conn)

    def _read_reports(self, conn: Connection) -> None:
        joined = reports.join(builds, builds.c.id == reports.c.build_id)
        counts = {
            (forge, state): n for forge, state, n in conn.execute(
                select(builds.c.provider, reports.c.state, func.count()).select_from(joined)
                .group_by(builds.c.provider, reports.c.state))
        }
        oldest = dict(conn.execute(
            select(builds.c.provider, func.min(reports.c.created_at)).select_from(joined)
            .where(reports.c.state == ReportState.pending.value).group_by(builds.c.provider)
        ).all())
        now = utcnow()
        for forge in _FORGES:
            for state in ReportState:
                self.reports.labels(forge, state.value).set(counts.get((forge, state.value), 0))
            since = oldest.get(forge)
            self.oldest_pending_report.labels(forge).set((now - since).total_seconds() if since else 0.0)

    async def refresh(self, app: Starlette) -> None:
        async with self._lock:  # two scrapes at once must not count the same events twice
            await read(app, self._read)


def metrics_of(app: Starlette) -> Metrics:
    """The app's metrics, made on first use."""
    metrics = getattr(app.state, "metrics", None)
    if metrics is None:
        metrics = app.state.metrics = Metrics()
    return metrics


async def scrape(request: Request) -> Response:
    """The metrics; a reader's only with IMAGEBOT_METRICS_PRIVATE (or STATUS_PRIVATE)."""
    auth.require_metrics_reader(request)
    metrics = metrics_of(request.app)
    await metrics.refresh(request.app)
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


Endpoint = Callable[[Request], Awaitable[Response]]


def observed(provider: str, endpoint: Endpoint) -> Endpoint:
    """``endpoint`` (a webhook), counting each delivery by outcome and announcing the builds
    it changed to the live streams. The event label is the forge's event header once the
    delivery is verified, ``unknown`` for a refused one (its headers are not to be trusted)."""

    async def webhook(request: Request) -> Response:
        deliveries = metrics_of(request.app).deliveries
        try:
            response = await endpoint(request)
        except WebhookError as exc:
            deliveries.labels(provider, "unknown", f"rejected_{exc.kind}").inc()
            raise
        answer = json.loads(response.body)
        event = request.headers.get(_EVENT_HEADER[provider], "unknown")[:64]
        deliveries.labels(provider, event, "duplicate" if answer["duplicate"] else answer["outcome"]).inc()
        if not answer["duplicate"]:
            changed = [answer["build_id"]] if "build_id" in answer else []
            announce(request.app, changed + answer.get("superseded", []) + answer.get("cancelled", []))
        return response

    return webhook


routes = [Route("/metrics", scrape)]
