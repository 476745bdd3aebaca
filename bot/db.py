"""Database access: engines, migrations, and one writer thread that group-commits.

Why one writer: SQLite allows one writing transaction at a time, and contended writers wait in
SQLite's busy handler, which sleeps, so under load every extra writer turns into latency.
Funnelling all of a process's writes through one thread removes that contention, and letting
the thread commit whatever has queued up meanwhile in one transaction (group commit) makes each
webhook's share of a commit small. PostgreSQL gets the same path; it does not need it, but one
code path is easier to trust than two. Reads run on a pool of threads with their own
connections (WAL lets them run beside the writer).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio.to_thread
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

T = TypeVar("T")
I = TypeVar("I")
Work = Callable[[Connection], T]
#: Work that can be combined: one call for many items, one result per item, in order.
BatchWork = Callable[[Connection, list[I]], list[T]]

_PLAIN = object()  # the item of a plain (not batchable) job

#: Seconds a SQLite connection waits for another process's write lock before giving up.
SQLITE_BUSY_TIMEOUT_MS = 10_000
#: Most pieces of work one group commit takes; bounds the cost of a rollback-and-retry.
MAX_BATCH = 64

MIGRATIONS = Path(__file__).parent / "migrations"


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # WAL + NORMAL: a commit survives a crash of the process (it is in the WAL), and fsyncs
    # happen at checkpoints instead of on every commit.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, *, writer: bool) -> Engine:
    """An engine for ``url``; for SQLite, writers take the lock up front (BEGIN IMMEDIATE).

    A deferred SQLite transaction that reads and then writes cannot wait for the lock when it
    upgrades (it would deadlock), so it fails at once with "database is locked"; starting
    write transactions with BEGIN IMMEDIATE makes them wait in the busy handler instead.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_pre_ping=True, pool_size=8, max_overflow=8)
    if parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url, connect_args={"check_same_thread": False, "isolation_level": None}
    )
    event.listen(engine, "connect", _sqlite_pragmas)

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if writer else "BEGIN")

    return engine


class Database:
    """The bot's database: ``await db.write(fn)`` and ``await db.read(fn)``.

    ``fn`` takes a SQLAlchemy ``Connection`` inside a transaction and returns a value. Work
    given to ``write`` must touch nothing but the database: when a batch fails it is rolled
    back and each piece is run again in a transaction of its own, so that one bad piece fails
    alone. ``write_item(batch_fn, item)`` is for the hot path: items queued together for the
    same ``batch_fn`` are handed to it in one call, so its statements run once per group
    commit instead of once per item.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = make_url(url).get_backend_name() == "sqlite"
        self.writer_engine = make_engine(url, writer=True)
        self.reader_engine = make_engine(url, writer=False) if self.is_sqlite else self.writer_engine
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="imagebot-db-writer", daemon=True)
        self._thread.start()

    # -- public -------------------------------------------------------------------------------

    async def write(self, work: Work[T]) -> T:
        """Run ``work`` in the writer thread's next group commit; return once it is committed."""
        return await asyncio.wrap_future(self.submit(work))

    def write_sync(self, work: Work[T]) -> T:
        """The same for code that is not async (the CLI, tests)."""
        return self.submit(work).result()

    def submit(self, work: Work[T]) -> Future:
        future: Future = Future()
        self._queue.put(_Job(work, _PLAIN, future))
        return future

    async def write_item(self, batch_work: BatchWork[I, T], item: I) -> T:
        """Run ``batch_work(conn, [..., item, ...])`` in the next group commit; its result."""
        return await asyncio.wrap_future(self.submit_item(batch_work, item))

    def submit_item(self, batch_work: BatchWork[I, T], item: I) -> Future:
        future: Future = Future()
        self._queue.put(_Job(batch_work, item, future))
        return future

    async def read(self, work: Work[T]) -> T:
        """Run ``work`` in a read transaction on a worker thread."""
        return await anyio.to_thread.run_sync(self.read_sync, work)

    def read_sync(self, work: Work[T]) -> T:
        with self.reader_engine.connect() as conn, conn.begin():
            return work(conn)

    def ping(self) -> None:
        """Raise unless the database answers a trivial query."""
        self.read_sync(lambda conn: conn.execute(text("SELECT 1")).scalar_one())

    def close(self) -> None:
        """Finish the queued writes, stop the writer thread, close connections."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        self.writer_engine.dispose()
        self.reader_engine.dispose()

    # -- the writer thread --------------------------------------------------------------------

    def _run(self) -> None:
        """The writer thread: take what has queued up (at most MAX_BATCH), commit it at once."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch.append(more)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[_Job]) -> None:
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        if not live:
            return
        try:
            with self.writer_engine.begin() as conn:
                results = _run_jobs(conn, live)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, never swallowed
            if len(live) == 1:
                live[0].future.set_exception(exc)
                return
            log.debug("group commit of %d failed (%s); retrying one by one", len(live), exc)
            for job in live:
                self._commit_one(job)
            return
        for job, result in zip(live, results, strict=True):
            job.future.set_result(result)

    def _commit_one(self, job: _Job) -> None:
        try:
            with self.writer_engine.begin() as conn:
                (result,) = _run_jobs(conn, [job])
        except BaseException as exc:  # noqa: BLE001
            job.future.set_exception(exc)
        else:
            job.future.set_result(result)


@dataclass(frozen=True)
class _Job:
    work: Callable
    item: object
    future: Future


def _run_jobs(conn: Connection, jobs: list[_Job]) -> list:
    """Run jobs in order; consecutive items of the same batch work go in one call."""
    results: list = []
    i = 0
    while i < len(jobs):
        job = jobs[i]
        if job.item is _PLAIN:
            results.append(job.work(conn))
            i += 1
            continue
        j = i
        while j < len(jobs) and jobs[j].work is job.work and jobs[j].item is not _PLAIN:
            j += 1
        outputs = job.work(conn, [jobs[k].item for k in range(i, j)])
        if len(outputs) != j - i:
            raise RuntimeError(f"{job.work!r} returned {len(outputs)} results for {j - i} items")
        results.extend(outputs)
        i = j
    return results


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _at_head(engine: Engine) -> bool:
    """Whether the database is already at the newest migration (one query, no Alembic run)."""
    from alembic.migration import MigrationContext
    from alembic.script import ScriptDirectory

    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    return current is not None and current == ScriptDirectory(str(MIGRATIONS)).get_current_head()


#: The PostgreSQL advisory lock (one per database) held while migrations run.
MIGRATION_LOCK = 0x696D616765626F74  # "imagebot"


@contextlib.contextmanager
def _sqlite_file_lock(url: str) -> Iterator[None]:
    """An exclusive ``flock`` on a SQLite database file (created if missing) while held.

    SQLite's own locks are POSIX byte-range locks, which ``flock`` does not touch; this one
    only makes migrating processes take turns. (Two processes opening a fresh file at once
    can get "database is locked" at once, before the busy timeout applies: while the first
    turns the file into WAL mode.)"""
    path = make_url(url).database
    if not path or path == ":memory:":
        yield
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "ab") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to ``revision`` (``imagebot db upgrade``; ``serve`` and ``worker``
    run it too).

    ``serve`` and ``worker`` often start together: the migrations run under a lock, so the
    second waits and then finds the schema at head instead of creating the same tables beside
    the first. On PostgreSQL it is an advisory lock taken in the migration's transaction; on
    SQLite a lock on the database file."""
    from alembic import command

    engine = make_engine(url, writer=True)
    try:
        with _sqlite_file_lock(url) if make_url(url).get_backend_name() == "sqlite" else contextlib.nullcontext():
            if revision == "head" and _at_head(engine):
                return
            with engine.begin() as conn:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
                config = alembic_config(url)
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
    finally:
        engine.dispose()
