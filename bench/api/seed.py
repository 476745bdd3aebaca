"""Fill a migrated SQLite database with BUILDS builds over REPOS repos and EVENTS_PER_BUILD
telemetry events each (plain sqlite3 and executemany: SQLAlchemy would take minutes).

Rows look like the pipeline's: statuses in a realistic mix, two platforms, the events a
pushed two-platform build emits, in the stored JSON shape.
    usage: python bench/api/seed.py DB_PATH [--builds 100000] [--events 1000000] [--repos 200]
"""

from __future__ import annotations

import argparse
import json
import random
import sqlite3
import time
from datetime import UTC, datetime, timedelta

from bot.db import upgrade

STATUSES = ["succeeded"] * 80 + ["failed"] * 10 + ["superseded"] * 6 + ["cancelled"] * 2 + ["skipped"] * 2
PLATFORMS = ["linux/amd64", "linux/arm64"]
T0 = datetime(2026, 1, 1, tzinfo=UTC)


def stamp(value: datetime) -> str:
    """SQLAlchemy's SQLite DateTime format (naive UTC, as bot.models stores it)."""
    return value.strftime("%Y-%m-%d %H:%M:%S.%f")


def event_rows(build_id: int, count: int, start: datetime) -> list[tuple]:
    """``count`` events of one build, cycling through a pushed two-platform build's steps."""
    digest = "sha256:" + f"{build_id:064x}"
    steps = [
        ("build_started", None, {"attempt": 1}),
        ("fetch_succeeded", None, {"duration_s": 0.4, "sha": f"{build_id:040x}", "method": "sha"}),
        *[(name, p, data) for p in PLATFORMS for name, data in (
            ("build_platform_started", {"image": f"r/acme/app:sha-{build_id:07x}-{p.replace('/', '-')}"}),
            ("build_platform_succeeded", {"duration_s": 30.5, "image_id": digest}),
            ("tag_started", {"image_id": digest, "tag": f"r/acme/app:{build_id}"}),
            ("tag_succeeded", {"tag": f"r/acme/app:{build_id}"}),
            ("push_started", {"tag": f"r/acme/app:{build_id}"}),
            ("push_succeeded", {"tag": f"r/acme/app:{build_id}", "digest": digest, "size": 1128,
                                "duration_s": 1.2, "attempts": 1, "retries": 0}),
        )],
        ("manifest_published", None, {"digest": digest, "tags": ["main"], "platforms": PLATFORMS,
                                      "media_type": "application/vnd.docker.distribution.manifest.list.v2+json",
                                      "partial": False}),
        ("build_succeeded", None, {"duration_s": 42.0, "platforms": PLATFORMS, "partial": False}),
    ]
    return [
        (build_id, name, platform, stamp(start + timedelta(seconds=n)), json.dumps(data))
        for n, (name, platform, data) in ((n, steps[n % len(steps)]) for n in range(count))
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--builds", type=int, default=100_000)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repos", type=int, default=200)
    args = parser.parse_args()
    started = time.monotonic()
    upgrade(f"sqlite:///{args.db}")
    rng = random.Random(5)
    conn = sqlite3.connect(args.db)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    per_build, extra = divmod(args.events, args.builds)
    with conn:
        builds = []
        for build_id in range(1, args.builds + 1):
            created = T0 + timedelta(minutes=build_id)
            repo = f"org{build_id % args.repos}/app"
            status = rng.choice(STATUSES)
            builds.append((
                build_id, "github", repo, f"https://git.example/{repo}.git", f"refs/heads/b{build_id % 7}",
                f"{build_id:040x}", "branch", None, 0, "main", None, "push", status, json.dumps(PLATFORMS),
                stamp(created), stamp(created + timedelta(seconds=5)), stamp(created + timedelta(seconds=50)),
                1, "build" if status == "failed" else None, "RUN failed" if status == "failed" else None, None, None,
            ))
        columns = ("id, provider, repo, clone_url, ref, sha, kind, pr_number, fork, default_branch, "
                   "installation_id, trigger, status, platforms, created_at, started_at, finished_at, "
                   "attempts, error_kind, error_message, lease_owner, lease_expires_at")
        conn.executemany(f"INSERT INTO builds ({columns}) VALUES ({', '.join('?' * 22)})", builds)
        for first in range(1, args.builds + 1, 5_000):
            rows = [
                row
                for build_id in range(first, min(first + 5_000, args.builds + 1))
                for row in event_rows(build_id, per_build + (1 if build_id <= extra else 0),
                                      T0 + timedelta(minutes=build_id, seconds=5))
            ]
            conn.executemany(
                "INSERT INTO telemetry_events (build_id, name, platform, ts, data) VALUES (?, ?, ?, ?, ?)", rows
            )
    conn.execute("ANALYZE")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    counts = [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("builds", "telemetry_events")]
    conn.close()
    print(f"seeded {counts[0]} builds, {counts[1]} events over {args.repos} repos "
          f"in {time.monotonic() - started:.1f}s")


if __name__ == "__main__":
    main()
