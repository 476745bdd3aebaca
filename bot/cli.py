"""``imagebot``: serve the bot, run the worker alone, or migrate the database.

Every failure a user can cause (bad settings, an unreachable database) ends with one clear
message on stderr and a non-zero exit, not a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from sqlalchemy.exc import SQLAlchemyError

from bot import db as dbmod
from bot.settings import Settings, SettingsError, load_settings

log = logging.getLogger("imagebot")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imagebot", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the webhook server (and the worker, by default)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    serve.add_argument("--no-worker", action="store_true", help="serve webhooks and the API only")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    worker = sub.add_parser("worker", help="run the build worker alone")
    worker.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    build = sub.add_parser(
        "build", help="build a repository at a ref or sha now, through the same pipeline",
        description="Build GIT_URL at REF_OR_SHA (a branch, a tag, refs/..., or a full sha) "
                    "exactly as a webhook would, showing progress; exits non-zero if it fails.",
    )
    build.add_argument("git_url", help="clone URL, e.g. https://github.com/acme/app.git")
    build.add_argument("ref_or_sha", help="branch, tag, full ref or 40-hex sha")
    build.add_argument("--platform", action="append", default=[], metavar="OS/ARCH",
                       help="platform(s) to build (repeat or comma-separate); default IMAGEBOT_PLATFORMS")
    build.add_argument("--no-push", action="store_true", help="build only; push nothing")
    build.add_argument("--ref", help="with a sha: the ref it belongs to (default: the default branch)")
    build.add_argument("--forge", choices=["github", "gitlab"], default="github",
                       help="whose token to fetch with (default github)")
    build.add_argument("-v", "--verbose", action="store_true", help="show the build log too")
    build.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])

    database = sub.add_parser("db", help="database maintenance")
    db_sub = database.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sub.add_parser("upgrade", help="apply the database migrations")
    return parser


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("alembic").setLevel(logging.WARNING)


def _migrate(settings: Settings) -> None:
    log.info("migrating %s", settings.database_url_for_display)
    dbmod.upgrade(settings.database_url.get_secret_value())


def _serve(settings: Settings, args: argparse.Namespace) -> None:
    import uvicorn

    from bot.app import create_app

    _migrate(settings)
    app = create_app(settings, run_worker=not args.no_worker)
    log.info("serving on http://%s:%d (worker: %s)", args.host, args.port,
             "off" if args.no_worker else "on")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        # The worker drains in the lifespan shutdown; give it its grace period.
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds) + 5,
        access_log=args.log_level == "debug",
    )


def _worker(settings: Settings) -> None:
    from bot.pipeline.run import Pipeline, runner_for
    from bot.reporters.outbox import progress_to
    from bot.reporters.sender import Sender
    from bot.telemetry import LogCaps, Telemetry
    from bot.worker import Worker

    _migrate(settings)

    async def run() -> None:
        database = dbmod.Database(settings.database_url.get_secret_value())
        telemetry = Telemetry(database, progress_to=progress_to(settings), log_caps=LogCaps.of(settings))
        runner = runner_for(settings, telemetry)
        worker = Worker(database, settings, runner, bus=telemetry.bus)
        sender = Sender(database, settings, bus=telemetry.bus)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stop)
        sending = asyncio.create_task(sender.run(), name="report-sender")
        try:
            await worker.run()
        finally:
            if isinstance(runner, Pipeline):
                await runner.aclose()
            sender.stop()
            await sending
            database.close()

    asyncio.run(run())


def _describe_event(event: dict) -> str:
    data = event["data"]
    where = f"[{event['platform']}] " if event["platform"] else ""
    shown = ", ".join(f"{k}={v}" for k, v in data.items() if k not in ("image_id",) and v not in (None, "", []))
    return f"{where}{event['name']}" + (f"  {shown}" if shown else "")


def _build(settings: Settings, args: argparse.Namespace) -> int:
    from urllib.parse import urlsplit

    from bot import queue
    from bot.models import BuildKind, utcnow
    from bot.pipeline.fetch import TOKEN_USERS, FetchError, resolve
    from bot.pipeline.run import Pipeline
    from bot.telemetry import LogCaps, Telemetry
    from bot.worker import Worker

    platforms = [p.strip() for value in args.platform for p in value.split(",") if p.strip()]
    if platforms:
        settings = load_settings(platforms=platforms)
    _migrate(settings)
    repo = urlsplit(args.git_url).path.strip("/").removesuffix(".git") or args.git_url
    token = settings.gitlab_api_token if args.forge == "gitlab" else settings.github_token

    async def run() -> int:
        try:
            target = await resolve(args.git_url, args.ref_or_sha, token=token,
                                   username=TOKEN_USERS[args.forge], ref=args.ref,
                                   protocols=settings.git_protocols)
        except FetchError as exc:
            print(f"imagebot: {exc.message}", file=sys.stderr)
            return 1
        kind = BuildKind.tag if target.ref.startswith("refs/tags/") else BuildKind.branch
        request = queue.BuildRequest(
            provider=args.forge, repo=repo, clone_url=args.git_url, ref=target.ref, sha=target.sha,
            kind=kind, trigger="cli", default_branch=target.default_branch,
        )
        database = dbmod.Database(settings.database_url.get_secret_value())
        telemetry = Telemetry(database, log_caps=LogCaps.of(settings))
        info = queue.DeliveryInfo(args.forge, None, "cli", None, repo)
        recorded = await database.write(
            lambda conn: queue.record_delivery(conn, info, request, settings.platforms, utcnow())
        )
        print(f"build {recorded.build_id}: {repo} {target.ref} @ {target.sha}", flush=True)
        subscription = telemetry.bus.subscribe(maxsize=100_000)

        async def show() -> None:
            async for message in subscription:
                if message["type"] == "event":
                    print(_describe_event(message["event"]), flush=True)
                elif message["type"] == "log" and args.verbose:
                    where = f"[{message['platform']}] " if message["platform"] else ""
                    for line in message["lines"]:
                        print(f"  {where}{line}", flush=True)

        printer = asyncio.create_task(show())
        pipeline = Pipeline(settings, telemetry, no_push=args.no_push)
        worker = Worker(database, settings, pipeline, bus=telemetry.bus)
        try:
            outcome = await worker.run_one(recorded.build_id)
        finally:
            await asyncio.sleep(0)  # let the printer show the last events
            printer.cancel()
            await pipeline.aclose()
            database.close()
        if outcome is None:
            print(f"imagebot: build {recorded.build_id} was taken by another worker", file=sys.stderr)
            return 1
        if outcome.status.value != "succeeded":
            print(f"build {recorded.build_id} {outcome.status.value}: {outcome.step}: "
                  f"{outcome.error_kind}: {outcome.error_message}", file=sys.stderr)
            return 1
        print(f"build {recorded.build_id} succeeded ({', '.join(outcome.platforms)})")
        return 0

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _logging(getattr(args, "log_level", "info"))
    try:
        settings = load_settings()
        if args.command == "serve":
            _serve(settings, args)
        elif args.command == "worker":
            _worker(settings)
        elif args.command == "build":
            return _build(settings, args)
        elif args.command == "db":
            _migrate(settings)
            print("database is up to date")
    except SettingsError as exc:
        print(f"imagebot: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        reason = str(exc.orig if getattr(exc, "orig", None) else exc).splitlines()[0]
        print(f"imagebot: database error: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
