"""reports outbox

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 09:53:07.196553
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import bot.models


revision: str = '0003'
down_revision: str | None = '0002'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('key', sa.String(length=800), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', bot.models.UTCDateTime(), nullable=False),
    sa.Column('next_attempt_at', bot.models.UTCDateTime(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('done', sa.JSON(), nullable=False),
    sa.Column('last_error', sa.String(length=500), nullable=True),
    sa.Column('sent_at', bot.models.UTCDateTime(), nullable=True),
    sa.Column('lease_owner', sa.String(length=128), nullable=True),
    sa.Column('lease_expires_at', bot.models.UTCDateTime(), nullable=True),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.create_index('ix_reports_build_id_id', ['build_id', 'id'], unique=False)
        batch_op.create_index('ix_reports_key_state_id', ['key', 'state', 'id'], unique=False)
        batch_op.create_index('ix_reports_state_id', ['state', 'id'], unique=False)

    with op.batch_alter_table('builds', schema=None) as batch_op:
        batch_op.add_column(sa.Column('check_run_id', sa.BigInteger(), nullable=True))



def downgrade() -> None:
    with op.batch_alter_table('builds', schema=None) as batch_op:
        batch_op.drop_column('check_run_id')

    with op.batch_alter_table('reports', schema=None) as batch_op:
        batch_op.drop_index('ix_reports_state_id')
        batch_op.drop_index('ix_reports_key_state_id')
        batch_op.drop_index('ix_reports_build_id_id')

    op.drop_table('reports')
