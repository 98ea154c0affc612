"""AuditRecord → AuditEvent: valid R4 (R4B models and the store's own R4 checks), BALP-shaped."""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from sharedcare.audit import AuditRecord, request_id_of, to_audit_event
from sharedcare.store.validation import validate_resource

BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
DCM_SOURCE, DCM_DEST = "110153", "110152"

CASES: list[tuple[str, dict[str, Any]]] = [
    ("released search", {}),
    ("released read", {"action": "read", "resource": "providers/gp-1/Observation/o-1", "providers": ("gp-1",)}),
    (
        "refused: no consent",
        {"outcome": 4, "outcome_desc": "The patient has withheld consent.", "released": 0, "withheld": 12},
    ),
    ("refused before the patient was known", {"outcome": 4, "patient": None, "nhs_number": None, "providers": ()}),
    ("identifier only", {"patient": None}),
    (
        "system, no end user",
        {"user_id": None, "user_name": None, "user_role": None, "purpose_of_use": None, "organization": None},
    ),
    ("requesting organisation held by the hub", {"organization_ref": "Organization/org-1"}),
    ("operation", {"action": "operation", "query": "GET /fhir/Patient/p1/$everything"}),
]


def _agent(event: dict[str, Any], code: str) -> dict[str, Any]:
    return next(a for a in event["agent"] if a["type"]["coding"][0]["code"] == code)


def _entity_roles(event: dict[str, Any]) -> list[str | None]:
    return [e.get("role", {}).get("code") for e in event["entity"]]


@pytest.mark.parametrize("overrides", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_events_are_valid_r4(make_record: Callable[..., AuditRecord], overrides: dict[str, Any]) -> None:
    event = to_audit_event(make_record(**overrides), hub_base="http://testserver/fhir")
    AuditEvent.model_validate(event)  # R4B pydantic models: structure, cardinality, types
    validate_resource("AuditEvent", event)  # the store's own R4 (4.0.1) walk and bindings


def test_search_follows_balp_patient_query(make_record: Callable[..., AuditRecord]) -> None:
    record = make_record(recorded=datetime(2026, 3, 1, 9, 30, 0, 123000, tzinfo=UTC))
    event = to_audit_event(record, hub_base="http://hub/fhir")
    assert event["meta"]["profile"] == [BALP + "PatientQuery"]
    assert event["type"]["code"] == "rest" and event["action"] == "E"
    assert event["subtype"][0]["code"] == "search-type"
    assert event["recorded"] == "2026-03-01T09:30:00.123Z"
    assert event["outcome"] == "0"
    client, server = _agent(event, DCM_SOURCE), _agent(event, DCM_DEST)
    assert client["who"]["identifier"]["value"] == "portal-a"
    assert client["network"] == {"address": "10.0.0.1", "type": "2"}
    assert server["network"]["address"] == "http://hub/fhir"
    user = _agent(event, "IRCP")
    assert user["requestor"] is True
    assert (user["altId"], user["name"]) == ("u-100", "Dr Jo Bloggs")
    assert user["role"][0]["coding"][0]["code"] == "R8000"
    assert user["purposeOfUse"][0]["coding"][0]["code"] == "TREAT"
    org = _agent(event, "PROV")
    assert org["who"]["identifier"]["value"] == "RR8"
    patient = event["entity"][0]
    assert patient["role"]["code"] == "1"
    assert patient["what"] == {
        "reference": "Patient/p1",
        "identifier": {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9434765919"},
    }
    query = next(e for e in event["entity"] if e.get("role", {}).get("code") == "24")
    assert base64.b64decode(query["query"]).decode() == record.query == query["description"]
    assert _entity_roles(event).count("17") == 2  # the providers asked
    counts = {d["type"]: d["valueString"] for e in event["entity"] for d in e.get("detail", ())}
    assert counts == {"released": "40", "withheld": "2"}
    assert request_id_of(event) == record.request_id


def test_read_swaps_roles_and_names_the_resource(make_record: Callable[..., AuditRecord]) -> None:
    event = to_audit_event(make_record(action="read", resource="providers/gp-1/Observation/o-1"))
    assert event["meta"]["profile"] == [BALP + "PatientRead"]
    assert event["action"] == "R"
    # BALP Read: the data flows server → client, so the client is the Destination Role
    assert _agent(event, DCM_DEST)["who"]["identifier"]["value"] == "portal-a"
    data = next(e for e in event["entity"] if e.get("role", {}).get("code") == "4")
    assert data["what"]["reference"] == "providers/gp-1/Observation/o-1"


def test_refusal_claims_no_success_profile(make_record: Callable[..., AuditRecord]) -> None:
    event = to_audit_event(make_record(outcome=4, outcome_desc="No legitimate relationship."))
    assert "meta" not in event  # BALP profiles fix outcome = success
    assert (event["outcome"], event["outcomeDesc"]) == ("4", "No legitimate relationship.")
    assert to_audit_event(make_record(outcome=8))["outcomeDesc"] == "Serious failure"


def test_text_is_made_safe_for_both_databases(make_record: Callable[..., AuditRecord]) -> None:
    event = to_audit_event(make_record(user_name="Jo\x00Bloggs", query="GET /x?" + "a" * 10_000))
    assert _agent(event, "IRCP")["name"] == "JoBloggs"  # PostgreSQL text cannot hold NUL
    query = next(e for e in event["entity"] if e.get("role", {}).get("code") == "24")
    assert len(query["description"]) == 4096


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"action": "delete"}, "action"),
        ({"outcome": 1}, "outcome"),
        ({"released": -1}, "counts"),
        ({"request_id": ""}, "request_id"),
        ({"patient": "9434765919"}, "patient"),
        ({"patient": "Observation/1"}, "patient"),
        ({"organization_ref": "RR8"}, "organization_ref"),
        ({"resource": "not a reference"}, "resource"),
    ],
)
def test_bad_records_are_refused_at_construction(
    make_record: Callable[..., AuditRecord], overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_record(**overrides)


def test_providers_given_as_a_list_become_a_tuple(make_record: Callable[..., AuditRecord]) -> None:
    assert make_record(providers=["gp-1"]).providers == ("gp-1",)
