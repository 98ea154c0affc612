"""reliable messaging: messages, deliveries, mailboxes

Tables defined in ``sharedcare/messaging/schema.py``.

Revision ID: 0005_messaging
Revises: 0004_pix
Create Date: 2026-11-22 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401


revision = '0005_messaging'
down_revision = '0004_pix'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
