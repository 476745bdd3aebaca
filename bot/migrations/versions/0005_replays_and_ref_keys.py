"""deliveries remember their body's digest; report keys carry the ref

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 20:00:00.000000

A captured, validly signed push or pull/merge request body replayed under a fresh delivery id
is recognised by ``deliveries.body_sha256`` (unique per forge; NULL for deliveries exempt from
that dedupe). Report keys now tell a branch build from a tag build of the same commit: the
column is widened for the ref, and the keys of reports still pending are rewritten so that
they stay in line with the reports their builds owe from now on.
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op


revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: bot.reporters.outbox.REPORT_KEY as of this revision, in SQL both databases speak.
_KEY_OF_BUILD = (
    "SELECT b.provider || ':' || b.repo || '@' || b.sha || '#' || "
    "CASE WHEN b.kind = 'pull_request' THEN 'pull_request' ELSE 'push' END || ':' || b.ref "
    "FROM builds b WHERE b.id = reports.build_id"
)
_OLD_KEY_OF_BUILD = (
    "SELECT b.provider || ':' || b.repo || '@' || b.sha || '#' || "
    "CASE WHEN b.kind = 'pull_request' THEN 'pull_request' ELSE 'push' END "
    "FROM builds b WHERE b.id = reports.build_id"
)


def upgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('body_sha256', sa.String(length=64), nullable=True))
        batch_op.create_index('uq_deliveries_provider_body', ['provider', 'body_sha256'], unique=True)
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.alter_column('key', existing_type=sa.String(length=800), type_=sa.String(length=1024),
                              existing_nullable=False)
    op.execute(f"UPDATE reports SET key = ({_KEY_OF_BUILD}) WHERE state = 'pending'")


def downgrade() -> None:
    op.execute(f"UPDATE reports SET key = ({_OLD_KEY_OF_BUILD})")  # every row: the old keys fit 800
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.alter_column('key', existing_type=sa.String(length=1024), type_=sa.String(length=800),
                              existing_nullable=False)
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index('uq_deliveries_provider_body')
        batch_op.drop_column('body_sha256')
