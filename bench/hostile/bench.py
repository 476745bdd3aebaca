"""Hostile repositories against a real ``imagebot serve``: how long the bot takes to refuse
each, and how fast ``/healthz`` answers while it does.

    .venv/bin/python bench/hostile/bench.py [--probes-per-build 200]

Needs the Docker engine (scripts/infra up docker dev-registry dev-base-image). Prints one
row per hostile build for bench/README.md: time to refuse (queued to failed, as the API
reports it), /healthz p50 / p99 / max during the build, and the in-process parse time of
the 1 KB YAML bombs (median of 50).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bot import db as dbmod  # noqa: E402
from bot.pipeline.config import ConfigError, parse_config  # noqa: E402
from tests.e2e.test_hostile_builds import enqueue, hostile, symlink_commit  # noqa: E402
from tests.standins.git_http import GitHTTPServer, make_repo  # noqa: E402
from tests.support import GITHUB_SECRET, BotProcess, free_port  # noqa: E402
from tests.test_pipeline_config import alias_list_bomb, merge_key_bomb  # noqa: E402

NAMES = ["merge-key-bomb", "alias-list-bomb", "blank-lines", "dockerignore-dev-zero"]


def parse_ms(text: str) -> float:
    times = []
    for _ in range(50):
        started = time.perf_counter()
        try:
            parse_config(text)
        except ConfigError:
            pass
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--probes-per-build", type=int, default=200)
    args = parser.parse_args()
    print(f"parse_config, 1 KB merge-key bomb: {parse_ms(merge_key_bomb()):.2f} ms; "
          f"alias-list bomb: {parse_ms(alias_list_bomb()):.2f} ms")
    work = Path(tempfile.mkdtemp(prefix="imagebot-bench-hostile-"))
    url = f"sqlite:///{work}/bot.db"
    dbmod.upgrade(url)
    port = free_port()
    env = {"IMAGEBOT_DATABASE_URL": url, "IMAGEBOT_GITHUB_WEBHOOK_SECRET": GITHUB_SECRET,
           "IMAGEBOT_POLL_SECONDS": "0.1", "IMAGEBOT_PLATFORMS": "linux/amd64", "IMAGEBOT_CONCURRENCY": "1"}
    base = f"http://127.0.0.1:{port}"
    process = BotProcess(["serve", "--port", str(port)], env, work / "bot.log").start()
    database = dbmod.Database(url)
    try:
        process.wait_healthy(base)
        print("| build | refused in s | /healthz p50 / p99 / max ms |")
        for name in NAMES:
            repo = make_repo(work / name, f"evil/{name}", hostile(name))
            if name == "dockerignore-dev-zero":
                symlink_commit(repo, ".dockerignore", "/dev/zero")
            with GitHTTPServer(work / name) as server, httpx.Client(timeout=10) as client:
                build_id = enqueue(database, server.repo_url(f"evil/{name}"), f"evil/{name}", repo.head())
                latencies = []
                while True:
                    started = time.perf_counter()
                    assert client.get(f"{base}/healthz").status_code == 200
                    latencies.append(time.perf_counter() - started)
                    build = client.get(f"{base}/api/builds/{build_id}").json()
                    if build["status"] in ("failed", "succeeded") and len(latencies) >= args.probes_per_build:
                        break
            refused = _seconds(build["finished_at"]) - _seconds(build["created_at"])
            q = statistics.quantiles([x * 1000 for x in latencies], n=100)
            print(f"| {name} ({build['error']['kind']}) | {refused:.2f} | "
                  f"{q[49]:.1f} / {q[98]:.1f} / {max(latencies) * 1000:.1f} |")
    finally:
        process.stop()
        database.close()
        shutil.rmtree(work, ignore_errors=True)


def _seconds(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


if __name__ == "__main__":
    main()
