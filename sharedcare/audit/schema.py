"""The audit trail's own tables, registered on the store's metadata (one migration history).

AuditEvents are not resources of the regional store. Through the store, each event cost a
resource row, a version row, a change-log row and about 20 search-index rows, and at the
regional peak (2,000 queries/s, one event each) that is 170 million events and some four
billion index rows a day. Here an event is ONE row: its body as served, plus the few
columns auditors search by (issue 5: patient, user, organisation, date) and the ones a
forensic summary groups by (client, interaction, outcome, request id), plus a few unindexed
ones auditors filter by (user name and role, agent and entity references).

- ``audit_events``: append-only, never updated; ``seq`` is the commit order, so the table
  is a log of its own that backup shipping can replay like ``change_log``. Pruning by time
  (``sharedcare audit prune``) walks ``ix_audit_events_recorded``.
- ``audit_event_patients``: the further people one event names (a store search that
  released several people's data); the first person is ``audit_events.patient``, so most
  events write no row here.
"""

from __future__ import annotations

from sqlalchemy import Column, DateTime, Index, LargeBinary, PrimaryKeyConstraint, String, Table

from sharedcare.store.schema import BigId, metadata

__all__ = ["audit_event_patients", "audit_events"]

audit_events = Table(
    "audit_events",
    metadata,
    Column("seq", BigId, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),  # time-ordered (see columns.new_id)
    Column("recorded", DateTime, nullable=False),  # AuditEvent.recorded, naive UTC
    Column("patient", String(64), nullable=True),  # id of the first Patient the event names
    Column("user_id", String(128), nullable=True),  # the requesting user (agent.altId)
    Column("organization", String(64), nullable=True),  # their organisation's ODS code
    Column("client_id", String(64), nullable=True),  # the client system
    Column("subtype", String(32), nullable=True),  # restful interaction: read, search-type...
    Column("action", String(1), nullable=False),  # C R U D E
    Column("outcome", String(2), nullable=False),  # 0 4 8 12
    Column("request_id", String(128), nullable=True),
    # Searchable, not indexed (an auditor narrows these by patient, user or date first):
    Column("agent_name", String(200), nullable=True),  # the user's name, normalised for search
    Column("agent_role", String(64), nullable=True),  # their role code
    Column("agent", String(128), nullable=True),  # literal reference of a non-patient agent
    Column("entity", String(256), nullable=True),  # literal reference of the resource released
    Column("body", LargeBinary, nullable=False),  # the AuditEvent as served
    Index("ix_audit_events_recorded", "recorded", "seq"),
    Index("ix_audit_events_patient", "patient", "recorded"),
    Index("ix_audit_events_user_id", "user_id", "recorded"),
    Index("ix_audit_events_organization", "organization", "recorded"),
)

audit_event_patients = Table(
    "audit_event_patients",
    metadata,
    Column("patient", String(64), nullable=False),
    Column("event_id", String(64), nullable=False),
    PrimaryKeyConstraint("patient", "event_id"),
)
