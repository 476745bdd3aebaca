"""The telemetry contract across its consumers, on SQLite and PostgreSQL: for every event name,
the event read from the database, from the REST API, from a build's stream and from the
all-builds stream is one and the same, and has the shape kept in tests/data/contract/.

The snapshots fail on drift. After a deliberate change of an event's shape (and of
docs/telemetry.md), rewrite them with ``UPDATE_SNAPSHOTS=1 ./scripts/test tests/test_contract_telemetry.py``
and review the diff.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import httpx

from bot import telemetry
from bot.api.stream import Position, current_position
from bot.models import utcnow
from tests.support import DATA
from tests.test_api_stream import SSEClient, served  # noqa: F401 - the served fixture
from tests.test_queue import enqueue, request
from tests.test_telemetry import EXAMPLES

SNAPSHOTS = DATA / "contract"
_TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z$")
#: Fields that differ from run to run, and what they must look like.
_VOLATILE = {"id": int, "build_id": int, "ts": _TS, "created_at": _TS, "started_at": _TS, "finished_at": _TS}


def normalised(item: dict[str, Any]) -> dict[str, Any]:
    """``item`` with its run-specific fields checked and replaced by their kind."""
    out = dict(item)
    for name, kind in _VOLATILE.items():
        if out.get(name) is None:
            continue
        if isinstance(kind, re.Pattern):
            assert kind.match(out[name]), f"{name}={out[name]!r} is not UTC ISO 8601 with Z"
            out[name] = "<timestamp>"
        else:
            assert isinstance(out[name], kind) and not isinstance(out[name], bool), f"{name}={out[name]!r}"
            out[name] = f"<{kind.__name__}>"
    return out


def snapshot_problems(name: str, item: dict[str, Any]) -> list[str]:
    path = SNAPSHOTS / f"{name}.json"
    actual = normalised(item)
    if os.environ.get("UPDATE_SNAPSHOTS"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(actual, indent=2, sort_keys=True) + "\n")
    if not path.exists():
        return [f"{name}: no snapshot {path.relative_to(DATA.parent.parent)} (UPDATE_SNAPSHOTS=1 writes it)"]
    expected = json.loads(path.read_text())
    return [] if expected == actual else [f"{name}: drifted from its snapshot:\n  was {expected}\n  now {actual}"]


def test_every_event_is_the_same_in_the_database_the_api_and_the_streams(served, db):  # noqa: F811
    build_id, other = enqueue(db, request(), request(ref="refs/heads/other"))
    before: Position = db.read_sync(current_position)
    for name in sorted(EXAMPLES):
        platform, data = EXAMPLES[name]
        db.write_sync(lambda c, n=name, p=platform, d=data: telemetry.record(c, build_id, n, utcnow(), p, **d))
        db.write_sync(lambda c: telemetry.record(c, other, "build_started", utcnow(), attempt=1))
    db.write_sync(lambda c: telemetry._store_log_lines(c, [(build_id, "linux/arm64", utcnow(), ["Step 1/2 : FROM x"])]))

    stored = db.read_sync(lambda c: telemetry.events_of(c, build_id))
    stored_log = db.read_sync(lambda c: telemetry.log_of(c, build_id))
    rest = httpx.get(f"{served}/api/builds/{build_id}/events").json()["events"]
    listed = httpx.get(f"{served}/api/builds", params={"ref": "refs/heads/main"}).json()["builds"][0]
    with SSEClient(f"{served}/api/builds/{build_id}/stream") as stream:
        from_build_stream = stream.until(lambda m: m.event == "status")
    with SSEClient(f"{served}/api/events?logs=1&after={before}") as stream:
        from_all = [m for m in stream.until(lambda m: m.event == "log") if m.data.get("build_id") == build_id]

    assert len(stored) == len(EXAMPLES)
    sse_events = [m.data for m in from_build_stream if m.event == "telemetry"]
    problems = []
    for n, name in enumerate(sorted(EXAMPLES)):
        db_event = stored[n]
        assert db_event["name"] == name
        for where, seen in (("REST", rest), ("build stream", sse_events),
                            ("all-builds stream", [m.data for m in from_all if m.event == "telemetry"])):
            if seen[n] != db_event:
                problems.append(f"{name}: {where} has {seen[n]}, the database {db_event}")
        problems += snapshot_problems(name, db_event)

    (log_message,) = [m.data for m in from_build_stream if m.event == "log"]
    assert log_message == {"build_id": build_id, **stored_log[0]}
    assert [m.data for m in from_all if m.event == "log"] == [log_message]
    problems += snapshot_problems("log", log_message)
    status = from_build_stream[-1].data
    assert status == listed, "a status message is the build as the REST API lists it"
    problems += snapshot_problems("status", status)
    assert not problems, "\n".join(problems)


def test_snapshots_are_documented_event_shapes():
    """Each snapshot names its event and carries exactly the fields docs/telemetry.md lists."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "telemetry.md").read_text()
    for name in telemetry.SCHEMAS:
        snapshot = json.loads((SNAPSHOTS / f"{name}.json").read_text())
        assert snapshot["name"] == name and set(snapshot) == {"id", "build_id", "name", "platform", "ts", "data"}
        section = doc.split(f"### `{name}`", 1)[1].split("### ", 1)[0]
        documented = set(re.findall(r"^\| `(\w+)` \|", section, re.M))
        assert set(snapshot["data"]) == documented, name


def test_every_event_name_has_a_snapshot_and_no_other_does():
    names = {p.stem for p in SNAPSHOTS.glob("*.json")}
    assert names == set(telemetry.SCHEMAS) | {"status", "log"}
