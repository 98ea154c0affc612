"""Audit: an AuditEvent for every release of data across the platform boundary, never lost.

Public API:

- :class:`AuditRecord` and :func:`to_audit_event`: what is recorded, as an R4 AuditEvent
  shaped after IHE BALP (``record``).
- :class:`AuditWriter`: ``await writer.record(record)`` returns once the event is durable;
  concurrent callers share group-committed transactions (``writer``).
- :func:`export_ndjson` and :func:`prune`: retention by time (``retention``), and the
  ``sharedcare audit export|prune`` commands over them (``cli``).

``pgwrite`` is the writer's one-statement insert on PostgreSQL; ``metrics`` its Prometheus
metrics.

Events are ordinary AuditEvent resources of the regional store: versioned, carried by the
change log, and searched through the FHIR API (``AuditEvent?patient=…&date=ge…``).
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
