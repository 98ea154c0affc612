"""Audit: an AuditEvent for every release of data across the platform boundary, never lost.

Public API:

- :class:`AuditRecord` and :func:`to_audit_event`: what is recorded, as an R4 AuditEvent
  shaped after IHE BALP (``record``).
- :class:`AuditWriter`: ``await writer.record(record)`` returns once the event is durable;
  concurrent callers share group-committed transactions (``writer``).
- :func:`export_ndjson` and :func:`prune`: retention by time (``retention``), and the
  ``sharedcare audit export|prune`` commands over them (``cli``).

``schema`` holds the trail's own tables (one lean row per event, not the store's resource
and index tables); ``columns`` turns an AuditEvent into its row; ``insert`` writes a batch;
``trail`` serves read, search and history through the FHIR API; ``metrics`` the writer's
Prometheus metrics.
"""

from sharedcare.audit.record import ACTIONS, OUTCOMES, AuditRecord, request_id_of, to_audit_event
from sharedcare.audit.retention import count_events, export_ndjson, prune
from sharedcare.audit.writer import AuditWriter, audit_unavailable

__all__ = [
    "ACTIONS",
    "OUTCOMES",
    "AuditRecord",
    "AuditWriter",
    "audit_unavailable",
    "count_events",
    "export_ndjson",
    "prune",
    "request_id_of",
    "to_audit_event",
]
