"""patient index: people, linkages, registrations

Tables defined in ``sharedcare/pix/schema.py``.

Revision ID: 0004_pix
Revises: 0003_iam
Create Date: 2026-11-22 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401


revision = '0004_pix'
down_revision = '0003_iam'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
