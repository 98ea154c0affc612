"""patient index: people, linkages, registrations

Tables defined in ``sharedcare/pix/schema.py``.

Revision ID: 0004_pix
Revises: 0003_iam
Create Date: 2026-11-22 10:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_pix"
down_revision = "0003_iam"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "pix_people",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("nhs_number", sa.String(length=10), nullable=True),
        sa.Column("merged_into", sa.String(length=64), nullable=True),
        sa.Column("verified", sa.Boolean(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pix_people")),
        sa.UniqueConstraint("nhs_number", name=op.f("uq_pix_people_nhs_number")),
    )
    op.create_table(
        "pix_links",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("person_id", sa.String(length=64), nullable=True),
        sa.Column("provider", sa.String(length=64), nullable=False),
        sa.Column("system", sa.String(length=255), nullable=False),
        sa.Column("value", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("nhs_number", sa.String(length=10), nullable=True),
        sa.Column("family", sa.String(length=200), nullable=True),
        sa.Column("given", sa.String(length=200), nullable=True),
        sa.Column("birth_date", sa.String(length=10), nullable=True),
        sa.Column("gender", sa.String(length=16), nullable=True),
        sa.Column("postcode", sa.String(length=16), nullable=True),
        sa.Column("reasons", sa.Text(), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("updated", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pix_links")),
        sa.UniqueConstraint("system", "value", name=op.f("uq_pix_links_system_value")),
    )
    op.create_index("ix_pix_links_person_id", "pix_links", ["person_id"], unique=False)
    op.create_index("ix_pix_links_status_updated", "pix_links", ["status", "updated"], unique=False)
    op.create_table(
        "pix_link_history",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("link_id", BigId, nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("event", sa.String(length=16), nullable=False),
        sa.Column("person_before", sa.String(length=64), nullable=True),
        sa.Column("person_after", sa.String(length=64), nullable=True),
        sa.Column("status_before", sa.String(length=16), nullable=True),
        sa.Column("status_after", sa.String(length=16), nullable=False),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pix_link_history")),
    )
    op.create_index(
        "ix_pix_link_history_link_id", "pix_link_history", ["link_id", "id"], unique=False
    )
    op.create_table(
        "pix_merges",
        sa.Column("id", BigId, autoincrement=True, nullable=False),
        sa.Column("replaced", sa.String(length=64), nullable=False),
        sa.Column("survivor", sa.String(length=64), nullable=False),
        sa.Column("at", sa.DateTime(), nullable=False),
        sa.Column("by", sa.String(length=200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_pix_merges")),
    )
    op.create_index("ix_pix_merges_replaced", "pix_merges", ["replaced"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_pix_merges_replaced", table_name="pix_merges")
    op.drop_table("pix_merges")
    op.drop_index("ix_pix_link_history_link_id", table_name="pix_link_history")
    op.drop_table("pix_link_history")
    op.drop_index("ix_pix_links_status_updated", table_name="pix_links")
    op.drop_index("ix_pix_links_person_id", table_name="pix_links")
    op.drop_table("pix_links")
    op.drop_table("pix_people")
