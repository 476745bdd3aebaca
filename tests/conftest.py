"""Shared fixtures. Real parts only: tests that need a service start it through scripts/infra,
which installs (as root on Debian) and starts it idempotently."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from starlette.testclient import TestClient

from bot import db as dbmod
from bot.app import create_app
from tests.support import infra, make_settings


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return infra("postgres")["IMAGEBOT_TEST_POSTGRES_URL"]


# -- databases: every DB test runs on SQLite and on PostgreSQL --------------------------------


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file, copied per test (migrating each time would be slow)."""
    path = tmp_path_factory.mktemp("template") / "template.db"
    dbmod.upgrade(f"sqlite:///{path}")
    engine = create_engine(f"sqlite:///{path}")
    with engine.connect() as conn:  # fold the WAL into the main file before copying it
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    engine.dispose()
    return path


@pytest.fixture(scope="session")
def migrated_postgres(postgres_url: str) -> Iterator[str]:
    """A schema of this test session's own (two runs on one machine must not collide)."""
    import uuid

    schema = f"test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    engine = create_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in postgres_url else "?"
    url = f"{postgres_url}{separator}options=-csearch_path%3D{schema}"
    dbmod.upgrade(url)
    yield url
    with engine.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


def _truncate(url: str) -> None:
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text("TRUNCATE reports, build_logs, telemetry_events, deliveries, builds RESTART IDENTITY CASCADE")
        )
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        path = tmp_path / "imagebot.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite:///{path}"
    url = request.getfixturevalue("migrated_postgres")
    _truncate(url)
    return url


@pytest.fixture
def database(sqlite_template: Path, tmp_path: Path) -> Iterator[dbmod.Database]:
    """One migrated SQLite database, for tests of whole builds (one database is enough there;
    the queue and API tests run on both through ``db``)."""
    path = tmp_path / "build.db"
    shutil.copy(sqlite_template, path)
    database = dbmod.Database(f"sqlite:///{path}")
    yield database
    database.close()


@pytest.fixture
def db(db_url: str) -> Iterator[dbmod.Database]:
    database = dbmod.Database(db_url)
    yield database
    database.close()


# -- the app ----------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _no_imagebot_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their settings explicitly; the developer's IMAGEBOT_* must not leak in."""
    for name in list(os.environ):
        if name.startswith("IMAGEBOT_") and not name.startswith("IMAGEBOT_INFRA"):
            monkeypatch.delenv(name)


@pytest.fixture
def client(db: dbmod.Database, db_url: str) -> Iterator[TestClient]:
    """The app without its worker, on the test's database (SQLite and PostgreSQL)."""
    app = create_app(make_settings(db_url), run_worker=False, db=db)
    with TestClient(app, raise_server_exceptions=True) as test_client:
        yield test_client


# -- the time budget --------------------------------------------------------------------------

_MODULE_SECONDS: dict[str, float] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    module = report.nodeid.split("::", 1)[0]
    _MODULE_SECONDS[module] = _MODULE_SECONDS.get(module, 0.0) + report.duration


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Seconds per test module (set-up, call and teardown), slowest first: the whole run must
    stay under 40 minutes on a fresh 2-core machine, so the slow modules are watched here."""
    if not _MODULE_SECONDS:
        return
    terminalreporter.section("seconds per module (slowest 15)")
    ranked = sorted(_MODULE_SECONDS.items(), key=lambda item: item[1], reverse=True)
    for module, seconds in ranked[:15]:
        terminalreporter.write_line(f"{seconds:8.1f}  {module}")
    terminalreporter.write_line(f"{sum(_MODULE_SECONDS.values()):8.1f}  all {len(ranked)} modules")
