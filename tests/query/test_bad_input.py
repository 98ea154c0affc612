"""Bad federated searches get a 4xx OperationOutcome that says what to change."""

from __future__ import annotations

from typing import Any

import pytest
from query.federation import NHS, Federated

VALID = "9434765919"


@pytest.mark.parametrize(
    ("path", "params", "headers", "status", "says"),
    [
        ("/fhir/Foo", {"patient.identifier": f"{NHS}|{VALID}"}, {}, 404, "Foo"),
        ("/fhir/Observation", {"patient.identifier": f"{NHS}|{VALID}", "colour": "red"}, {}, 400, "colour"),
        ("/fhir/Observation", {"_include": "Observation:subject", "patient.identifier": f"{NHS}|{VALID}"}, {}, 400, "_include"),
        ("/fhir/Observation", {"code": "1234"}, {}, 400, "must name one person"),
        ("/fhir/Observation", {"patient.identifier": f"https://example.org/mrn|{VALID}"}, {}, 400, "nhs-number"),
        ("/fhir/Observation", {"patient.identifier": f"{NHS}|1234567890"}, {}, 400, "patient.identifier"),
        ("/fhir/Observation", {"patient": "Practitioner/1"}, {}, 400, "Patient"),
        ("/fhir/Observation", {"patient": "a,b"}, {}, 400, "one person"),
        ("/fhir/Observation", {"patient.identifier": f"{NHS}|{VALID}", "_count": "-1"}, {}, 400, "_count"),
        ("/fhir/Observation", {"patient.identifier": f"{NHS}|{VALID}"}, {"X-Provider-Wait-Time": "soon"}, 400, "milliseconds"),
        ("/fhir/Observation", {"patient.identifier": f"{NHS}|{VALID}"}, {"X-Provider-Wait-Time": "0"}, 400, "milliseconds"),
        ("/fhir/Observation", {"_cursor": "not-a-cursor"}, {}, 410, "expired"),
        ("/fhir/providers/nobody/Observation/1", {}, {}, 404, "nobody"),
        ("/fhir/providers/leeds-pas/Nonsense/1", {}, {}, 404, "Nonsense"),
    ],
)  # fmt: skip
async def test_bad_search(
    federated: Federated,
    path: str,
    params: dict[str, str],
    headers: dict[str, str],
    status: int,
    says: str,
) -> None:
    r = await federated.http.get(path, params=params, headers=headers)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["resourceType"] == "OperationOutcome"
    assert says in body["issue"][0]["diagnostics"]


async def test_unsupported_parameters_can_be_ignored_leniently(federated: Federated) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001", "community-rxf")[0]
    r = await federated.search(
        "Observation", nhs, ("colour", "red"), headers={"Prefer": "handling=lenient"}
    )
    assert r.status_code == 200
    issues = [
        i
        for e in r.json()["entry"]
        if e["search"]["mode"] == "outcome"
        for i in e["resource"]["issue"]
    ]
    assert any("colour" in i["diagnostics"] for i in issues)


async def test_a_consumer_without_the_scope_is_refused(
    federated: Federated, consumer_token: Any
) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001", "community-rxf")[0]
    token = await consumer_token("narrow", "system/Patient.rs")
    r = await federated.search("Observation", nhs, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403
    assert r.json()["resourceType"] == "OperationOutcome"


async def test_a_token_without_end_user_is_refused(
    federated: Federated, consumer_token: Any
) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001", "community-rxf")[0]
    token = await consumer_token(end_user=None)
    r = await federated.search("Observation", nhs, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 403
    assert "requesting_user" in r.json()["issue"][0]["diagnostics"]
