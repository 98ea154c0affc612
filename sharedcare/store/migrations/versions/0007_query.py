"""federated query: (reserved for the query pathway's tables)

Tables defined in ``sharedcare/query``.

Revision ID: 0007_query
Revises: 0006_consent
Create Date: 2026-11-22 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa  # noqa: F401
from alembic import op  # noqa: F401

revision = '0007_query'
down_revision = '0006_consent'
branch_labels = None
depends_on = None


def upgrade() -> None:
    pass


def downgrade() -> None:
    pass
