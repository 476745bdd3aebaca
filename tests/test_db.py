"""The database layer: migrations match the models, SQLite runs in WAL with a busy timeout,
and group commits isolate a failing piece of work."""

from __future__ import annotations

import threading

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import insert, select, text
from sqlalchemy.exc import IntegrityError
from sqlmodel import SQLModel

from bot import db as dbmod
from bot.models import deliveries, utcnow


def test_migrations_match_the_models(db):
    with db.writer_engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), SQLModel.metadata)
    assert diff == []


def test_upgrade_is_idempotent(db_url):
    dbmod.upgrade(db_url)
    dbmod.upgrade(db_url)


def test_sqlite_pragmas(tmp_path):
    database = dbmod.Database(f"sqlite:///{tmp_path / 'x.db'}")
    mode, timeout = database.read_sync(
        lambda c: (c.exec_driver_sql("PRAGMA journal_mode").scalar(), c.exec_driver_sql("PRAGMA busy_timeout").scalar())
    )
    database.close()
    assert (mode, timeout) == ("wal", dbmod.SQLITE_BUSY_TIMEOUT_MS)


def _delivery(delivery_id: str):
    def work(conn):
        conn.execute(insert(deliveries).values(
            provider="github", delivery_id=delivery_id, event="push", received_at=utcnow(), outcome="ignored",
        ))
        return delivery_id
    return work


def test_group_commit_isolates_a_failing_piece(db):
    """Many writes queued at once share commits; a duplicate key fails alone."""
    db.write_sync(_delivery("taken"))
    gate = threading.Event()
    db.submit(lambda conn: gate.wait(10))  # hold the writer so the next ones queue up together
    futures = [db.submit(_delivery(f"d{i}")) for i in range(10)]
    futures.insert(5, db.submit(_delivery("taken")))
    gate.set()
    results = []
    for future in futures:
        try:
            results.append(future.result(timeout=30))
        except IntegrityError:
            results.append("integrity")
    assert results == [f"d{i}" for i in range(5)] + ["integrity"] + [f"d{i}" for i in range(5, 10)]
    stored = db.read_sync(lambda c: sorted(r.delivery_id for r in c.execute(select(deliveries.c.delivery_id))))
    assert stored == sorted(["taken", *[f"d{i}" for i in range(10)]])


def test_read_and_ping(db):
    db.ping()
    assert db.read_sync(lambda c: c.execute(text("SELECT 41 + 1")).scalar_one()) == 42


def test_closed_database_finishes_queued_writes(db_url):
    database = dbmod.Database(db_url)
    future = database.submit(_delivery("last"))
    database.close()
    assert future.result(timeout=1) == "last"


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_urls(request, tmp_path):
    """Makers of URLs of empty databases (SQLite files, PostgreSQL schemas), dropped after."""
    if request.param == "sqlite":
        yield lambda n: f"sqlite:///{tmp_path / f'fresh-{n}.db'}"
        return
    import uuid

    from sqlalchemy import create_engine

    base = request.getfixturevalue("postgres_url")
    engine = create_engine(base)
    schemas: list[str] = []

    def make(n: int) -> str:
        schemas.append(f"fresh_{uuid.uuid4().hex[:12]}")
        with engine.begin() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schemas[-1]}"'))
        return f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schemas[-1]}"

    yield make
    with engine.begin() as conn:
        for schema in schemas:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


def test_concurrent_upgrades_of_a_fresh_schema_both_succeed(fresh_urls):
    """``serve`` and ``worker`` starting together migrate the same empty database: one waits
    for the other (an advisory lock on PostgreSQL) and finds the schema at head."""
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    head = ScriptDirectory(str(dbmod.MIGRATIONS)).get_current_head()
    for n in range(3):  # a race may be missed once; three fresh schemas in a row do not all miss it
        url = fresh_urls(n)
        start = threading.Barrier(2)
        errors: list[BaseException] = []

        def migrate(url=url, start=start):
            start.wait()
            try:
                dbmod.upgrade(url)
            except BaseException as exc:  # noqa: BLE001 - collected and asserted on below
                errors.append(exc)

        threads = [threading.Thread(target=migrate) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert errors == [], f"round {n}: {errors!r}"
        engine = dbmod.make_engine(url, writer=False)
        with engine.connect() as conn:
            assert MigrationContext.configure(conn).get_current_revision() == head
        engine.dispose()


def test_0005_rekeys_pending_reports_with_the_ref_and_back(fresh_urls):
    """Reports still pending when 0005 runs get the key their builds' new reports will have, so
    they stay in line with them; a downgrade puts the old keys back."""
    from alembic import command

    from bot.reporters import outbox

    url = fresh_urls(0)
    dbmod.upgrade(url, "0004")
    engine = dbmod.make_engine(url, writer=True)
    old_key = "github:acme/app@" + "a" * 40 + "#push"
    with engine.begin() as conn:
        conn.execute(text(
            "INSERT INTO builds (id, provider, repo, clone_url, ref, sha, kind, fork, trigger, status, platforms,"
            " created_at, attempts) VALUES (1, 'github', 'acme/app', 'https://g/a.git', 'refs/tags/v1', :sha, 'tag',"
            " false, 'push', 'queued', '[]', :now, 0)"), {"sha": "a" * 40, "now": utcnow().replace(tzinfo=None)})
        for state in ("pending", "sent"):
            conn.execute(text(
                "INSERT INTO reports (build_id, key, status, state, created_at, next_attempt_at, attempts, done)"
                " VALUES (1, :key, 'queued', :state, :now, :now, 0, '[]')"),
                {"key": old_key, "state": state, "now": utcnow().replace(tzinfo=None)})

    def keys() -> dict[str, str]:
        with engine.connect() as conn:
            return dict(conn.execute(text("SELECT state, key FROM reports")).all())

    dbmod.upgrade(url)
    assert keys() == {"pending": outbox.report_key("github", "acme/app", "a" * 40, "tag", "refs/tags/v1"),
                      "sent": old_key}
    with engine.begin() as conn:
        config = dbmod.alembic_config(url)
        config.attributes["connection"] = conn
        command.downgrade(config, "0004")
    assert keys() == {"pending": old_key, "sent": old_key}
    engine.dispose()
