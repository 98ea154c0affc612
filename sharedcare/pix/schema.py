"""The pix tables, registered on the store's metadata so one migration history covers all.

The *person* is a hub ``Patient`` resource in the store (the golden record: store search,
consent and audit reference ``Patient/{id}``); these lean tables hold what the index needs
on its hot paths:

- ``pix_people``: one row per person (``id`` = the hub Patient id), its NHS number (unique),
  the survivor it was merged into (A40: the replaced record points to the survivor; nothing
  is deleted) and whether its golden demographics came from a verified registration.
- ``pix_links``: one row per provider registration, unique by (identifier system, value):
  the person it claims, the provider, the NHS number and demographics as registered, the
  status (:data:`sharedcare.pix.index.STATUSES`), the reasons of the last trace, a revision
  (bumped on every change so stale trace results are ignored) and the last-updated time.
- ``pix_link_history``: every change of a link after it was first written (trace result,
  re-registration, unlink, merge), with the person and status before and after.
- ``pix_merges``: every merge, who asked and why.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from sharedcare.store.schema import BigId, metadata

pix_people = Table(
    "pix_people",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("nhs_number", String(10), nullable=True),
    Column("merged_into", String(64), nullable=True),
    Column("verified", Boolean, nullable=False, default=False),
    Column("created", DateTime, nullable=False),
    Column("updated", DateTime, nullable=False),
    UniqueConstraint("nhs_number"),
)

pix_links = Table(
    "pix_links",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("person_id", String(64), nullable=True),
    Column("provider", String(64), nullable=False),
    Column("system", String(255), nullable=False),
    Column("value", String(255), nullable=False),
    Column("status", String(16), nullable=False),
    Column("nhs_number", String(10), nullable=True),
    Column("family", String(200), nullable=True),
    Column("given", String(200), nullable=True),
    Column("birth_date", String(10), nullable=True),
    Column("gender", String(16), nullable=True),
    Column("postcode", String(16), nullable=True),
    Column("reasons", Text, nullable=True),
    Column("revision", Integer, nullable=False, default=1),
    Column("created", DateTime, nullable=False),
    Column("updated", DateTime, nullable=False),
    UniqueConstraint("system", "value"),
    Index("ix_pix_links_person_id", "person_id"),
    Index("ix_pix_links_status_updated", "status", "updated"),
)

pix_link_history = Table(
    "pix_link_history",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("link_id", BigId, nullable=False),
    Column("at", DateTime, nullable=False),
    Column("event", String(16), nullable=False),
    Column("person_before", String(64), nullable=True),
    Column("person_after", String(64), nullable=True),
    Column("status_before", String(16), nullable=True),
    Column("status_after", String(16), nullable=False),
    Column("detail", Text, nullable=True),
    Index("ix_pix_link_history_link_id", "link_id", "id"),
)

pix_merges = Table(
    "pix_merges",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("replaced", String(64), nullable=False),
    Column("survivor", String(64), nullable=False),
    Column("at", DateTime, nullable=False),
    Column("by", String(200), nullable=False),
    Column("reason", Text, nullable=True),
    Index("ix_pix_merges_replaced", "replaced"),
)
