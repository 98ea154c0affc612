"""Bulk loads commit chunks side by side (PostgreSQL): the result is the one-by-one result,
and the golden Patients it writes with COPY are the store's own (read and search)."""

from __future__ import annotations

from typing import Any

import orjson

from sharedcare.pix.bulk import load_lines
from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM


async def test_chunks_in_flight_give_the_one_by_one_result(
    app: Any, make_system: Any, pds_people: list[dict[str, Any]]
) -> None:
    gp = await make_system("chunk-gp")
    system = await app.state.iam.registry.get("chunk-gp")
    p = pds_people
    # chunk=2: repeats and shared NHS numbers land in neighbouring chunks, some in flight.
    plan = [
        (p[0], "c0"), (p[1], "c1"),
        (p[2], "c2"), (p[0], "c0"),  # the same line again, next chunk: unchanged
        (p[0], "c0b"), (p[3], "c3"),  # a second local id for person 0: one person, two links
        (p[4], "c4"), (p[2], "c2b"),
        (p[5], "c5"), (p[6], "c6"),
    ]  # fmt: skip
    lines = [orjson.dumps(gp.registration(person, local)) for person, local in plan]
    report = await load_lines(app.state.pix, system, lines, chunk=2, pre_verified=True)
    assert (report.created, report.unchanged, report.failed) == (9, 1, 0)
    assert report.people_created == 7
    for number, locals_ in (
        (p[0]["id"], ["c0", "c0b"]),
        (p[2]["id"], ["c2", "c2b"]),
        (p[5]["id"], ["c5"]),
    ):
        person = await app.state.pix.find(nhs_number=number)
        assert sorted(link.value for link in person.links) == locals_


async def test_bulk_golden_patients_are_the_stores_own(
    app: Any, make_system: Any, client: Any, pds_people: list[dict[str, Any]]
) -> None:
    gp = await make_system("golden-gp")
    system = await app.state.iam.registry.get("golden-gp")
    people = pds_people[:6]
    lines = [orjson.dumps(gp.registration(person, f"g{i}")) for i, person in enumerate(people)]
    report = await load_lines(app.state.pix, system, lines, chunk=2, pre_verified=True)
    assert report.people_created == 6
    for source in people:
        person = await app.state.pix.find(nhs_number=source["id"])
        read = await client.get(f"/fhir/Patient/{person.id}")
        assert read.status_code == 200, read.text
        body = read.json()
        assert body["meta"]["versionId"] == "1"
        assert body["identifier"] == [{"system": NHS_NUMBER_SYSTEM, "value": source["id"]}]
        family = source["name"][0]["family"]
        found = await client.get(
            "/fhir/Patient",
            params={"identifier": f"{NHS_NUMBER_SYSTEM}|{source['id']}"},
        )
        assert [e["resource"]["id"] for e in found.json().get("entry", [])] == [person.id]
        by_demographics = await client.get(
            "/fhir/Patient",
            params={
                "family": family,
                "birthdate": source["birthDate"],
                "address-postalcode": source["address"][0]["postalCode"],
            },
        )
        assert person.id in [e["resource"]["id"] for e in by_demographics.json().get("entry", [])]
        history = await client.get(f"/fhir/Patient/{person.id}/_history")
        assert [e["resource"]["meta"]["versionId"] for e in history.json()["entry"]] == ["1"]
