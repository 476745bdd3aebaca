"""reports due index

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-24 11:20:39.367378
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import bot.models


revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_reports_state_id'))
        batch_op.create_index('ix_reports_state_due', ['state', 'next_attempt_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.drop_index('ix_reports_state_due')
        batch_op.create_index(batch_op.f('ix_reports_state_id'), ['state', 'id'], unique=False)

