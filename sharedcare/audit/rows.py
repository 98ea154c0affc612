"""The search-index rows of an AuditEvent built by :func:`~sharedcare.audit.record.to_audit_event`.

The store's generic extractor (:meth:`Indexer.extract`) walks every AuditEvent search
parameter's FHIRPath over the resource: about a third of the CPU an audit record costs.
The hub's own events always have the same shape, so their rows are read straight from the
elements this module knows are there. The rows must be exactly the extractor's (the store
searches them): ``tests/audit/test_rows.py`` compares the two for generated records, so a
change to the store's AuditEvent parameters or to :func:`to_audit_event` that is not
mirrored here fails the tests. Anything not of that shape goes to the extractor.
"""

from __future__ import annotations

from typing import Any, Final

from sharedcare.store.indexing import IndexRows, date_range, normalize_string, split_reference

__all__ = ["audit_rows"]

# hl7.org/fhir/R4/auditevent.html#search: 'patient' is agent.who | entity.what resolving to Patient
_PATIENT: Final = "Patient"


def _reference(param: str, ref: str, out: list[Any], patients: list[Any]) -> None:
    split = split_reference(ref) if ref else None
    if split is None:
        return
    out.append((param, split[0], split[1], ref))
    if split[0] == _PATIENT:
        patients.append(("patient", split[0], split[1], ref))


def _token(param: str, system: str | None, code: Any, out: list[Any]) -> None:
    if code and code.__class__ is str:
        out.append((param, system, code))


def _string(param: str, value: Any, out: list[Any]) -> None:
    if value.__class__ is str and value.strip():
        out.append((param, normalize_string(value), value))


def audit_rows(event: dict[str, Any]) -> IndexRows | None:
    """The index rows of one of the hub's own AuditEvents; None if it is not of that shape."""
    try:
        tokens: list[Any] = []
        strings: list[Any] = []
        refs: list[Any] = []
        patients: list[Any] = []
        kind = event["type"]
        _token("type", kind["system"], kind["code"], tokens)
        for c in event["subtype"]:
            _token("subtype", c["system"], c["code"], tokens)
        _token("action", None, event["action"], tokens)
        _token("outcome", None, event["outcome"], tokens)
        for agent in event["agent"]:
            for role in agent.get("role", ()):
                for c in role["coding"]:
                    _token("agent-role", c.get("system"), c["code"], tokens)
            if "altId" in agent:
                _token("altid", None, agent["altId"], tokens)
            if "name" in agent:
                _string("agent-name", agent["name"], strings)
            network = agent.get("network")
            if network is not None:
                _string("address", network["address"], strings)
            ref = agent["who"].get("reference")
            if ref is not None:
                _reference("agent", ref, refs, patients)
        _token("site", None, event["source"]["site"], tokens)
        for entity in event["entity"]:
            if "role" in entity:
                _token("entity-role", entity["role"]["system"], entity["role"]["code"], tokens)
            _token("entity-type", entity["type"]["system"], entity["type"]["code"], tokens)
            ref = entity.get("what", {}).get("reference")
            if ref is not None:
                _reference("entity", ref, refs, patients)
        low, high = date_range(event["recorded"])
        uris = [("_profile", p) for p in event.get("meta", {}).get("profile", ())]
    except (KeyError, TypeError, AttributeError, ValueError):
        return None
    # Per-parameter dedup, as the extractor does (rows carry their parameter).
    return IndexRows(
        list(dict.fromkeys(tokens)),
        list(dict.fromkeys(strings)),
        list(dict.fromkeys(refs + patients)),
        [("date", low, high)],
        uris,
    )
