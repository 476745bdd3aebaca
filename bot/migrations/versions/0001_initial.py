"""initial schema: deliveries, builds, telemetry events

Revision ID: 0001
Revises: 
Create Date: 2026-11-24 07:22:37.441170
"""
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

import bot.models


revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('builds',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('provider', sa.String(length=16), nullable=False),
    sa.Column('repo', sa.String(length=255), nullable=False),
    sa.Column('clone_url', sa.String(length=1024), nullable=False),
    sa.Column('ref', sa.String(length=512), nullable=False),
    sa.Column('sha', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('pr_number', sa.Integer(), nullable=True),
    sa.Column('fork', sa.Boolean(), nullable=False),
    sa.Column('default_branch', sa.String(length=255), nullable=True),
    sa.Column('installation_id', sa.Integer(), nullable=True),
    sa.Column('trigger', sa.String(length=64), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('platforms', sa.JSON(), nullable=False),
    sa.Column('created_at', bot.models.UTCDateTime(), nullable=False),
    sa.Column('started_at', bot.models.UTCDateTime(), nullable=True),
    sa.Column('finished_at', bot.models.UTCDateTime(), nullable=True),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('error_kind', sa.String(length=32), nullable=True),
    sa.Column('error_message', sa.String(length=2000), nullable=True),
    sa.Column('lease_owner', sa.String(length=128), nullable=True),
    sa.Column('lease_expires_at', bot.models.UTCDateTime(), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('builds', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_builds_lease_expires_at'), ['lease_expires_at'], unique=False)
        batch_op.create_index('ix_builds_repo_id', ['repo', 'id'], unique=False)
        batch_op.create_index('ix_builds_repo_ref_status', ['repo', 'ref', 'status'], unique=False)
        batch_op.create_index('ix_builds_sha', ['sha'], unique=False)
        batch_op.create_index('ix_builds_status_id', ['status', 'id'], unique=False)

    op.create_table('deliveries',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('provider', sa.String(length=16), nullable=False),
    sa.Column('delivery_id', sa.String(length=128), nullable=True),
    sa.Column('event', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=64), nullable=True),
    sa.Column('repo', sa.String(length=255), nullable=True),
    sa.Column('received_at', bot.models.UTCDateTime(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.String(length=500), nullable=True),
    sa.Column('build_id', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('provider', 'delivery_id', name='uq_delivery')
    )
    op.create_table('telemetry_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('build_id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('platform', sa.String(length=64), nullable=True),
    sa.Column('ts', bot.models.UTCDateTime(), nullable=False),
    sa.Column('data', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('telemetry_events', schema=None) as batch_op:
        batch_op.create_index('ix_events_build_id_id', ['build_id', 'id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('telemetry_events', schema=None) as batch_op:
        batch_op.drop_index('ix_events_build_id_id')

    op.drop_table('telemetry_events')
    op.drop_table('deliveries')
    with op.batch_alter_table('builds', schema=None) as batch_op:
        batch_op.drop_index('ix_builds_status_id')
        batch_op.drop_index('ix_builds_sha')
        batch_op.drop_index('ix_builds_repo_ref_status')
        batch_op.drop_index('ix_builds_repo_id')
        batch_op.drop_index(batch_op.f('ix_builds_lease_expires_at'))

    op.drop_table('builds')
