"""check_consent_record: records the hub can honour pass; others get a 422 saying what to fix."""

from __future__ import annotations

from typing import Any

import pytest
from consent.builders import consent, provision

from sharedcare.consent import check_consent_record
from sharedcare.fhir.errors import FHIRError


@pytest.mark.parametrize(
    "record",
    [
        consent("OPTOUT"),
        consent("OPTOUT", provision("deny")),
        consent("OPTOUT", provision(period=("2024-01-01", "2025-12-31"))),
        consent("OPTOUT", provision(children=(provision("permit", purposes=("ETREAT",)),))),
        consent("OPTIN", provision("deny", actors=[("CST", "gp-1"), (None, "Organization/o1")])),
        consent("OPTIN", provision("deny", labels=("http://terminology.hl7.org/CodeSystem/v3-ActCode|PSY",), classes=("DocumentReference",))),
        consent("OPTINR", provision("deny", codes=("http://snomed.info/sct|86406008",), data=("Observation/o1",))),
        consent("OPTIN", provision("deny", purposes=("HRESCH",), actions=("access", "disclose"))),
        consent("OPTOUT", status="inactive"),
    ],
    ids=lambda r: f"{r['policyRule']['coding'][0]['code']}:{sorted(r.get('provision', {}))}",
)
def test_records_the_hub_can_honour_pass(record: dict[str, Any]) -> None:
    check_consent_record(record)


def _with(**changes: Any) -> dict[str, Any]:
    body = consent("OPTIN", provision("deny", classes=("Observation",)))
    for key, value in changes.items():
        if value is None:
            body.pop(key, None)
        else:
            body[key] = value
    return body


@pytest.mark.parametrize(
    ("record", "expression", "needle"),
    [
        ({"resourceType": "Patient"}, "resourceType", "Expected a Consent"),
        (_with(status="signed"), "Consent.status", "must be one of"),
        (_with(scope={"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "research"}]}),
         "Consent.scope", "patient-privacy"),
        (_with(category=None), "Consent.category", "required"),
        (_with(patient=None), "Consent.patient", "Patient/<id>"),
        (_with(patient={"reference": "Group/g1"}), "Consent.patient", "Patient/<id>"),
        (_with(policyRule=None), "Consent.policyRule", "OPTIN, OPTINR, OPTOUT, OPTOUTE"),
        (_with(policyRule={"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTSOMETIMES"}]}),
         "Consent.policyRule", "Unknown policyRule 'OPTSOMETIMES'"),
        (_with(dateTime="yesterday"), "Consent.dateTime", "not a FHIR date"),
        (_with(provision={"type": "maybe"}), "Consent.provision.type", "deny or permit"),
        (_with(provision={"type": "deny", "provision": [{"purpose": [{"code": "HRESCH"}]}]}),
         "Consent.provision.provision[0].type", "nested provision needs type"),
        (_with(provision={"type": "deny", "period": {"start": "2025-02-01", "end": "2025-01-01"}}),
         "Consent.provision.period", "ends"),
        (_with(provision={"type": "deny", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "SHOPPING"}]}),
         "Consent.provision.purpose[0]", "not a purpose of use"),
        (_with(provision={"type": "deny", "actor": [{"role": {"coding": [{"code": "CST"}]}, "reference": {"display": "my GP"}}]}),
         "Consent.provision.actor[0].reference", "reference.identifier"),
        (_with(provision={"type": "deny", "securityLabel": [{"code": "PSY"}]}),
         "Consent.provision.securityLabel[0]", "needs a system"),
        (_with(provision={"type": "deny", "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "Observaton"}]}),
         "Consent.provision.class[0]", "not a FHIR R4 resource type"),
        (_with(provision={"type": "deny", "class": [{"system": "urn:oid:1.2.3", "code": "x"}]}),
         "Consent.provision.class[0]", "resource types only"),
        (_with(provision={"type": "deny", "code": [{"text": "HIV"}]}), "Consent.provision.code[0]", "text alone"),
        (_with(provision={"type": "deny", "dataPeriod": {"start": "2020-01-01"}}), "Consent.provision.dataPeriod", "not supported"),
        (_with(provision={"type": "deny", "data": [{"meaning": "related", "reference": {"reference": "Observation/1"}}]}),
         "Consent.provision.data[0]", "meaning 'instance'"),
        (consent("OPTOUT", provision("deny", actors=[("CST", "gp-1")])), "Consent.provision", "use policyRule OPTIN"),
        (consent("OPTOUT", provision(classes=("Observation",))), "Consent.provision", "use policyRule OPTIN"),
        (consent("OPTIN", provision("permit", purposes=("TREAT",))), "Consent.provision", "use policyRule OPTOUT"),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("Consent") else None,
)
def test_records_the_hub_cannot_honour_get_a_422(record: dict[str, Any], expression: str, needle: str) -> None:
    with pytest.raises(FHIRError) as caught:
        check_consent_record(record)
    error = caught.value
    assert error.status == 422
    issue = error.outcome()["issue"][0]
    assert issue["severity"] == "error" and issue["code"] == "processing"
    assert issue["expression"] == [expression]
    assert needle in issue["diagnostics"], issue["diagnostics"]


def test_deeply_nested_provisions_are_refused() -> None:
    node = provision("permit", purposes=("TREAT",))
    for _ in range(10):
        node = provision("deny", children=(node,))
    with pytest.raises(FHIRError, match="nested at most"):
        check_consent_record(consent("OPTIN", node))
