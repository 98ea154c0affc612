"""Which searches are federated, and the provider wait a request gets (no database needed)."""

from __future__ import annotations

import pytest

from sharedcare.fhir.errors import FHIRError
from sharedcare.query.params import federated_types, is_federated, provider_wait

NHS = "https://fhir.nhs.uk/Id/nhs-number|9434765919"


@pytest.mark.parametrize(
    ("rtype", "items", "federated"),
    [
        ("Observation", [("patient.identifier", NHS)], True),
        ("Observation", [], True),  # then a 400 says the person is missing
        ("Patient", [("identifier", NHS)], False),  # the hub's own
        ("Consent", [("patient", "Patient/1")], False),
        ("DocumentReference", [("patient.identifier", NHS)], True),
        ("DocumentReference", [("subject:Patient.identifier", NHS)], True),
        ("DocumentReference", [("patient", "Patient/1")], False),
        (
            "DocumentReference",
            [("_cursor", "eyJhIjoxfQ.eyJiIjoyfQ.c2ln")],
            True,
        ),  # a federated next link
        ("DocumentReference", [("_cursor", "WyJhZnRlciIsbnVsbCwxXQ")], False),  # the store's own
    ],
)
def test_routing(rtype: str, items: list[tuple[str, str]], federated: bool) -> None:
    assert is_federated(rtype, items) is federated


def test_clinical_types_are_federated_and_hub_types_not() -> None:
    types = federated_types()
    assert {"Observation", "Condition", "Encounter", "MedicationRequest", "Immunization"} <= types
    assert not {"Patient", "Consent", "AuditEvent", "Organization", "Bundle"} & types


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({}, 1.5),
        ({"x-provider-wait-time": "200"}, 0.2),
        ({"yhcr-provider-wait-time": "300"}, 0.3),
        ({"x-provider-wait-time": "999999"}, 5.0),  # capped
    ],
)
def test_provider_wait(headers: dict[str, str], seconds: float) -> None:
    assert provider_wait(headers, 1500, 5000) == seconds


@pytest.mark.parametrize("value", ["", "abc", "-5", "0", "1.5"])
def test_bad_wait_header(value: str) -> None:
    with pytest.raises(FHIRError) as err:
        provider_wait({"x-provider-wait-time": value}, 1500, 5000)
    assert err.value.status == 400
