"""``/openapi.json`` describes every route, and the app keeps to it: schemathesis generates
requests from the description (valid and invalid ones) and checks every response against it:
no 5xx, documented status codes, content types, headers and bodies.

The database is seeded with builds that have telemetry and logs, so that the generated ids
also reach the 200 paths; examples per operation are bounded to keep the run short.
"""

from __future__ import annotations

import shutil

import pytest
import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance
from hypothesis import HealthCheck, settings
from starlette.routing import Mount, Route

from bot.api.openapi import SPEC
from bot.app import create_app
from bot.db import Database
from tests.support import make_settings
from tests.test_api_rest import record_all
from tests.test_summary import whole_build
from tests.test_queue import LEASE, T0, enqueue, request

ADMIN_TOKEN = "schemathesis-admin"
#: Endless responses: the streams are tested by tests/test_api_stream.py.
STREAMS = r"/stream$|^/api/events$"


def test_every_route_is_described_and_nothing_else():
    app = create_app(make_settings(), run_worker=False)
    served = {
        (route.path, method.lower())
        for route in app.routes if isinstance(route, Route)
        for method in route.methods or () if method != "HEAD"
    }
    described = {(path, method) for path, operations in SPEC["paths"].items() for method in operations}
    assert served == described
    assert {route.path for route in app.routes if isinstance(route, Mount)} == {"/static"}


def test_the_description_is_served(client):
    assert client.get("/openapi.json").json() == SPEC


@pytest.fixture(scope="module")
def served(sqlite_template, tmp_path_factory):
    """``imagebot serve --no-worker`` on a database with builds, telemetry and a log."""
    from bot import queue, telemetry
    from bot.models import utcnow
    from tests.test_api_stream import serving

    tmp = tmp_path_factory.mktemp("openapi")
    shutil.copy(sqlite_template, tmp / "api.db")
    url = f"sqlite:///{tmp / 'api.db'}"
    db = Database(url)
    ids = enqueue(db, *[request(ref=f"refs/heads/b{i}", sha=f"{i:040x}") for i in range(4)])
    db.write_sync(lambda c: queue.claim(c, "w", LEASE, T0))
    record_all(db, ids[1], whole_build())
    db.write_sync(lambda c: telemetry._store_log_lines(c, [(ids[1], "linux/amd64", utcnow(), ["é ü ✓ log"])]))
    db.close()
    env = {"IMAGEBOT_ADMIN_TOKEN": ADMIN_TOKEN, "IMAGEBOT_GITLAB_WEBHOOK_TOKEN": "gitlab-token"}
    with serving(url, tmp / "bot.log", "--no-worker", env=env) as base:
        yield base


schema = schemathesis.openapi.from_dict(SPEC).exclude(path_regex=STREAMS)


@schema.parametrize()
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
def test_responses_match_the_description(case, served):
    # Whether these are accepted depends on the data, not on their form: only cursors that were
    # handed out work, a byte range must start inside the log (else 416, documented), and only
    # the configured token logs in (else 401, documented).
    data_dependent = ("cursor" in (case.query or {}) or "Range" in (case.headers or {})
                      or (case.path, case.method.upper()) == ("/login", "POST"))
    opaque = [positive_data_acceptance] if data_dependent else []
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"} if case.path.endswith(("/rebuild", "/cancel")) else {}
    case.call_and_validate(base_url=served, headers=admin, excluded_checks=opaque)
