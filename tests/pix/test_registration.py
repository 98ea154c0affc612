"""Registration by providers: the PIXm feed, POST, tracing to verified, refusals that write nothing."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import END_USER  # type: ignore[attr-defined]
from sqlalchemy import func, select

from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM
from sharedcare.pix.schema import pix_links, pix_people
from sharedcare.queue.schema import queue_items
from sharedcare.store.schema import resources

from .conftest import CONSUMER_SCOPES, wait_for

STATUS = "https://sharedcare.example.org/fhir/CodeSystem/pix-link-status"


def status_of(response: Any) -> str:
    return str(response.json()["meta"]["tag"][0]["code"])


async def link_status(app: Any, system: str, value: str) -> str | None:
    found = await app.state.pix.find_link(system, value)
    return found[0].status if found else None


async def status_is(app: Any, system: str, value: str, expected: str) -> bool:
    return await link_status(app, system, value) == expected


async def verified(app: Any, system: str, value: str) -> bool:
    return await status_is(app, system, value, "verified")


async def test_feed_registers_traces_and_verifies(
    app: Any, make_system: Any, pds_people: list[dict[str, Any]]
) -> None:
    gp = await make_system("gp-a")
    person = pds_people[0]
    response = await gp.feed(gp.registration(person, "A1"))
    assert response.status_code == 201, response.text
    assert status_of(response) in ("pending", "verified")
    assert response.headers["location"].startswith("http://testserver/fhir/Patient/")
    assert await wait_for(lambda: verified(app, gp.system, "A1"))

    found = await app.state.pix.find(nhs_number=person["id"])
    assert found is not None and [
        (link.provider, link.value, link.status) for link in found.routable
    ] == [("gp-a", "A1", "verified")]
    assert response.headers["location"].endswith(f"/Patient/{found.id}")

    # The same registration again changes nothing; POST is the same interface.
    again = await gp.feed(gp.registration(person, "A1"))
    assert (again.status_code, status_of(again)) == (200, "verified")
    posted = await gp.http.post(
        "/fhir/Patient",
        json=gp.registration(pds_people[1], "A2"),
        headers={"Content-Type": "application/fhir+json"},
    )
    assert posted.status_code == 201, posted.text
    assert await wait_for(lambda: verified(app, gp.system, "A2"))


async def test_the_golden_patient_is_searchable(
    app: Any, make_system: Any, client: Any, pds_people: list[dict[str, Any]]
) -> None:
    gp = await make_system("gp-b")
    person = pds_people[2]
    assert (await gp.feed(gp.registration(person, "B1"))).status_code == 201
    assert await wait_for(lambda: verified(app, gp.system, "B1"))
    name = person["name"][0]
    postcode = person["address"][0]["postalCode"]
    for query in (
        {"identifier": f"{NHS_NUMBER_SYSTEM}|{person['id']}"},
        {"family": name["family"], "given": name["given"][0], "birthdate": person["birthDate"]},
        {"address-postalcode": postcode, "family": name["family"]},
    ):
        bundle = (await client.get("/fhir/Patient", params=query)).json()
        ids = [e["resource"]["identifier"][0]["value"] for e in bundle.get("entry", [])]
        assert ids == [person["id"]], query


async def test_a_mismatch_is_flagged_and_never_routed(
    app: Any, make_system: Any, pds_people: list[dict[str, Any]]
) -> None:
    gp = await make_system("gp-c")
    person = pds_people[3]
    assert (await gp.feed(gp.registration(person, "C1", birthDate="1901-01-01"))).status_code == 201
    assert await wait_for(lambda: status_is(app, gp.system, "C1", "mismatch"))
    found = await app.state.pix.find(nhs_number=person["id"])
    assert found is not None and found.routable == ()
    [item] = await app.state.pix.review(provider="gp-c")
    assert (item.status, item.value) == ("mismatch", "C1") and "birth_date" in (item.reasons or "")


async def test_without_an_nhs_number_the_registration_is_kept_for_review(
    app: Any, make_system: Any, pds_people: list[dict[str, Any]]
) -> None:
    gp = await make_system("gp-d")
    response = await gp.feed(gp.registration(pds_people[4], "D1", nhs=None))
    assert (response.status_code, status_of(response)) == (201, "unverified")
    [item] = await app.state.pix.review(provider="gp-d")
    assert (item.status, item.person_id) == ("unverified", None)
    # Giving the NHS number later links and verifies it.
    response = await gp.feed(gp.registration(pds_people[4], "D1"))
    assert response.status_code == 200
    assert await wait_for(lambda: verified(app, gp.system, "D1"))


async def test_a_transient_pds_failure_is_retried_until_verified(
    app: Any, make_system: Any, pds_server: Any, pds_people: list[dict[str, Any]]
) -> None:
    import httpx

    person = pds_people[5]
    async with httpx.AsyncClient() as http:
        await http.put(f"{pds_server.url}/_admin/faults", json={"fail_first": 2})
        try:
            gp = await make_system("gp-e")
            assert (await gp.feed(gp.registration(person, "E1"))).status_code == 201
            assert await wait_for(lambda: verified(app, gp.system, "E1"), timeout=20)
        finally:
            await http.put(f"{pds_server.url}/_admin/faults", json={"fail_first": 0})
    history = await app.state.pix.history(gp.system, "E1")
    assert [h["event"] for h in history] == ["registered", "traced"]


async def _counts(app: Any) -> tuple[int, ...]:
    async with app.state.db.read() as conn:
        return tuple(
            [
                (await conn.execute(select(func.count()).select_from(table))).scalar_one()
                for table in (pix_links, pix_people, resources, queue_items)
            ]
        )


def _failed(provider: str, reason: str) -> float:
    from prometheus_client import REGISTRY

    return (
        REGISTRY.get_sample_value(
            "sharedcare_pix_registrations_failed_total", {"provider": provider, "reason": reason}
        )
        or 0.0
    )


def _bad(caller: Any, person: dict[str, Any], case: str) -> dict[str, Any]:
    body = caller.registration(person, "X1")
    if case == "invalid_nhs_number":
        body["identifier"][1]["value"] = person["id"][:9] + str((int(person["id"][9]) + 1) % 10)
    elif case == "foreign_system":
        body["identifier"][0]["system"] = "https://fhir.example.org/someone-else/Id/patient"
    elif case == "missing_demographics":
        del body["birthDate"]
    elif case == "two_local_ids":
        body["identifier"].append({"system": caller.system, "value": "X2"})
    elif case == "not_a_patient":
        body["resourceType"] = "Observation"
    return body


@pytest.mark.parametrize(
    ("case", "status", "reason", "words"),
    [
        ("invalid_nhs_number", 422, "invalid_nhs_number", "check digit"),
        ("foreign_system", 403, "foreign_system", "does not own the identifier system"),
        ("missing_demographics", 422, "missing_demographics", "birthDate"),
        ("two_local_ids", 400, "malformed", "exactly one local identifier"),
        ("not_a_patient", 400, "malformed", "Patient"),
    ],
)
async def test_bad_input_is_refused_counted_and_writes_nothing(
    app: Any,
    make_system: Any,
    pds_people: list[dict[str, Any]],
    case: str,
    status: int,
    reason: str,
    words: str,
) -> None:
    gp = await make_system("gp-bad")
    before, failed = await _counts(app), _failed("gp-bad", reason)
    response = await gp.http.put(
        "/fhir/Patient",
        params={"identifier": f"{gp.system}|X1"}
        if case != "foreign_system"
        else {"identifier": "https://fhir.example.org/someone-else/Id/patient|X1"},
        json=_bad(gp, pds_people[6], case),
        headers={"Content-Type": "application/fhir+json"},
    )
    assert response.status_code == status, response.text
    outcome = response.json()
    assert (
        outcome["resourceType"] == "OperationOutcome"
        and words in outcome["issue"][0]["diagnostics"]
    )
    assert await _counts(app) == before
    assert _failed("gp-bad", reason) == failed + 1


async def test_one_local_id_cannot_be_two_people(
    app: Any, make_system: Any, pds_people: list[dict[str, Any]]
) -> None:
    gp = await make_system("gp-f")
    assert (await gp.feed(gp.registration(pds_people[7], "F1"))).status_code == 201
    before, failed = await _counts(app), _failed("gp-f", "conflict")
    response = await gp.feed(gp.registration(pds_people[8], "F1"))
    assert response.status_code == 409
    diagnostics = response.json()["issue"][0]["diagnostics"]
    assert pds_people[7]["id"] in diagnostics and "unlink" in diagnostics
    assert await _counts(app) == before
    assert _failed("gp-f", "conflict") == failed + 1


async def test_who_may_register(
    app: Any, make_system: Any, pds_people: list[dict[str, Any]]
) -> None:
    # A consumer without end-user context is refused: it is not a provider.
    consumer = await make_system("portal", kind="consumer", scopes="system/Patient.cruds")
    response = await consumer.http.put(
        "/fhir/Patient",
        params={"identifier": "https://x.example/Id|1"},
        json={"resourceType": "Patient"},
        headers={"Content-Type": "application/fhir+json"},
    )
    assert response.status_code == 403 and "not registered as a provider" in response.text
    response = await consumer.http.post(
        "/fhir/Patient",
        json={"resourceType": "Patient"},
        headers={"Content-Type": "application/fhir+json"},
    )
    assert response.status_code == 403
    # A provider without the write scope is refused by the scope check.
    reader = await make_system("gp-reader", scopes="system/Patient.s")
    response = await reader.feed(reader.registration(pds_people[9], "R1"))
    assert response.status_code == 403 and "system/Patient.u" in response.text
    # A provider's token (no end user) still cannot read patient data.
    gp = await make_system("gp-g", scopes="system/Patient.cus")
    assert (await gp.http.get("/fhir/Patient")).status_code == 403
    # An operator with end-user context still writes the hub's own Patients through the store.
    operator = await make_system(
        "operator", kind="consumer", scopes="system/Patient.cruds", end_user=END_USER
    )
    created = await operator.http.post(
        "/fhir/Patient",
        json={"resourceType": "Patient", "name": [{"family": "Direct"}]},
        headers={"Content-Type": "application/fhir+json"},
    )
    assert created.status_code == 201, created.text


_ = CONSUMER_SCOPES
