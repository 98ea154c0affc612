"""Consent applies to every resource a provider returns; the consumer is told what was withheld."""

from __future__ import annotations

from typing import Any

import orjson
from query.federation import Federated

from sharedcare.consent.gate import _about, attached_bodies
from sharedcare.simulators.provider import provider_people

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


def _consent(patient_ref: str, status: str = "active", code: str = "OPTOUT") -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": status,
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient_ref},
        "dateTime": "2024-01-01",
        "policyRule": {"coding": [{"system": ACT, "code": code}]},
    }


async def test_the_consents_fetched_with_the_person_are_those_the_store_search_finds(
    federated: Federated,
) -> None:
    """The federated query takes a person's consent records from the patient index's lookup
    (one statement, on PostgreSQL and SQLite alike); they must be exactly what the gate's own
    search finds, in the same order, whatever state the records are in."""
    app = federated.app
    gate, fhir, pix = app.state.release, app.state.fhir, app.state.pix
    opted_out = federated.people_at("leeds-pas", "gp-b86001")[0]  # the test above's person
    everyone = {
        p.nhs_number for s in federated.providers.values() for p in provider_people(s.config)
    }
    someone, other = sorted(everyone - {opted_out})[-2:]
    person = await pix.find(nhs_number=someone)
    neighbour = await pix.find(nhs_number=other)
    ref = f"Patient/{person.id}"

    async def create(body: dict[str, Any]) -> str:
        created = await fhir.create("Consent", body)
        assert created.status == 201
        return str(orjson.loads(created.body)["id"])

    await create(_consent(ref))  # kept
    await create(_consent(ref, code="OPTIN"))  # kept, after the first
    await create(_consent(ref, status="inactive"))  # not in force
    await create(_consent(ref, status="draft"))  # not in force
    await create(_consent(f"{fhir.base}/{ref}"))  # an absolute reference to the hub's Patient
    await create(_consent(f"Patient/{neighbour.id}"))  # someone else's
    gone = await create(_consent(ref))
    assert (await fhir.delete("Consent", gone)).status in (200, 204)
    lapsed = await create(_consent(ref))
    revised = {**_consent(ref, status="inactive"), "id": lapsed}
    assert (await fhir.update("Consent", lapsed, revised)).status == 200

    searched = (await gate.consents([ref]))[ref]
    found, attached = await pix.find_with(gate.consent_sql(), nhs_number=someone)
    assert found == person
    bodies = attached_bodies(attached)
    assert bodies is not None
    assert _about(ref, bodies) == searched
    assert [c["policyRule"]["coding"][0]["code"] for c in searched][:2] == ["OPTOUT", "OPTIN"]
    assert all(c["status"] == "active" for c in searched)
