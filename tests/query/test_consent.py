"""Consent applies to every resource a provider returns; the consumer is told what was withheld."""

from __future__ import annotations

from query.federation import Federated

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


async def test_an_opt_out_withholds_everything_and_says_so(federated: Federated) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001")[0]
    person = await federated.app.state.pix.find(nhs_number=nhs)
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{person.id}"},
        "dateTime": "2024-01-01",
        "policyRule": {"coding": [{"system": ACT, "code": "OPTOUT"}]},
    }
    created = await federated.app.state.fhir.create("Consent", consent)
    assert created.status == 201
    r = await federated.search("Observation", nhs)
    assert r.status_code == 200
    bundle = r.json()
    assert [e for e in bundle.get("entry", []) if e["search"]["mode"] == "match"] == []
    issues = [
        i
        for e in bundle["entry"]
        if e["search"]["mode"] == "outcome"
        for i in e["resource"]["issue"]
    ]
    assert any(i["code"] == "suppressed" for i in issues)
    assert "total" not in bundle
