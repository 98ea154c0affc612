"""consent and audit: (reserved for the release gate's tables)

Tables defined in ``sharedcare/consent or sharedcare/audit``.

Revision ID: 0006_consent
Revises: 0005_messaging
Create Date: 2026-11-22 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = '0006_consent'
down_revision = '0005_messaging'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
