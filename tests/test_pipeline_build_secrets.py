"""Operator build secrets through the real Docker engine, registry and git: they reach trusted
builds only, an image whose history carries one is never pushed, and no form of one reaches
the log, the telemetry, the build's error, the check run or the database."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest

from sqlalchemy import select
from sqlmodel import SQLModel

from bot import telemetry
from bot.models import BuildKind, BuildStatus
from bot.reporters.check_run import BuildFacts, check_run_body
from tests.standins.git_http import GitHTTPServer, make_repo
from tests.support import infra
from tests.test_pipeline_run import events, new_build, registry_get, run, settings_for

SECRET_STAGE = "FROM {base} AS fetch\nARG TOKEN\n"


@pytest.fixture(scope="module")
def services() -> dict[str, str]:
    # a fork's build gets no registry credentials: it pulls from the auth-less dev registry
    return infra("docker", "registry", "binfmt", "base-image", "dev-base-image")


def secret() -> str:
    """A fresh secret (no layer cache can hide a step), with characters that encode visibly."""
    return f"tok/{uuid.uuid4().hex[:12]}+é\"{uuid.uuid4().hex[:8]}"


def forms(value: str) -> dict[str, str]:
    """How a tool might print ``value``; each is written into the Dockerfile's RUN lines."""
    raw = value.encode()
    return {
        "base64": base64.b64encode(raw).decode(),
        "base64 unpadded, after 'ab'": base64.b64encode(b"ab" + raw).decode().rstrip("="),
        "url-safe base64, after 'x:'": base64.urlsafe_b64encode(b"x:" + raw + b"!").decode(),
        "Basic": base64.b64encode(b"user:" + raw).decode(),
        "percent-encoded": quote(value, safe=""),
        "json": json.dumps(value)[1:-1],
    }


def shell_quoted(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


def secrets_file(tmp_path: Path, mapping: dict) -> Path:
    path = tmp_path / "operator" / "build-secrets.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(mapping))
    return path


def build_with(services, db, tmp_path: Path, files: dict[str, str], mapping: dict, **build: object):
    """Build a repository of ``files`` with the operator's secrets ``mapping``, amd64 only:
    (settings, build, outcome)."""
    repo = make_repo(tmp_path / "srv", "acme/app", files)
    path = secrets_file(tmp_path, mapping)
    with GitHTTPServer(tmp_path / "srv") as server:
        settings = settings_for(services, db, build_secrets_file=path, platforms=["linux/amd64"])
        row = new_build(db, server, repo, **build)
        return settings, row, run(settings, db, row)


def tags_of(services, settings) -> int:
    repository = f"{settings.registry}/acme/app".split("/", 1)[1]
    return registry_get(services, f"/v2/{repository}/tags/list", "application/json").status_code


def log_of(db, build) -> list[dict]:
    return db.read_sync(lambda c: telemetry.log_of(c, build.id))


def check_run_text(db, build, outcome) -> str:
    facts = BuildFacts(build.id, build.sha, outcome.status, ["linux/amd64"], None, None, outcome.error_message)
    body = check_run_body(facts, outcome.status.value, f"Failed: {outcome.error_message}", events(db, build),
                          log_of(db, build), "http://bot/builds/1")
    return json.dumps(body, ensure_ascii=False)


def test_a_secret_in_the_image_history_is_refused_and_never_pushed(services, database, tmp_path):
    value = secret()
    files = {
        "Dockerfile": f"FROM {services['IMAGEBOT_TEST_BASE_IMAGE']}\nARG TOKEN\nRUN test -n \"$TOKEN\"\n",
        ".imagebot.yml": "secrets: [TOKEN]\nplatforms: [linux/amd64]\n",
    }
    settings, build, outcome = build_with(services, database, tmp_path, files, {"acme/app": {"TOKEN": value}})
    assert outcome.status is BuildStatus.failed and outcome.error_kind == "config" and outcome.step == "build"
    assert "contains the build secret TOKEN" in outcome.error_message
    failed = [e for e in events(database, build) if e["name"] == "build_platform_failed"]
    assert [e["data"]["kind"] for e in failed] == ["config"]
    assert not [e for e in events(database, build) if e["name"] in ("tag_started", "push_started")]
    assert tags_of(services, settings) == 404  # the registry never saw the repository
    seen = json.dumps([events(database, build), log_of(database, build), outcome.error_message])
    assert all(form not in seen for form in [value, *forms(value).values()])


def test_a_secret_used_in_an_earlier_stage_only_is_pushed(services, database, tmp_path):
    value = secret()
    base = services["IMAGEBOT_TEST_BASE_IMAGE"]
    files = {
        "Dockerfile": (SECRET_STAGE.format(base=base)
                       + 'RUN test -n "$TOKEN" && echo "token is $TOKEN" && echo "$TOKEN" | wc -c > /used\n'
                       + f"FROM {base}\nCOPY --from=fetch /used /used\nCMD [\"cat\", \"/used\"]\n"),
        ".imagebot.yml": "secrets: [TOKEN]\nplatforms: [linux/amd64]\n",
    }
    settings, build, outcome = build_with(services, database, tmp_path, files, {"acme/*": {"TOKEN": value}})
    assert outcome.status is BuildStatus.succeeded, outcome
    assert tags_of(services, settings) == 200
    lines = [line["line"] for line in log_of(database, build)]
    assert "token is ***" in lines  # the build had it, and the log shows it masked
    assert value not in json.dumps([lines, events(database, build)], ensure_ascii=False)


@pytest.mark.parametrize("whose", ["an operator build secret", "the registry password"])
def test_every_form_of_a_secret_is_masked_in_log_telemetry_error_and_check_run(services, database, tmp_path, whose):
    operator = whose == "an operator build secret"
    value = secret() if operator else services["IMAGEBOT_TEST_REGISTRY_PASSWORD"]
    shown = forms(value)
    echoes = " && ".join(f"echo {shell_quoted(name + ': ' + form)}" for name, form in shown.items())
    files = {
        # the earlier stage prints each form, then fails with all of them in its command (a
        # Docker-runtime BuildError's message)
        "Dockerfile": (SECRET_STAGE.format(base=services["IMAGEBOT_TEST_BASE_IMAGE"])
                       + f"RUN echo {uuid.uuid4().hex} && {echoes} && false\n"),
        ".imagebot.yml": ("secrets: [TOKEN]\n" if operator else "") + "platforms: [linux/amd64]\n",
    }
    mapping = {"acme/app": {"TOKEN": value}} if operator else {}
    _, build, outcome = build_with(services, database, tmp_path, files, mapping)
    assert outcome.status is BuildStatus.failed and outcome.error_kind == "build"
    lines = [line["line"] for line in log_of(database, build)]
    for name in shown:
        assert any(line.startswith(f"{name}: ") for line in lines), name  # the step ran and printed it
    failed = next(e for e in events(database, build) if e["name"] == "build_platform_failed")
    assert "returned a non-zero code" in failed["data"]["message"] and "***" in failed["data"]["message"]
    places = {
        "log": json.dumps(lines, ensure_ascii=False),
        "telemetry": json.dumps(events(database, build), ensure_ascii=False),
        "error": outcome.error_message,
        "check run": check_run_text(database, build, outcome),
    }
    for place, text in places.items():
        for name, form in {"raw": value, **shown}.items():
            assert form not in text, f"the {name} form reached the {place}"


def test_a_fork_build_gets_no_secrets(services, database, tmp_path):
    value = secret()
    files = {
        "Dockerfile": (f"FROM {services['IMAGEBOT_DEV_BASE_IMAGE']}\nARG TOKEN\n"
                       f"RUN echo \"{uuid.uuid4().hex} token=[$TOKEN]\"\n"),
        ".imagebot.yml": "secrets: [TOKEN]\nplatforms: [linux/amd64]\n",
    }
    _, build, outcome = build_with(services, database, tmp_path, files, {"**": {"TOKEN": value}},
                                   kind=BuildKind.pull_request, ref="refs/pull/7/head", pr_number=7, fork=True)
    assert outcome.status is BuildStatus.succeeded, outcome
    lines = [line["line"] for line in log_of(database, build)]
    assert any(line.endswith(" token=[]") for line in lines), lines[-10:]
    assert "imagebot: a fork's pull request gets no build secrets (asked for: TOKEN)" in lines


def _stored(db) -> str:
    """Every row of every table, as text."""
    def dump(conn):
        return json.dumps([[list(map(str, row)) for row in conn.execute(select(table))]
                           for table in SQLModel.metadata.sorted_tables], ensure_ascii=False)
    return db.read_sync(dump)


def test_the_secrets_file_reaches_no_log_and_no_database(services, db, tmp_path, caplog):
    used, unused, from_file = secret(), secret(), secret()
    base = services["IMAGEBOT_TEST_BASE_IMAGE"]
    files = {
        "Dockerfile": (SECRET_STAGE.format(base=base) + "ARG FILED\n"
                       + 'RUN echo "token is $TOKEN, filed is $FILED" > /dev/null\n'
                       + f"FROM {base}\nRUN echo {uuid.uuid4().hex}\n"),
        ".imagebot.yml": "secrets: [TOKEN, FILED]\nplatforms: [linux/amd64]\n",
    }
    (tmp_path / "operator").mkdir()
    (tmp_path / "operator" / "filed").write_text(from_file + "\n")
    caplog.set_level("DEBUG")
    settings, build, outcome = build_with(services, db, tmp_path, files, {
        "acme/app": {"TOKEN": used, "FILED_FILE": "filed"}, "other/*": {"TOKEN": unused}})
    path = settings.build_secrets_file
    assert outcome.status is BuildStatus.succeeded, outcome
    stored, logged = _stored(db), caplog.text + repr(settings)
    assert str(build.sha) in stored  # the dump does see the build
    for name, text in {"a used secret": used, "another repository's": unused, "a *_FILE's": from_file,
                       "the file": path.read_text()}.items():
        assert text not in stored, f"{name} reached the database"
        assert text not in logged, f"{name} reached the process log"
    if db.url.startswith("sqlite"):
        raw = b"".join(p.read_bytes() for p in Path(db.url.removeprefix("sqlite:///")).parent.glob("*.db*"))
        assert used.encode() not in raw and from_file.encode() not in raw


def test_secret_build_args_in_the_repository_fail_the_build_as_config(services, database, tmp_path):
    repo = make_repo(tmp_path / "srv", "acme/app", {
        "Dockerfile": f"FROM {services['IMAGEBOT_TEST_BASE_IMAGE']}\n",
        ".imagebot.yml": "build_args: {TOKEN: committed}\nsecret_build_args: [TOKEN]\n"})
    with GitHTTPServer(tmp_path / "srv") as server:
        outcome = run(settings_for(services, database), database, new_build(database, server, repo))
    assert outcome.error_kind == "config" and "IMAGEBOT_BUILD_SECRETS_FILE" in outcome.error_message
