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
    from bot.pipeline.run import runner_for
    from bot.telemetry import Telemetry
    from bot.worker import Worker

    _migrate(settings)

    async def run() -> None:
        database = dbmod.Database(settings.database_url.get_secret_value())
        worker = Worker(database, settings, runner_for(settings, Telemetry(database)))
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, worker.stop)
        try:
            await worker.run()
        finally:
            database.close()

    asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _logging(getattr(args, "log_level", "info"))
    try:
        settings = load_settings()
        if args.command == "serve":
            _serve(settings, args)
        elif args.command == "worker":
            _worker(settings)
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
