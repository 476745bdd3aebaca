"""Build logs are bounded: a per-build cap (bytes and lines) ends a flood with one marker line
and one ``log_truncated`` event while the build goes on, and ``/api/builds/{id}/log`` with a
``Range`` reads only the lines in that range from storage. On SQLite and PostgreSQL (and one
real ``RUN yes`` build on the Docker engine)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import event, select, text

from bot import queue, telemetry
from bot.api.rest import log_text
from bot.db import Database
from bot.models import Build, BuildKind, builds, utcnow
from bot.telemetry import Telemetry
from tests.test_queue import enqueue, request

MARKER = "imagebot: the log reached its cap"
#: What the real build prints: 20 million lines of "y".
FLOOD_BYTES = 40_000_000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def stored_log(db, build_id: int) -> list[dict]:
    return db.read_sync(lambda c: telemetry.log_of(c, build_id))


def truncations(db, build_id: int) -> list[dict]:
    return [e for e in db.read_sync(lambda c: telemetry.events_of(c, build_id)) if e["name"] == "log_truncated"]


# -- the cap ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_a_flood_stops_at_the_line_cap_with_one_marker_and_one_event(db):
    from bot.telemetry import LogCaps

    (build_id,) = enqueue(db, request())
    hub = Telemetry(db, log_caps=LogCaps(max_bytes=1 << 20, max_lines=100))
    subscription = hub.bus.subscribe()
    for batch in range(30):  # 3000 lines of `yes`
        await hub.log_lines(build_id, "linux/amd64", ["y"] * 100)
    lines = stored_log(db, build_id)
    assert len(lines) == 101 and [line["line"] for line in lines[:100]] == ["y"] * 100
    assert lines[-1]["line"].startswith(MARKER) and lines[-1]["platform"] is None
    (event_,) = truncations(db, build_id)
    assert event_["data"]["reason"] == "lines" and event_["data"]["lines"] == 101
    size = db.read_sync(lambda c: c.execute(select(builds.c.log_bytes, builds.c.log_lines, builds.c.log_truncated)
                                             .where(builds.c.id == build_id)).one())
    assert tuple(size) == (len(log_text(lines).encode()), 101, True)
    messages = [subscription._queue.get_nowait() for _ in range(subscription._queue.qsize())]
    assert [m["type"] for m in messages] == ["log", "event"]  # one batch, the truncation; then silence


@pytest.mark.anyio
async def test_the_byte_cap_counts_the_log_as_served_and_other_builds_go_on(db, client):
    from bot.telemetry import LogCaps

    full, other = enqueue(db, request(), request(ref="refs/heads/other"))
    hub = Telemetry(db, log_caps=LogCaps(max_bytes=4096, max_lines=100_000))
    line = "é" * 100  # 200 bytes in UTF-8, 214 with "[linux/arm64] " and the newline
    await asyncio.gather(*(hub.log_lines(full, "linux/arm64", [line] * 10) for _ in range(5)))
    await hub.log_lines(other, None, ["still here"])
    body = client.get(f"/api/builds/{full}/log").content
    kept = body.decode().splitlines()
    assert len(kept) == 4096 // 214 + 1 and kept[-1].startswith(f"[build] {MARKER}")
    assert len(body) <= 4096 + 400  # the cap, and the marker after it
    (event_,) = truncations(db, full)
    assert event_["data"] == {"reason": "bytes", "max_bytes": 4096, "max_lines": 100_000,
                              "bytes": len(body), "lines": len(kept)}
    assert client.get(f"/api/builds/{other}/log").text == "[build] still here\n"
    assert truncations(db, other) == []


# -- Range reads ----------------------------------------------------------------------------------


def test_a_range_read_reads_only_its_lines(db, client):
    (build_id,) = enqueue(db, request())
    lines = [f"line {n:06d} " + "x" * (n % 50) for n in range(20_000)]
    for start in range(0, len(lines), 5000):
        db.write_sync(lambda c, s=start: telemetry._store_log_lines(
            c, [(build_id, "linux/amd64", utcnow(), lines[s:s + 5000])]))
    whole = log_text([{"platform": "linux/amd64", "line": line} for line in lines]).encode()

    statements: list[tuple[str, object]] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        if "build_logs" in statement:
            statements.append((statement, parameters))

    event.listen(db.reader_engine, "before_cursor_execute", seen)
    try:
        answer = client.get(f"/api/builds/{build_id}/log", headers={"Range": "bytes=500000-500199"})
    finally:
        event.remove(db.reader_engine, "before_cursor_execute", seen)
    assert answer.status_code == 206 and answer.content == whole[500000:500200]
    assert answer.headers["content-range"] == f"bytes 500000-500199/{len(whole)}"
    # every query the range issued, asked again: how many rows each returns
    assert statements
    for statement, parameters in statements:
        with db.reader_engine.connect() as conn:
            rows = conn.exec_driver_sql(statement, parameters).fetchall()
        assert len(rows) < 20, f"a 200-byte range read {len(rows)} of the log's 20000 lines: {statement}"

    suffix = client.get(f"/api/builds/{build_id}/log", headers={"Range": "bytes=-1000"})
    assert suffix.status_code == 206 and suffix.content == whole[-1000:]
    assert client.get(f"/api/builds/{build_id}/log").content == whole


# -- a real flood on the Docker engine --------------------------------------------------------------


def test_a_real_run_yes_build_is_capped_and_goes_on(database, tmp_path):
    """``RUN yes | head -c 40000000`` prints 20 million lines; with a cap of 2000 lines the log
    has 2000 lines and the marker, the database nothing more, and the build still succeeds."""
    from bot.pipeline.run import Pipeline
    from bot.telemetry import LogCaps
    from tests.standins.git_http import GitHTTPServer, make_repo
    from tests.support import infra, make_settings

    services = infra("docker", "registry", "base-image")
    dockerfile = (f"FROM {services['IMAGEBOT_TEST_BASE_IMAGE']}\n"  # a new layer each run: the flood runs
                  f"RUN echo run-{uuid.uuid4().hex} && yes | head -c {FLOOD_BYTES}\nRUN echo after-the-flood\n")
    repo = make_repo(tmp_path / "srv", "acme/app", {"Dockerfile": dockerfile})
    with GitHTTPServer(tmp_path / "srv") as server:
        request_ = queue.BuildRequest(provider="github", repo="acme/app", clone_url=server.repo_url("acme/app"),
                                      ref="refs/heads/main", sha=repo.head(), kind=BuildKind.branch,
                                      trigger="push", default_branch="main")
        info = queue.DeliveryInfo("github", uuid.uuid4().hex, "push", None, "acme/app")
        build_id = database.write_sync(
            lambda c: queue.record_delivery(c, info, request_, ["linux/amd64"], utcnow())).build_id
        row = database.read_sync(lambda c: c.execute(select(builds).where(builds.c.id == build_id)).one())
        settings = make_settings(
            database.url, platforms=["linux/amd64"], log_max_lines=2000,
            registry=f"{services['IMAGEBOT_TEST_REGISTRY']}/logs{uuid.uuid4().hex[:8]}",
            registry_username=services["IMAGEBOT_TEST_REGISTRY_USERNAME"],
            registry_password=services["IMAGEBOT_TEST_REGISTRY_PASSWORD"],
        )

        async def go():
            pipeline = Pipeline(settings, Telemetry(database, log_caps=LogCaps.of(settings)))
            try:
                return await pipeline(Build.model_validate(row._asdict()))
            finally:
                await pipeline.aclose()

        outcome = asyncio.run(go())
    assert outcome.status.value == "succeeded", outcome
    lines = stored_log(database, build_id)
    assert len(lines) == 2001
    assert [line["line"] for line in lines].count("y") > 1000
    assert sum(line["line"].startswith(MARKER) for line in lines) == 1 and lines[-1]["line"].startswith(MARKER)
    (event_,) = truncations(database, build_id)
    assert event_["data"]["reason"] == "lines"
    names = [e["name"] for e in database.read_sync(lambda c: telemetry.events_of(c, build_id))]
    assert names.index("log_truncated") < names.index("build_platform_succeeded")
    assert database.read_sync(lambda c: c.execute(text("SELECT count(*) FROM build_logs")).scalar_one()) == 2001


# -- the migration ----------------------------------------------------------------------------------


def test_the_migration_gives_old_logs_their_offsets_and_old_builds_privacy(tmp_path):
    from bot import db as dbmod
    from bot.api.rest import log_page

    url = f"sqlite:///{tmp_path / 'old.db'}"
    dbmod.upgrade(url, "0004")
    engine = dbmod.make_engine(url, writer=True)
    with engine.begin() as conn:
        for build_id in (1, 2):
            conn.execute(text(
                "INSERT INTO builds (id, provider, repo, clone_url, ref, sha, kind, fork, trigger, status, platforms,"
                " created_at, attempts) VALUES (:i, 'github', 'acme/app', 'https://x.test/a.git', 'refs/heads/main',"
                " 'a', 'branch', 0, 'push', 'succeeded', '[\"linux/amd64\"]', '2026-01-01 00:00:00', 1)"), {"i": build_id})
        old = [(1, None, "fetched"), (2, "linux/amd64", "other build"), (1, "linux/amd64", "Step 1/2 : FROM ü")]
        for build_id, platform, line in old:
            conn.execute(text("INSERT INTO build_logs (build_id, platform, ts, line) VALUES (:b, :p, "
                              "'2026-01-01 00:00:01', :l)"), {"b": build_id, "p": platform, "l": line})
    engine.dispose()
    dbmod.upgrade(url)
    database = Database(url)
    try:
        rows = database.read_sync(lambda c: c.execute(
            select(builds.c.id, builds.c.visibility, builds.c.log_bytes, builds.c.log_lines).order_by(builds.c.id)).all())
        first = "[build] fetched\n[linux/amd64] Step 1/2 : FROM ü\n".encode()
        assert [tuple(r) for r in rows] == [(1, "private", len(first), 2),
                                            (2, "private", len("[linux/amd64] other build\n"), 1)]
        ends = [r.end_offset for r in database.read_sync(lambda c: log_page(c, 1, 0, None, 10))]
        assert ends == [len("[build] fetched\n"), len(first)]
    finally:
        database.close()
