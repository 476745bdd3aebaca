"""The tables: webhook deliveries, builds (the queue itself) and telemetry events.

Times are stored as naive UTC (SQLite has no time zones) and handed back as aware UTC, so the
rest of the code never compares a naive time with an aware one.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import JSON, BigInteger, Boolean, Column, DateTime, Index, String, Text, TypeDecorator, UniqueConstraint
from sqlalchemy.sql.expression import false
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out, naive UTC on disk."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; use bot.models.utcnow()")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


def _time(nullable: bool = True, index: bool = False) -> Column:
    return Column(UTCDateTime(), nullable=nullable, index=index)


class BuildStatus(str, enum.Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"
    superseded = "superseded"
    skipped = "skipped"

    @property
    def final(self) -> bool:
        return self not in (BuildStatus.queued, BuildStatus.running)


#: A repository's visibility as a build records it: only ``public`` builds are shown to readers
#: without the read token; anything else (private, GitLab's ``internal``, unknown) is private.
PUBLIC = "public"
PRIVATE = "private"
#: GitLab's ``visibility_level`` of a public project (0 is private, 10 internal).
_GITLAB_PUBLIC_LEVEL = 20


def github_visibility(private: bool | None) -> str:
    """GitHub's ``repository.private``: public only when it says ``false``."""
    return PUBLIC if private is False else PRIVATE


def gitlab_visibility(level: int | None, name: str | None) -> str:
    """GitLab's ``project.visibility_level`` (or the newer ``visibility`` name): public only
    when one says public and neither says otherwise; ``internal`` is private to the world."""
    said = {level == _GITLAB_PUBLIC_LEVEL if level is not None else None,
            name == PUBLIC if name is not None else None} - {None}
    return PUBLIC if said == {True} else PRIVATE


class BuildKind(str, enum.Enum):
    branch = "branch"
    tag = "tag"
    pull_request = "pull_request"


class Delivery(SQLModel, table=True):
    """One webhook delivery as received; redeliveries (same id) are recognised by the key, and
    replays of a push or pull/merge request body under a new id by the body's digest."""

    __tablename__ = "deliveries"
    __table_args__ = (
        UniqueConstraint("provider", "delivery_id", name="uq_delivery"),
        # NULLs never collide (both databases): deliveries exempt from body dedupe store none.
        Index("uq_deliveries_provider_body", "provider", "body_sha256", unique=True),
    )

    id: int | None = Field(default=None, primary_key=True)
    provider: str = Field(sa_column=Column(String(16), nullable=False))
    #: The forge's delivery id; None for a GitLab delivery that carried none (never deduped).
    delivery_id: str | None = Field(default=None, sa_column=Column(String(128)))
    event: str = Field(sa_column=Column(String(64), nullable=False))
    action: str | None = Field(default=None, sa_column=Column(String(64)))
    repo: str | None = Field(default=None, sa_column=Column(String(255)))
    received_at: datetime = Field(sa_column=_time(nullable=False))
    #: What the delivery caused: queued, skipped, cancelled, ignored, ping.
    outcome: str = Field(sa_column=Column(String(16), nullable=False))
    reason: str | None = Field(default=None, sa_column=Column(String(500)))
    build_id: int | None = Field(default=None, foreign_key="builds.id")
    #: SHA-256 of the verified body of a push, tag or pull/merge request delivery (None for
    #: re-run requests, which may repeat a body on purpose, and for what builds nothing).
    body_sha256: str | None = Field(default=None, sa_column=Column(String(64)))


class Build(SQLModel, table=True):
    """A build request and its progress. The rows with status ``queued`` are the queue."""

    __tablename__ = "builds"
    __table_args__ = (
        Index("ix_builds_status_id", "status", "id"),
        Index("ix_builds_repo_ref_status", "repo", "ref", "status"),
        Index("ix_builds_repo_id", "repo", "id"),
        Index("ix_builds_sha", "sha"),
    )

    id: int | None = Field(default=None, primary_key=True)
    provider: str = Field(sa_column=Column(String(16), nullable=False))
    repo: str = Field(sa_column=Column(String(255), nullable=False))
    clone_url: str = Field(sa_column=Column(String(1024), nullable=False))
    #: The full ref: refs/heads/main, refs/tags/v1.2.3, refs/pull/7/head, refs/merge-requests/7/head.
    ref: str = Field(sa_column=Column(String(512), nullable=False))
    sha: str = Field(sa_column=Column(String(64), nullable=False))
    kind: BuildKind = Field(sa_column=Column(String(16), nullable=False))
    pr_number: int | None = None
    #: From a fork: built, never pushed, never given registry credentials.
    fork: bool = False
    default_branch: str | None = Field(default=None, sa_column=Column(String(255)))
    installation_id: int | None = None
    #: The event that caused the build (push, pull_request, check_suite, Push Hook, ...).
    trigger: str = Field(sa_column=Column(String(64), nullable=False))
    status: BuildStatus = Field(sa_column=Column(String(16), nullable=False))
    platforms: list[str] = Field(sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(sa_column=_time(nullable=False))
    started_at: datetime | None = Field(default=None, sa_column=_time())
    finished_at: datetime | None = Field(default=None, sa_column=_time())
    attempts: int = 0
    error_kind: str | None = Field(default=None, sa_column=Column(String(32)))
    error_message: str | None = Field(default=None, sa_column=Column(String(2000)))
    lease_owner: str | None = Field(default=None, sa_column=Column(String(128)))
    lease_expires_at: datetime | None = Field(default=None, sa_column=_time(index=True))
    #: ``public`` or ``private`` (see :func:`github_visibility`): private builds, their
    #: events, logs and reports are shown only to holders of the read (or admin) token.
    visibility: str = Field(default=PRIVATE, sa_column=Column(String(16), nullable=False, server_default=PRIVATE))
    #: The stored log's size so far: rendered bytes (as ``/api/builds/{id}/log`` serves it)
    #: and lines; past IMAGEBOT_LOG_MAX_BYTES / _LINES the rest is dropped (``log_truncated``).
    log_bytes: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    log_lines: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))
    log_truncated: bool = Field(default=False, sa_column=Column(Boolean, nullable=False, server_default=false()))
    #: GitHub's id of the build's check run, once the reporter created it (App mode).
    check_run_id: int | None = Field(default=None, sa_column=Column(BigInteger))


class TelemetryEvent(SQLModel, table=True):
    """One step of one build; the pipeline fills these, every consumer reads them unchanged."""

    __tablename__ = "telemetry_events"
    __table_args__ = (Index("ix_events_build_id_id", "build_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    build_id: int = Field(foreign_key="builds.id", nullable=False)
    name: str = Field(sa_column=Column(String(64), nullable=False))
    platform: str | None = Field(default=None, sa_column=Column(String(64)))
    ts: datetime = Field(sa_column=_time(nullable=False))
    data: dict = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))


class BuildLog(SQLModel, table=True):
    """One line of a build's log (``platform`` None: the build's own steps, such as fetch)."""

    __tablename__ = "build_logs"
    __table_args__ = (
        Index("ix_build_logs_build_id_id", "build_id", "id"),
        Index("ix_build_logs_build_id_end", "build_id", "end_offset"),
    )

    id: int | None = Field(default=None, primary_key=True)
    build_id: int = Field(foreign_key="builds.id", nullable=False)
    platform: str | None = Field(default=None, sa_column=Column(String(64)))
    ts: datetime = Field(sa_column=_time(nullable=False))
    line: str = Field(sa_column=Column(Text, nullable=False))
    #: Where the line ends in the rendered log (``[platform] line\n``, UTF-8 bytes, this line
    #: included): a byte range is read as the lines whose ``end_offset`` falls in it, no others.
    end_offset: int = Field(default=0, sa_column=Column(BigInteger, nullable=False, server_default="0"))


class ReportState(str, enum.Enum):
    pending = "pending"  # waiting to be sent (or retried)
    sent = "sent"  # every target took it
    coalesced = "coalesced"  # an interim update made moot by a newer report of the build
    dead = "dead"  # refused for good (the forge called it invalid); logged, never blocks others


class Report(SQLModel, table=True):
    """The outbox: one row per report a build owes its forge, written in the same transaction
    as the build change it reports, so a report can never be lost, only delayed.

    ``status`` is the build status being reported, or ``progress`` for an interim check-run
    update. Rows with the same ``key`` (forge, repository, commit, context, ref) are delivered one
    at a time, in id order; ``done`` lists the targets (``status``, ``check_run``) that took
    this row already, so a retry or a restart never sends a target twice.
    """

    __tablename__ = "reports"
    __table_args__ = (
        # what the sender asks every round: the pending reports that are due (reports waiting
        # out a forge's outage are many, and must not be read each time)
        Index("ix_reports_state_due", "state", "next_attempt_at"),
        Index("ix_reports_key_state_id", "key", "state", "id"),
        Index("ix_reports_build_id_id", "build_id", "id"),
    )

    id: int | None = Field(default=None, primary_key=True)
    build_id: int = Field(foreign_key="builds.id", nullable=False)
    #: bot.reporters.outbox.REPORT_KEY: forge, repository, commit, context and ref (≤ 16 + 255 +
    #: 64 + 12 + 512 characters and separators).
    key: str = Field(sa_column=Column(String(1024), nullable=False))
    status: str = Field(sa_column=Column(String(16), nullable=False))
    state: ReportState = Field(sa_column=Column(String(16), nullable=False))
    created_at: datetime = Field(sa_column=_time(nullable=False))
    next_attempt_at: datetime = Field(sa_column=_time(nullable=False))
    attempts: int = 0
    done: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    last_error: str | None = Field(default=None, sa_column=Column(String(500)))
    sent_at: datetime | None = Field(default=None, sa_column=_time())
    lease_owner: str | None = Field(default=None, sa_column=Column(String(128)))
    lease_expires_at: datetime | None = Field(default=None, sa_column=_time())


builds = Build.__table__
deliveries = Delivery.__table__
telemetry_events = TelemetryEvent.__table__
build_logs = BuildLog.__table__
reports = Report.__table__
