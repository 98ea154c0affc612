"""Validation at the edge of the store: valid R4 examples of every hub type are accepted;
invalid ones get a 422 naming the element and nothing is written (both databases)."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from helpers import FHIR_JSON, patient

from sharedcare.fhir.errors import FHIRError
from sharedcare.store.searchparams import HUB_TYPES
from sharedcare.store.validation import validate_resource

# Realistic minimal R4 (4.0.1) resources, one per type the hub stores.
VALID: dict[str, dict[str, Any]] = {
    "Patient": patient(managingOrganization={"reference": "Organization/org-1"}),
    "Organization": {
        "resourceType": "Organization",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "RR8"}],
        "active": True,
        "type": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/organization-type", "code": "prov"}]}],
        "name": "Leeds Teaching Hospitals NHS Trust",
        "telecom": [{"system": "phone", "value": "0113 243 3144", "use": "work"}],
    },
    "Practitioner": {
        "resourceType": "Practitioner",
        "identifier": [{"system": "https://fhir.hl7.org.uk/Id/gmc-number", "value": "C1234567"}],
        "active": True,
        "name": [{"use": "official", "family": "Okafor", "given": ["Ada"], "prefix": ["Dr"]}],
        "gender": "female",
        "qualification": [{"code": {"text": "MBBS"}}],
    },
    "PractitionerRole": {
        "resourceType": "PractitionerRole",
        "active": True,
        "practitioner": {"reference": "Practitioner/prac-1"},
        "organization": {"reference": "Organization/org-1"},
        "code": [{"coding": [{"system": "http://snomed.info/sct", "code": "62247001", "display": "General practitioner"}]}],
        "availableTime": [{"daysOfWeek": ["mon", "tue"], "availableStartTime": "09:00:00", "availableEndTime": "17:30:00"}],
    },
    "Endpoint": {
        "resourceType": "Endpoint",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "hl7-fhir-rest",
        },
        "name": "Leeds GP FHIR API",
        "managingOrganization": {"reference": "Organization/org-1"},
        "payloadType": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/endpoint-payload-type", "code": "any"}]}],
        "payloadMimeType": ["application/fhir+json"],
        "address": "https://gp.example.org/fhir",
    },
    "Consent": {  # R4 shape: scope, category, patient, policyRule, provision
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": "Patient/pat-1"},
        "dateTime": "2024-03-01T09:30:00Z",
        "organization": [{"reference": "Organization/org-1"}],
        # Shares for care, but not for research: a record the hub's decision engine honours.
        "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
        "provision": {
            "type": "permit",
            "period": {"start": "2024-03-01"},
            "provision": [{"type": "deny", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "HRESCH"}]}],
        },
    },
    "AuditEvent": {
        "resourceType": "AuditEvent",
        "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-event-type", "code": "rest"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}],
        "action": "R",
        "recorded": "2024-03-01T09:30:00.123Z",
        "outcome": "0",
        "agent": [{"who": {"reference": "Practitioner/prac-1"}, "requestor": True, "network": {"address": "10.0.0.1", "type": "2"}}],
        "source": {"site": "sharedcare", "observer": {"display": "sharedcare hub"}},
        "entity": [{"what": {"reference": "Patient/pat-1"}}],
    },
    "Subscription": {  # R4 shape: criteria string and channel (not R5 topic-based)
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "Tell the GP about new discharge summaries",
        "criteria": "DocumentReference?subject=Patient/pat-1",
        "channel": {
            "type": "rest-hook",
            "endpoint": "https://gp.example.org/notify",
            "payload": "application/fhir+json",
            "header": ["Authorization: Bearer abc"],
        },
    },
    "Group": {
        "resourceType": "Group",
        "type": "person",
        "actual": True,
        "name": "Virtual ward A",
        "quantity": 1,
        "member": [{"entity": {"reference": "Patient/pat-1"}, "period": {"start": "2024-03-01"}}],
    },
    "Provenance": {
        "resourceType": "Provenance",
        "target": [{"reference": "Patient/pat-1"}],
        "recorded": "2024-03-01T09:30:00+01:00",
        "agent": [{
            "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/provenance-participant-type", "code": "author"}]},
            "who": {"reference": "Practitioner/prac-1"},
        }],
        "entity": [{"role": "source", "what": {"display": "GP system export"}}],
    },
    "DocumentReference": {
        "resourceType": "DocumentReference",
        "status": "current",
        "docStatus": "final",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5", "display": "Discharge summary"}]},
        "subject": {"reference": "Patient/pat-1"},
        "date": "2024-03-01T09:30:00Z",
        "content": [{
            "attachment": {"contentType": "application/pdf", "url": "Binary/bin-1", "size": 1024, "title": "Discharge"},
            "format": {"system": "http://ihe.net/fhir/ihe.formatcode.fhir/CodeSystem/formatcode", "code": "urn:ihe:iti:xds:2017:mimeTypeSufficient"},
        }],
        "context": {"encounter": [{"reference": "Encounter/enc-1"}], "period": {"start": "2024-02-27"}},
    },
    "Binary": {"resourceType": "Binary", "contentType": "text/plain", "data": "aGVsbG8gd29ybGQ="},
}


def test_there_is_an_example_of_every_hub_type() -> None:
    assert set(VALID) == set(HUB_TYPES)


@pytest.mark.parametrize("rtype", list(VALID))
def test_valid_r4_example_passes_validation(rtype: str) -> None:
    validate_resource(rtype, VALID[rtype])


async def test_valid_r4_examples_are_accepted_and_stored_verbatim(client: httpx.AsyncClient) -> None:
    """Every hub type over HTTP, on both databases (one test: an app per type costs too much)."""
    failures = []
    for rtype, body in VALID.items():
        response = await client.post(f"/fhir/{rtype}", json=body, headers=FHIR_JSON)
        if response.status_code != 201:
            failures.append((rtype, response.status_code, response.text))
            continue
        stored = (await client.get(f"/fhir/{rtype}/{response.json()['id']}")).json()
        if {k: v for k, v in stored.items() if k not in ("id", "meta")} != body:
            failures.append((rtype, "stored body differs", stored))
    assert not failures, failures


async def test_r4_extension_value_meta_is_accepted(client: httpx.AsyncClient) -> None:
    """Extension.valueMeta is R4 but not R4B: validation.py accepts it (documented adjustment)."""
    body = patient(extension=[{"url": "https://example.org/source-meta", "valueMeta": {"versionId": "3"}}])
    response = await client.post("/fhir/Patient", json=body, headers=FHIR_JSON)
    assert response.status_code == 201, response.text
    bad = patient(extension=[{"url": "https://example.org/source-meta", "valueMeta": {"versionId": 3}}])
    response = await client.post("/fhir/Patient", json=bad, headers=FHIR_JSON)
    assert response.status_code == 422
    assert response.json()["issue"][0]["expression"] == ["Patient.extension[0].valueMeta.versionId"]


def _with(rtype: str, **changes: Any) -> dict[str, Any]:
    body = {**VALID[rtype], **changes}
    return {k: v for k, v in body.items() if v is not None}


def _without(rtype: str, *names: str) -> dict[str, Any]:
    return {k: v for k, v in VALID[rtype].items() if k not in names}


INVALID: dict[str, tuple[dict[str, Any], str]] = {
    "Patient: birthDate not a date": (_with("Patient", birthDate="not-a-date"), "Patient.birthDate"),
    "Patient: impossible date": (_with("Patient", birthDate="2020-02-30"), "Patient.birthDate"),
    "Patient: unknown element": (_with("Patient", foo=1), "Patient.foo"),
    "Patient: gender outside binding": (_with("Patient", gender="blue"), "Patient.gender"),
    "Patient: string for boolean": (_with("Patient", active="true"), "Patient.active"),
    "Patient: given not a list": (_with("Patient", name=[{"given": "Jo"}]), "Patient.name[0].given"),
    "Patient: empty array": (_with("Patient", identifier=[]), "Patient.identifier"),
    "Patient: null element": ({**VALID["Patient"], "gender": None}, "Patient.gender"),
    "Patient: telecom system outside binding": (
        _with("Patient", telecom=[{"system": "pigeon", "value": "coo"}]), "Patient.telecom[0].system"
    ),
    "Patient: unknown contained type": (
        _with("Patient", contained=[{"resourceType": "Foo", "id": "x"}]), "Patient.contained[0].resourceType"
    ),
    "Patient: R4B-only extension type": (
        _with("Patient", extension=[{"url": "http://x.org/e", "valueCodeableReference": {"concept": {"text": "x"}}}]),
        "Patient.extension[0].valueCodeableReference",
    ),
    "Organization: number for string": (_with("Organization", name=42), "Organization.name"),
    "Practitioner: gender outside binding": (_with("Practitioner", gender="m"), "Practitioner.gender"),
    "PractitionerRole: bad time": (
        _with("PractitionerRole", availableTime=[{"availableStartTime": "9am"}]),
        "PractitionerRole.availableTime[0].availableStartTime",
    ),
    "Endpoint: address missing": (_without("Endpoint", "address"), "Endpoint.address"),
    "Endpoint: status outside binding": (_with("Endpoint", status="on"), "Endpoint.status"),
    "Consent: scope missing": (_without("Consent", "scope"), "Consent.scope"),
    "Consent: provision type outside binding": (
        _with("Consent", provision={"type": "maybe"}), "Consent.provision.type"
    ),
    "AuditEvent: recorded without time": (_with("AuditEvent", recorded="2024-03-01"), "AuditEvent.recorded"),
    "AuditEvent: agent.requestor missing": (
        _with("AuditEvent", agent=[{"who": {"reference": "Practitioner/p"}}]), "AuditEvent.agent[0].requestor"
    ),
    "Subscription: channel type outside binding": (
        _with("Subscription", channel={"type": "carrier-pigeon"}), "Subscription.channel.type"
    ),
    "Subscription: reason missing": (_without("Subscription", "reason"), "Subscription.reason"),
    "Group: actual missing": (_without("Group", "actual"), "Group.actual"),
    "Group: quantity as string": (_with("Group", quantity="1"), "Group.quantity"),
    "Provenance: target missing": (_without("Provenance", "target"), "Provenance.target"),
    "DocumentReference: attachment missing": (
        _with("DocumentReference", content=[{"format": {"code": "x"}}]), "DocumentReference.content[0].attachment"
    ),
    "DocumentReference: status outside binding": (_with("DocumentReference", status="draft"), "DocumentReference.status"),
    "Binary: data not base64": (_with("Binary", data="not base64!!"), "Binary.data"),
    "Binary: contentType missing": (_without("Binary", "contentType"), "Binary.contentType"),
}


def assert_names_element(outcome: dict[str, Any], expression: str) -> None:
    assert outcome["resourceType"] == "OperationOutcome"
    expressions = [e for issue in outcome["issue"] for e in issue.get("expression", [])]
    assert expression in expressions, outcome
    issue = next(i for i in outcome["issue"] if expression in i.get("expression", []))
    assert issue["severity"] == "error" and issue["code"]
    assert issue["diagnostics"].startswith(expression)


@pytest.mark.parametrize(("body", "expression"), INVALID.values(), ids=list(INVALID))
def test_invalid_resource_is_422_naming_the_element(body: dict[str, Any], expression: str) -> None:
    with pytest.raises(FHIRError) as raised:
        validate_resource(body["resourceType"], body)
    assert raised.value.status == 422
    assert_names_element(raised.value.outcome(), expression)


async def test_invalid_resources_are_refused_over_http_and_nothing_is_written(client: httpx.AsyncClient) -> None:
    """The table above through POST on both databases (one test: an app per case costs too much)."""
    for name, (body, expression) in INVALID.items():
        rtype = body["resourceType"]
        before = (await client.get(f"/fhir/{rtype}?_count=0")).json()["total"]
        response = await client.post(f"/fhir/{rtype}", json=body, headers=FHIR_JSON)
        assert response.status_code == 422, (name, response.text)
        assert_names_element(response.json(), expression)
        assert (await client.get(f"/fhir/{rtype}?_count=0")).json()["total"] == before, name


async def test_update_is_validated_too(client: httpx.AsyncClient) -> None:
    body = {**VALID["Group"], "id": "g1"}
    assert (await client.put("/fhir/Group/g1", json=body, headers=FHIR_JSON)).status_code == 201
    response = await client.put("/fhir/Group/g1", json={**body, "actual": "yes"}, headers=FHIR_JSON)
    assert response.status_code == 422
    assert response.json()["issue"][0]["expression"] == ["Group.actual"]
    assert (await client.get("/fhir/Group/g1")).json()["actual"] is True
