"""``/metrics``: Prometheus series fed from the stored telemetry and from the webhook endpoints,
one registry per app."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from bot import queue
from bot.app import create_app
from tests.support import gitlab_payload, github_payload, make_settings, post_github, post_gitlab
from tests.test_api_rest import record_all
from tests.test_summary import AMD, ARM, events, whole_build
from tests.test_queue import LEASE, T0, enqueue, request


def scrape(client: TestClient) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def failing_build() -> list[dict]:
    return events(
        (0, "build_started", None, {"attempt": 1}),
        (1, "build_platform_retry", ARM, {"attempt": 1, "delay_s": 0.3, "kind": "network", "refreshed": False,
                                          "detail": "connection refused"}),
        (1, "push_skipped", ARM, {"reason": "--no-push was given"}),
        (2, "push_failed", AMD, {"tag": "t", "kind": "denied", "attempts": 1, "retries": 0, "detail": "denied"}),
        (2, "auth_refresh_failed", AMD, {"registry": "r", "source": "settings", "kind": "auth", "message": "same"}),
        (3, "manifest_retry", None, {"attempt": 1, "delay_s": 0.1, "kind": "registry", "refreshed": False,
                                     "detail": "502"}),
        (4, "manifest_failed", None, {"kind": "registry", "message": "502", "attempts": 2}),
        (5, "build_failed", None, {"duration_s": 42.0, "error_kind": "registry", "error_message": "502",
                                   "step": "manifest"}),
    )


def test_telemetry_is_counted_from_the_first_scrape_on(client, db):
    early, good, bad = enqueue(db, request(ref="refs/heads/a"), request(ref="refs/heads/b"), request(ref="refs/heads/c"))
    record_all(db, early, whole_build())  # before the first scrape: not counted
    before = scrape(client)
    assert value(before, "imagebot_pushes_total", result="succeeded", kind="", platform=AMD) == 0
    record_all(db, good, whole_build())
    record_all(db, bad, failing_build())
    after = scrape(client)
    assert value(after, "imagebot_pushes_total", result="succeeded", kind="", platform=AMD) == 1
    assert value(after, "imagebot_pushes_total", result="succeeded", kind="", platform=ARM) == 1
    assert value(after, "imagebot_pushes_total", result="failed", kind="denied", platform=AMD) == 1
    assert value(after, "imagebot_pushes_total", result="skipped", kind="", platform=ARM) == 1
    assert value(after, "imagebot_push_retries_total", kind="auth", platform=AMD) == 1
    assert value(after, "imagebot_push_retries_total", kind="registry", platform="") == 1
    assert value(after, "imagebot_build_retries_total", kind="network", platform=ARM) == 1
    assert value(after, "imagebot_credential_refreshes_total", outcome="succeeded") == 1
    assert value(after, "imagebot_credential_refreshes_total", outcome="failed") == 1
    assert value(after, "imagebot_manifest_publications_total", result="published") == 1
    assert value(after, "imagebot_manifest_publications_total", result="failed") == 1
    assert value(after, "imagebot_build_duration_seconds_count", status="succeeded") == 1
    assert value(after, "imagebot_build_duration_seconds_sum", status="failed") == 42.0
    assert value(after, "imagebot_build_duration_seconds_bucket", status="failed", le="60.0") == 1
    assert value(after, "imagebot_build_duration_seconds_bucket", status="failed", le="30.0") == 0
    assert value(after, "imagebot_push_duration_seconds_sum", platform=AMD) == 4.0
    # scraping again counts nothing twice (only timestamps and ages move)
    again = scrape(client)
    moving = {k: v for k, v in again.items() if k[0].endswith("_created") or k[0].endswith("_oldest_pending_seconds")}
    assert again == after | moving


def test_builds_by_status_and_queue_depth_are_read_at_scrape(client, db):
    enqueue(db, request(ref="refs/heads/a"), request(ref="refs/heads/b"), request(ref="refs/heads/b"))
    db.write_sync(lambda c: queue.claim(c, "w", LEASE, T0))
    samples = scrape(client)
    assert value(samples, "imagebot_builds", status="running") == 1
    assert value(samples, "imagebot_builds", status="queued") == 1
    assert value(samples, "imagebot_builds", status="superseded") == 1
    assert value(samples, "imagebot_builds", status="failed") == 0  # every status has a series
    assert value(samples, "imagebot_queue_depth") == 1


def test_webhook_deliveries_by_provider_event_and_outcome(client):
    payload = github_payload("push.payload.4")
    assert post_github(client, "push", payload, "m-1").status_code == 201
    assert post_github(client, "push", payload, "m-1").status_code == 200  # redelivered
    assert post_github(client, "ping", {"zen": "hi", "hook_id": 1}, "m-2").status_code == 200
    bad = client.post("/webhooks/github", content=b"{}", headers={"x-github-event": "push", "x-hub-signature-256": "sha256=00"})
    assert bad.status_code == 401
    assert post_gitlab(client, "Push Hook", gitlab_payload("push"), "m-3").status_code == 201
    assert post_gitlab(client, "Push Hook", gitlab_payload("push"), token="wrong").status_code == 401
    samples = scrape(client)
    name = "imagebot_webhook_deliveries_total"
    assert value(samples, name, provider="github", event="push", outcome="queued") == 1
    assert value(samples, name, provider="github", event="push", outcome="duplicate") == 1
    assert value(samples, name, provider="github", event="ping", outcome="ping") == 1
    # a refused delivery's headers are not trusted with a label of its own
    assert value(samples, name, provider="github", event="unknown", outcome="rejected_signature") == 1
    assert value(samples, name, provider="gitlab", event="Push Hook", outcome="queued") == 1
    assert value(samples, name, provider="gitlab", event="unknown", outcome="rejected_token") == 1


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_each_app_has_its_own_registry(db, db_url):
    apps = [create_app(make_settings(db_url), run_worker=False, db=db) for _ in range(2)]
    with TestClient(apps[0]) as first, TestClient(apps[1]) as second:
        post_github(first, "push", github_payload("push.payload.4"), "r-1")
        counted = value(scrape(first), "imagebot_webhook_deliveries_total", provider="github", event="push",
                        outcome="queued")
        assert counted == 1
        assert value(scrape(second), "imagebot_webhook_deliveries_total", provider="github", event="push",
                     outcome="queued") == 0


def test_reports_by_forge_and_state_and_the_oldest_pending_age(client, db):
    from sqlalchemy import select

    from bot.models import reports, utcnow

    enqueue(db, request(ref="refs/heads/a"), request(ref="refs/heads/b"), request(ref="refs/heads/b"))
    ids = db.read_sync(lambda c: c.execute(select(reports.c.id).order_by(reports.c.id)).scalars().all())
    assert len(ids) == 4  # a queued; b queued, then superseded by the second b, queued
    db.write_sync(lambda c: [c.execute(reports.update().where(reports.c.id == i).values(state=state))
                             for i, state in ((ids[0], "sent"), (ids[1], "dead"))])
    samples = scrape(client)
    assert [value(samples, "imagebot_reports", forge="github", state=s) for s in ("pending", "sent", "dead")] == [2, 1, 1]
    assert value(samples, "imagebot_reports", forge="gitlab", state="pending") == 0
    assert ("imagebot_reports", frozenset({"forge": "gitlab", "state": "dead"}.items())) in samples
    oldest = value(samples, "imagebot_report_oldest_pending_seconds", forge="github")
    assert oldest == pytest.approx((utcnow() - T0).total_seconds(), abs=60)  # the reports were owed at T0
    assert value(samples, "imagebot_report_oldest_pending_seconds", forge="gitlab") == 0
