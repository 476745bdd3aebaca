"""The command line: clear messages and non-zero exits, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from sqlalchemy import create_engine, inspect

from tests.support import ROOT


def imagebot(*args: str, env: dict[str, str] | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEBOT_")}
    return subprocess.run(
        [sys.executable, "-m", "bot.cli", *args], env={**base, **(env or {})},
        capture_output=True, text=True, timeout=120, cwd=cwd,
    )


def test_invalid_settings_list_every_problem_and_exit_2(tmp_path):
    result = imagebot("serve", env={
        "IMAGEBOT_CONCURRENCY": "zero", "IMAGEBOT_PLATFORMS": "amd64", "IMAGEBOT_GITHUB_APP_ID": "-1",
    }, cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "imagebot: invalid settings:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "- IMAGEBOT_GITHUB_APP_ID", "- IMAGEBOT_PLATFORMS", "- IMAGEBOT_CONCURRENCY",
    ]


def test_db_upgrade_creates_the_schema(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    result = imagebot("db", "upgrade", env={"IMAGEBOT_DATABASE_URL": url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "database is up to date"
    tables = set(inspect(create_engine(url)).get_table_names())
    assert {"builds", "deliveries", "telemetry_events", "alembic_version"} <= tables


def test_unreachable_database_is_a_clear_error(tmp_path):
    url = "postgresql+psycopg://someone:hunter2-secret@127.0.0.1:1/nothing"
    result = imagebot("db", "upgrade", env={"IMAGEBOT_DATABASE_URL": url})
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("imagebot: database error:")
    assert "Traceback" not in result.stderr
    assert "hunter2-secret" not in result.stderr + result.stdout


def test_unknown_command_is_a_usage_error():
    result = imagebot("frobnicate")
    assert result.returncode == 2 and "invalid choice" in result.stderr


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "imagebot"  # next to the interpreter running the tests
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "serve" in result.stdout and "worker" in result.stdout
