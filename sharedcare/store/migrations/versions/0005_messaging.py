"""reliable messaging: messages, deliveries, mailboxes

Tables defined in ``sharedcare/messaging/schema.py``.

Revision ID: 0005_messaging
Revises: 0004_pix
Create Date: 2026-11-22 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005_messaging'
down_revision = '0004_pix'
branch_labels = None
depends_on = None


BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table('messages',
    sa.Column('id', BigId, autoincrement=True, nullable=False),
    sa.Column('sender', sa.String(length=64), nullable=False),
    sa.Column('recipient', sa.String(length=64), nullable=False),
    sa.Column('bundle_id', sa.String(length=64), nullable=False),
    sa.Column('header_id', sa.String(length=64), nullable=False),
    sa.Column('event', sa.String(length=255), nullable=False),
    sa.Column('responds_to', BigId, nullable=True),
    sa.Column('response_code', sa.String(length=16), nullable=True),
    sa.Column('mode', sa.String(length=4), nullable=False),
    sa.Column('ordered', sa.Boolean(), nullable=False),
    sa.Column('state', sa.String(length=12), nullable=False),
    sa.Column('ack_code', sa.String(length=16), nullable=True),
    sa.Column('deliveries', sa.Integer(), nullable=False),
    sa.Column('resends', sa.Integer(), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('patient_data', sa.Boolean(), nullable=False),
    sa.Column('size', sa.Integer(), nullable=False),
    sa.Column('body', sa.LargeBinary(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('accepted_at', sa.DateTime(), nullable=False),
    sa.Column('delivered_at', sa.DateTime(), nullable=True),
    sa.Column('acknowledged_at', sa.DateTime(), nullable=True),
    sa.Column('updated_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_messages')),
    sa.UniqueConstraint('sender', 'bundle_id', name=op.f('uq_messages_sender_bundle_id'))
    )
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index('ix_messages_mailbox', ['recipient', 'state', 'id'], unique=False)
        batch_op.create_index('ix_messages_header', ['header_id'], unique=False)
        batch_op.create_index('ix_messages_state', ['state', 'id'], unique=False)
    # The queue finds a partition's unfinished items without walking its finished ones.
    with op.batch_alter_table('queue_items', schema=None) as batch_op:
        batch_op.drop_index('ix_queue_items_partition')
        batch_op.create_index('ix_queue_items_partition_state', ['queue', 'partition', 'state', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('queue_items', schema=None) as batch_op:
        batch_op.drop_index('ix_queue_items_partition_state')
        batch_op.create_index('ix_queue_items_partition', ['queue', 'partition', 'id'], unique=False)
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index('ix_messages_state')
        batch_op.drop_index('ix_messages_header')
        batch_op.drop_index('ix_messages_mailbox')
    op.drop_table('messages')
