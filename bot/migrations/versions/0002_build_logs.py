"""build logs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 08:01:13.617245
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import bot.models


revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('build_logs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('platform', sa.String(length=64), nullable=True),
    sa.Column('ts', bot.models.UTCDateTime(), nullable=False),
    sa.Column('line', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('build_logs', schema=None) as batch_op:
        batch_op.create_index('ix_build_logs_build_id_id', ['build_id', 'id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('build_logs', schema=None) as batch_op:
        batch_op.drop_index('ix_build_logs_build_id_id')

    op.drop_table('build_logs')
