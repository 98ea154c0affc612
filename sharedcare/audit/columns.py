"""One AuditEvent as one row of ``audit_events``: its id, its searchable columns, its body.

The same function reads the hub's own events (built by :func:`to_audit_event`) and events an
operator imports from a previous system, so the columns always mean what the search says:

==============  ===================================================================
column          from
==============  ===================================================================
recorded        ``recorded`` (an instant; naive UTC)
patient         ``entity.what`` / ``agent.who`` references to ``Patient/{id}``; the
                first here, the rest in ``audit_event_patients``
user_id         ``altId`` of the requesting agent (``requestor = true``)
organization    the ODS code of an agent identified in the ODS system
client_id       the agent identified in the hub's client-id system
subtype         the first ``subtype`` code (restful interaction)
action          ``action`` (C R U D E)
outcome         ``outcome`` (0 4 8 12)
request_id      the X-Request-Id entity (:func:`request_id_of`)
agent_name      the requesting agent's ``name``, normalised as the store's string index
agent_role      the first role code of the requesting agent
agent           the first ``agent.who`` literal reference that is not a Patient
entity          the first ``entity.what`` literal reference that is not a Patient
==============  ===================================================================
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from typing import Any, NamedTuple

import orjson

from sharedcare.audit.record import request_id_of
from sharedcare.registry.model import CLIENT_ID_SYSTEM, ODS_SYSTEM
from sharedcare.store.indexing import normalize_string

__all__ = ["EventRow", "event_row", "new_id", "parse_recorded", "patient_id"]

_PATIENT = "Patient/"


class EventRow(NamedTuple):
    """The values of one ``audit_events`` row, in column order (seq aside), plus extra people."""

    id: str
    recorded: datetime
    patient: str | None
    user_id: str | None
    organization: str | None
    client_id: str | None
    subtype: str | None
    action: str
    outcome: str
    request_id: str | None
    agent_name: str | None
    agent_role: str | None
    agent: str | None
    entity: str | None
    body: bytes
    other_patients: tuple[str, ...]


def new_id() -> str:
    """A UUID-shaped id whose first 48 bits are the time in ms (the layout of UUIDv7).

    New ids sort after older ones, so the unique index on ``audit_events.id`` grows at its
    right edge like the sequence does, instead of touching a random page for every event.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80 | rand
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def parse_recorded(value: Any) -> datetime:
    """``AuditEvent.recorded`` as naive UTC; ValueError if it is not an instant with a zone."""
    if value.__class__ is not str:
        raise ValueError("recorded must be an instant string")
    ts = datetime.fromisoformat(value[:-1] + "+00:00" if value.endswith("Z") else value)
    if ts.tzinfo is None:
        raise ValueError("recorded must carry a timezone (an instant)")
    return ts.astimezone(UTC).replace(tzinfo=None)


def patient_id(reference: Any) -> str | None:
    """The id in a reference to a Patient (relative, or absolute ending in ``Patient/{id}``)."""
    if reference.__class__ is not str:
        return None
    at = reference.rfind(_PATIENT)
    if at < 0 or (at > 0 and reference[at - 1] != "/"):
        return None
    rid = reference[at + len(_PATIENT) :].split("/_history/")[0]
    return rid if rid and "/" not in rid and len(rid) <= 64 else None


def _people(event: dict[str, Any]) -> list[str]:
    found: list[str] = []
    for entity in event.get("entity") or ():
        pid = patient_id(((entity or {}).get("what") or {}).get("reference"))
        if pid is not None and pid not in found:
            found.append(pid)
    for agent in event.get("agent") or ():
        pid = patient_id(((agent or {}).get("who") or {}).get("reference"))
        if pid is not None and pid not in found:
            found.append(pid)
    return found


def _clip(value: Any, limit: int) -> str | None:
    return value[:limit] if value.__class__ is str and value else None


def event_row(event: dict[str, Any], event_id: str) -> EventRow:
    """The row for ``event`` stored under ``event_id`` (ValueError if ``recorded`` is unusable).

    The body is the event with ``id`` and ``meta`` (versionId 1, lastUpdated = recorded: an
    event is written once and never changes).
    """
    recorded = parse_recorded(event.get("recorded"))
    user = organization = client = name = role = agent_ref = entity_ref = None
    for agent in event.get("agent") or ():
        who = agent.get("who") or {}
        ident = who.get("identifier") or {}
        system = ident.get("system")
        if system == ODS_SYSTEM and organization is None:
            organization = _clip(ident.get("value"), 64)
        elif system == CLIENT_ID_SYSTEM and client is None:
            client = _clip(ident.get("value"), 64)
        if agent_ref is None and patient_id(who.get("reference")) is None:
            agent_ref = _clip(who.get("reference"), 128)
        if agent.get("requestor") is True and user is None:
            user = _clip(agent.get("altId"), 128)
            if agent.get("name").__class__ is str:
                name = _clip(normalize_string(agent["name"]), 200)
            for concept in agent.get("role") or ():
                codes = [c.get("code") for c in concept.get("coding") or ()]
                role = role or _clip(codes[0] if codes else None, 64)
    for entity in event.get("entity") or ():
        ref = (entity.get("what") or {}).get("reference")
        if patient_id(ref) is None and ref.__class__ is str:
            entity_ref = _clip(ref, 256)
            break
    subtypes = event.get("subtype") or ()
    subtype = _clip(subtypes[0].get("code"), 32) if subtypes else None
    people = _people(event)
    meta = dict(event.get("meta") or {})
    meta["versionId"] = "1"
    meta["lastUpdated"] = event["recorded"]
    body = {"resourceType": "AuditEvent", "id": event_id, "meta": meta}
    body.update((k, v) for k, v in event.items() if k not in ("resourceType", "id", "meta"))
    return EventRow(
        event_id,
        recorded,
        people[0] if people else None,
        user,
        organization,
        client,
        subtype,
        str(event.get("action") or "E")[:1],
        str(event.get("outcome") or "0")[:2],
        _clip(request_id_of(event), 128),
        name,
        role,
        agent_ref,
        entity_ref,
        orjson.dumps(body),
        tuple(people[1:]),
    )
