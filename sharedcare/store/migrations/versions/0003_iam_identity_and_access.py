"""identity and access: hub signing keys, jti replay guard, per-client rate buckets

Tables defined in ``sharedcare/iam/schema.py``. Chained after ``0002_queue`` (the head
when this was written) so that the history keeps one head.

Revision ID: 0003_iam
Revises: 0002_queue
Create Date: 2026-11-22 08:12:02.377973
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003_iam'
down_revision = '0002_queue'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('iam_jti',
    sa.Column('client_id', sa.String(length=64), nullable=False),
    sa.Column('jti', sa.String(length=255), nullable=False),
    sa.Column('expires_at', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('client_id', 'jti', name=op.f('pk_iam_jti'))
    )
    with op.batch_alter_table('iam_jti', schema=None) as batch_op:
        batch_op.create_index('ix_iam_jti_expires_at', ['expires_at'], unique=False)

    op.create_table('iam_keys',
    sa.Column('kid', sa.String(length=64), nullable=False),
    sa.Column('alg', sa.String(length=8), nullable=False),
    sa.Column('private_jwk', sa.Text(), nullable=False),
    sa.Column('public_jwk', sa.Text(), nullable=False),
    sa.Column('created_at', sa.BigInteger(), nullable=False),
    sa.Column('sign_until', sa.BigInteger(), nullable=False),
    sa.Column('publish_until', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('kid', name=op.f('pk_iam_keys'))
    )
    op.create_table('iam_rate',
    sa.Column('client_id', sa.String(length=64), nullable=False),
    sa.Column('tokens', sa.Float(), nullable=False),
    sa.Column('updated', sa.Float(), nullable=False),
    sa.Column('granted', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('client_id', name=op.f('pk_iam_rate'))
    )


def downgrade() -> None:
    op.drop_table('iam_rate')
    op.drop_table('iam_keys')
    with op.batch_alter_table('iam_jti', schema=None) as batch_op:
        batch_op.drop_index('ix_iam_jti_expires_at')

    op.drop_table('iam_jti')
