"""The queue's table, registered on the store's metadata so one migration history covers all."""

from __future__ import annotations

from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from sharedcare.store.schema import BigId, metadata

queue_items = Table(
    "queue_items",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("queue", String(128), nullable=False),
    Column("key", String(255), nullable=True),  # idempotency key, unique per queue
    Column("partition", String(255), nullable=True),  # items of one partition go in order
    Column("payload", LargeBinary, nullable=False),
    Column("state", String(8), nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("available_at", DateTime, nullable=False),
    Column("leased_until", DateTime, nullable=True),
    Column("lease_owner", String(128), nullable=True),
    Column("last_error", Text, nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("updated_at", DateTime, nullable=False),
    UniqueConstraint("queue", "key"),
    Index("ix_queue_items_claim", "queue", "state", "available_at", "id"),
    # A partition's unfinished items, found without walking its finished ones (migration 0005).
    Index("ix_queue_items_partition_state", "queue", "partition", "state", "id"),
)
