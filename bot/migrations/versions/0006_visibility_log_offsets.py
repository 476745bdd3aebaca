"""builds.visibility, log sizes and line offsets

Every existing build counts as private (nobody recorded its repository's visibility); its log
lines get their byte offsets and the build its log size, read once here.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 20:00:00
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BATCH = 5000


def upgrade() -> None:
    # plain ALTER TABLE ... ADD COLUMN (with constant defaults SQLite takes it): a batch copy of
    # builds would have to drop a table that every other table's rows refer to
    op.add_column('builds', sa.Column('visibility', sa.String(length=16), nullable=False, server_default='private'))
    op.add_column('builds', sa.Column('log_bytes', sa.BigInteger(), nullable=False, server_default='0'))
    op.add_column('builds', sa.Column('log_lines', sa.BigInteger(), nullable=False, server_default='0'))
    op.add_column('builds', sa.Column('log_truncated', sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column('build_logs', sa.Column('end_offset', sa.BigInteger(), nullable=False, server_default='0'))
    _backfill(op.get_bind())
    op.create_index('ix_build_logs_build_id_end', 'build_logs', ['build_id', 'end_offset'], unique=False)


def _backfill(conn: sa.Connection) -> None:
    """Each line's end in its build's rendered log (as bot.telemetry renders it)."""
    logs, builds = sa.table('build_logs', sa.column('id'), sa.column('build_id'), sa.column('platform'),
                            sa.column('line'), sa.column('end_offset')), \
        sa.table('builds', sa.column('id'), sa.column('log_bytes'), sa.column('log_lines'))
    totals: dict[int, list[int]] = {}
    after = 0
    while True:
        rows = conn.execute(sa.select(logs.c.id, logs.c.build_id, logs.c.platform, logs.c.line)
                            .where(logs.c.id > after).order_by(logs.c.id).limit(_BATCH)).all()
        if not rows:
            break
        updates = []
        for row in rows:
            total = totals.setdefault(row.build_id, [0, 0])
            total[0] += len(f"[{row.platform or 'build'}] {row.line}\n".encode())
            total[1] += 1
            updates.append({"i": row.id, "e": total[0]})
        conn.execute(logs.update().where(logs.c.id == sa.bindparam("i")).values(end_offset=sa.bindparam("e")),
                     updates)
        after = rows[-1].id
    if totals:
        conn.execute(builds.update().where(builds.c.id == sa.bindparam("i"))
                     .values(log_bytes=sa.bindparam("b"), log_lines=sa.bindparam("n")),
                     [{"i": k, "b": v[0], "n": v[1]} for k, v in totals.items()])


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35 has it): a batch copy of builds would
    # drop a table that other tables' rows point at, which SQLite's foreign keys refuse.
    op.drop_index('ix_build_logs_build_id_end', table_name='build_logs')
    op.drop_column('build_logs', 'end_offset')
    for column in ('log_truncated', 'log_lines', 'log_bytes', 'visibility'):
        op.drop_column('builds', column)
