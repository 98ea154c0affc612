"""$ihe-pix (IHE PIXm ITI-83) and $data-availability, over verified linkages only."""

from __future__ import annotations

from typing import Any

from conftest import END_USER  # type: ignore[attr-defined]

from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM

from .conftest import system_uri, wait_for


async def _registered(app: Any, make_system: Any, people: list[dict[str, Any]]) -> dict[str, Any]:
    """Person 10 held by two GPs (verified) and a hospital (mismatched); person 11 by GP A only."""
    a = await make_system("pix-a")
    b = await make_system("pix-b")
    h = await make_system("pix-h")
    p, q = people[10], people[11]
    for caller, local, body in (
        (a, "a10", a.registration(p, "a10")),
        (b, "b10", b.registration(p, "b10")),
        (h, "h10", h.registration(p, "h10", gender="other" if p["gender"] != "other" else "male")),
        (a, "a11", a.registration(q, "a11")),
    ):
        assert (await caller.feed(body)).status_code == 201

    async def settled() -> bool:
        person = await app.state.pix.find(nhs_number=p["id"])
        statuses = sorted(link.status for link in person.links) if person else []
        return statuses == ["mismatch", "verified", "verified"]

    assert await wait_for(settled)
    assert await wait_for(lambda: _verified(app, "pix-a", "a11"))
    consumer = await make_system(
        "portal", kind="consumer", scopes="system/Patient.rs", end_user=END_USER
    )
    return {"p": p, "q": q, "consumer": consumer, "a": a}


async def _verified(app: Any, provider: str, value: str) -> bool:
    found = await app.state.pix.find_link(system_uri(provider), value)
    return bool(found and found[0].status == "verified")


def _targets(body: dict[str, Any]) -> tuple[list[tuple[str, str]], list[str]]:
    idents = [
        (p["valueIdentifier"]["system"], p["valueIdentifier"]["value"])
        for p in body["parameter"]
        if p["name"] == "targetIdentifier"
    ]
    ids = [p["valueReference"]["reference"] for p in body["parameter"] if p["name"] == "targetId"]
    return idents, ids


async def test_ihe_pix(app: Any, make_system: Any, pds_people: list[dict[str, Any]]) -> None:
    world = await _registered(app, make_system, pds_people)
    http, p = world["consumer"].http, world["p"]
    person = await app.state.pix.find(nhs_number=p["id"])

    # From a local id: the NHS number and the other verified GP; never the mismatched hospital.
    body = (
        await http.get(
            "/fhir/Patient/$ihe-pix", params={"sourceIdentifier": f"{system_uri('pix-a')}|a10"}
        )
    ).json()
    assert body["resourceType"] == "Parameters"
    idents, ids = _targets(body)
    assert idents == [(NHS_NUMBER_SYSTEM, p["id"]), (system_uri("pix-b"), "b10")]
    assert ids == [
        "https://pix-b.example.org/fhir/Patient/b10",
        f"http://testserver/fhir/Patient/{person.id}",
    ]

    # From the NHS number, restricted to one target domain.
    body = (
        await http.get(
            "/fhir/Patient/$ihe-pix",
            params={
                "sourceIdentifier": f"{NHS_NUMBER_SYSTEM}|{p['id']}",
                "targetSystem": system_uri("pix-a"),
            },
        )
    ).json()
    assert _targets(body)[0] == [(system_uri("pix-a"), "a10")]


# ITI-83 error cases; one registered world serves the whole table (tracing takes time).
ERRORS = [
    (
        {"sourceIdentifier": "https://nobody.example/Id|1"},
        400,
        "sourceIdentifier Assigning Authority not found",
    ),
    (
        {"sourceIdentifier": "{a}|a10", "targetSystem": "https://nobody.example/Id"},
        403,
        "targetSystem not found",
    ),
    ({"sourceIdentifier": "{a}|unknown"}, 404, "sourceIdentifier Patient Identifier not found"),
    (
        {"sourceIdentifier": "{h}|h10"},
        404,
        "not found",
    ),  # registered but mismatched: never cross-referenced
    ({"sourceIdentifier": f"{NHS_NUMBER_SYSTEM}|9434765918"}, 404, "not found"),  # fails Modulus 11
    ({}, 400, "exactly one sourceIdentifier"),
]


async def test_ihe_pix_errors(app: Any, make_system: Any, pds_people: list[dict[str, Any]]) -> None:
    world = await _registered(app, make_system, pds_people)
    for params, status, words in ERRORS:
        query = {
            k: v.format(a=system_uri("pix-a"), h=system_uri("pix-h")) for k, v in params.items()
        }
        response = await world["consumer"].http.get("/fhir/Patient/$ihe-pix", params=query)
        assert response.status_code == status, (params, response.text)
        assert response.json()["resourceType"] == "OperationOutcome" and words in response.text, (
            params
        )


async def test_data_availability(
    app: Any, make_system: Any, client: Any, pds_people: list[dict[str, Any]]
) -> None:
    world = await _registered(app, make_system, pds_people)
    http, p = world["consumer"].http, world["p"]
    person = await app.state.pix.find(nhs_number=p["id"])
    response = await http.get(
        "/fhir/Patient/$data-availability", params={"identifier": f"{NHS_NUMBER_SYSTEM}|{p['id']}"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["parameter"][0] == {
        "name": "patient",
        "valueReference": {"reference": f"Patient/{person.id}"},
    }
    providers = [
        next(part for part in prm["part"] if part["name"] == "id")["valueString"]
        for prm in body["parameter"][1:]
    ]
    assert providers == [
        "pix-a",
        "pix-b",
    ]  # the mismatched hospital is not a holder the hub routes to
    assert (
        "a10" not in response.text and "birthDate" not in response.text
    )  # no local ids, no demographics
    by_person = await http.get(
        "/fhir/Patient/$data-availability", params={"patient": f"Patient/{person.id}"}
    )
    assert by_person.json() == body

    # Every answer is audited against the person.
    events = (
        await client.get("/fhir/AuditEvent", params={"patient": f"Patient/{person.id}"})
    ).json()
    assert events["total"] if "total" in events else events.get("entry")

    # A provider system, or a consumer asking for research, is not entitled to ask.
    provider = await make_system("pix-x", scopes="system/Patient.s", end_user=END_USER)
    refused = await provider.http.get(
        "/fhir/Patient/$data-availability", params={"patient": f"Patient/{person.id}"}
    )
    assert refused.status_code == 403 and "consumer" in refused.text
    research = await make_system(
        "research",
        kind="consumer",
        scopes="system/Patient.s",
        end_user={**END_USER, "reason_for_access": "HRESCH"},
    )
    refused = await research.http.get(
        "/fhir/Patient/$data-availability", params={"patient": f"Patient/{person.id}"}
    )
    assert refused.status_code == 403 and "direct care" in refused.text
    unknown = await http.get(
        "/fhir/Patient/$data-availability", params={"patient": "Patient/nobody"}
    )
    assert unknown.status_code == 404


async def test_queries_need_end_user_context(app: Any, make_system: Any) -> None:
    system_only = await make_system("portal-batch", kind="consumer", scopes="system/Patient.s")
    response = await system_only.http.get(
        "/fhir/Patient/$ihe-pix", params={"sourceIdentifier": f"{NHS_NUMBER_SYSTEM}|9434765919"}
    )
    assert response.status_code == 403 and "requesting_user" in response.text
