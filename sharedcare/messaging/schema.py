"""The messaging tables, registered on the store's metadata so one migration history covers all.

``messages`` holds every message the hub accepted, request or response, with its body as
received, until it is pruned. One row per (sender, Bundle.id): the unique constraint is
what makes ``$process-message`` idempotent. Push delivery runs through the durable queue
(``queue_items``, queue ``messaging.push``, one partition per sender→recipient pair);
pull recipients read ``messages`` directly (their mailbox).
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
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

messages = Table(
    "messages",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),  # accept order; the hub's message id
    Column(
        "sender", String(64), nullable=False
    ),  # client id, or "sharedcare.hub" for the hub's own
    Column("recipient", String(64), nullable=False),
    Column("bundle_id", String(64), nullable=False),
    Column("header_id", String(64), nullable=False),  # MessageHeader.id (what responses cite)
    Column("event", String(255), nullable=False),
    Column("responds_to", BigId, nullable=True),  # a response: the message it answers
    Column(
        "response_code", String(16), nullable=True
    ),  # a response: ok | transient-error | fatal-error
    Column("mode", String(4), nullable=False),  # push | pull
    Column("ordered", Boolean, nullable=False),
    Column("state", String(12), nullable=False),  # queued | delivered | acknowledged | dead
    Column("ack_code", String(16), nullable=True),  # the recipient's response code
    Column("deliveries", Integer, nullable=False, default=0),
    Column("resends", Integer, nullable=False, default=0),
    Column("attempts", Integer, nullable=False, default=0),
    Column("patient_data", Boolean, nullable=False),
    Column("size", Integer, nullable=False),
    Column("body", LargeBinary, nullable=False),
    Column("last_error", Text, nullable=True),
    Column("accepted_at", DateTime, nullable=False),
    Column("delivered_at", DateTime, nullable=True),
    Column("acknowledged_at", DateTime, nullable=True),
    Column("updated_at", DateTime, nullable=False),
    UniqueConstraint("sender", "bundle_id"),
    Index("ix_messages_mailbox", "recipient", "state", "id"),
    Index("ix_messages_header", "header_id"),
    Index("ix_messages_state", "state", "id"),
)
