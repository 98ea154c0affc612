"""The index itself: merge (A40) with history, unmerge refused, unlink, bulk load and the operator CLI."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson
import pytest
from typer.testing import CliRunner

from sharedcare.cli import app as cli_app
from sharedcare.consent.gate import attached_bodies
from sharedcare.fhir.errors import FHIRError
from sharedcare.pix.bulk import load_lines

from .conftest import system_uri, wait_for


async def _verified(
    app: Any, caller: Any, person: dict[str, Any], local: str, expect: int = 201
) -> None:
    assert (await caller.feed(caller.registration(person, local))).status_code == expect

    async def done() -> bool:
        found = await app.state.pix.find_link(caller.system, local)
        return bool(found and found[0].status == "verified")

    assert await wait_for(done)


async def test_merge_points_the_replaced_person_to_the_survivor(
    app: Any, make_system: Any, client: Any, pds_people: list[dict[str, Any]]
) -> None:
    index = app.state.pix
    gp, hosp = await make_system("m-gp"), await make_system("m-hosp")
    old_nhs, new_nhs = pds_people[12]["id"], pds_people[13]["id"]
    await _verified(app, gp, pds_people[12], "g1")
    await _verified(app, hosp, pds_people[13], "h1")
    old = await index.find(nhs_number=old_nhs)
    new = await index.find(nhs_number=new_nhs)

    moved = await index.merge(
        old.id, new.id, by="operator jo", reason="PDS superseded the old number"
    )
    assert moved == 1

    # The replaced NHS number and id both lead to the survivor, which has every linkage.
    for found in (await index.find(nhs_number=old_nhs), await index.find(person_id=old.id)):
        assert found.id == new.id and found.nhs_number == new_nhs
        assert sorted(link.value for link in found.routable) == ["g1", "h1"]
    # The federated query's lookup (the person and their consent records in one statement)
    # follows the merge too, and leaves the records to be fetched for the survivor.
    consent_sql = app.state.release.consent_sql()
    survivor_found = await index.find(nhs_number=new_nhs)
    for key in ({"nhs_number": old_nhs}, {"person_id": old.id}):
        assert await index.find_with(consent_sql, **key) == (survivor_found, None)
    found, attached = await index.find_with(consent_sql, person_id=new.id)
    assert found == survivor_found and attached_bodies(attached) == []
    assert await index.find_with(consent_sql, nhs_number="9434765919") == (None, None)
    # Nothing deleted: the old Patient is inactive and points to the survivor; history kept.
    replaced = (await client.get(f"/fhir/Patient/{old.id}")).json()
    assert replaced["active"] is False
    assert replaced["link"] == [
        {"other": {"reference": f"Patient/{new.id}"}, "type": "replaced-by"}
    ]
    survivor = (await client.get(f"/fhir/Patient/{new.id}")).json()
    assert survivor["link"] == [{"other": {"reference": f"Patient/{old.id}"}, "type": "replaces"}]
    history = await index.history(gp.system, "g1")
    assert history[-1]["event"] == "merged" and (
        history[-1]["person_before"],
        history[-1]["person_after"],
    ) == (old.id, new.id)
    [merge] = await index.merges(old.id)
    assert (merge["by"], merge["reason"]) == ("operator jo", "PDS superseded the old number")

    # A later registration with the replaced number joins the survivor.
    await _verified(app, gp, pds_people[12], "g2")
    assert sorted(link.value for link in (await index.find(nhs_number=new_nhs)).routable) == [
        "g1",
        "g2",
        "h1",
    ]

    with pytest.raises(FHIRError) as refused:
        await index.unmerge(old.id)
    assert (
        refused.value.status == 409
        and "Unmerge is not supported" in str(refused.value)
        and "unlink" in str(refused.value)
    )
    with pytest.raises(FHIRError) as again:
        await index.merge(old.id, new.id, by="x")
    assert again.value.status == 409 and "already merged" in str(again.value)


async def test_unlink_stops_routing_and_allows_a_corrected_registration(
    app: Any, make_system: Any, pds_people: list[dict[str, Any]]
) -> None:
    index = app.state.pix
    gp = await make_system("u-gp")
    await _verified(app, gp, pds_people[14], "w1")
    item = await index.unlink(gp.system, "w1", by="operator", reason="wrong person")
    assert item.status == "unlinked"
    assert (await index.find(nhs_number=pds_people[14]["id"])).routable == ()
    # Unlinked, the local id may be registered again for the right NHS number.
    await _verified(app, gp, pds_people[15], "w1", expect=200)
    assert [
        link.value for link in (await index.find(nhs_number=pds_people[15]["id"])).routable
    ] == ["w1"]
    events = [h["event"] for h in await index.history(gp.system, "w1")]
    assert events == ["registered", "traced", "unlinked", "updated", "traced"]


def _ndjson(caller: Any, people: list[dict[str, Any]], path: Path, bad: bool = True) -> Path:
    lines = [orjson.dumps(caller.registration(p, f"L{i}")) for i, p in enumerate(people)]
    if bad:
        broken = caller.registration(people[0], "LBAD")
        broken["identifier"][1]["value"] = "1234567890"
        lines.insert(2, orjson.dumps(broken))
        lines.insert(3, b"{not json")
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


async def test_bulk_load(
    app: Any, make_system: Any, pds_people: list[dict[str, Any]], tmp_path: Path
) -> None:
    index = app.state.pix
    gp = await make_system("bulk-gp")
    system = await app.state.iam.registry.get("bulk-gp")
    people = pds_people[20:30]
    path = _ndjson(gp, people, tmp_path / "gp.ndjson")
    report = await load_lines(index, system, path.read_bytes().splitlines(), chunk=4)
    assert (report.created, report.failed, report.people_created) == (10, 2, 10)
    assert [(line, reason) for line, reason, _ in report.errors] == [
        (3, "invalid_nhs_number"),
        (4, "malformed"),
    ]

    # Loaded lines are traced by the hub's worker like any registration.
    async def all_verified() -> bool:
        persons = [await index.find(nhs_number=p["id"]) for p in people]
        return all(
            p is not None and [link.status for link in p.links] == ["verified"] for p in persons
        )

    assert await wait_for(all_verified, timeout=20)
    # Loading again changes nothing; a second provider joins the same people.
    again = await load_lines(index, system, path.read_bytes().splitlines(), chunk=4)
    assert (again.created, again.unchanged, again.people_created) == (0, 10, 0)
    other = await make_system("bulk-h")
    report = await load_lines(
        index,
        await app.state.iam.registry.get("bulk-h"),
        _ndjson(other, people, tmp_path / "h.ndjson", bad=False).read_bytes().splitlines(),
        pre_verified=True,
    )
    assert (report.created, report.people_created) == (10, 0)
    person = await index.find(nhs_number=people[0]["id"])
    assert sorted((link.provider, link.status) for link in person.links) == [
        ("bulk-gp", "verified"),
        ("bulk-h", "verified"),
    ]


async def test_cli_load_review_merge(
    app: Any, settings: Any, make_system: Any, pds_people: list[dict[str, Any]], tmp_path: Path
) -> None:
    gp = await make_system("cli-gp")
    people = pds_people[30:34]
    path = _ndjson(gp, people, tmp_path / "cli.ndjson")
    env = {
        "SHAREDCARE_DATABASE_URL": settings.database,
        "SHAREDCARE_DATA_DIR": str(tmp_path / "cli"),
    }
    runner = CliRunner()

    def run(*args: str) -> Any:
        return runner.invoke(cli_app, list(args), env=env)

    loaded = await asyncio.to_thread(
        run, "pix", "load", str(path), "--provider", "cli-gp", "--chunk", "2"
    )
    assert loaded.exit_code == 1, loaded.output  # some lines were refused
    assert (
        "4 created" in loaded.output
        and "2 refused" in loaded.output
        and "line 3: invalid_nhs_number" in loaded.output
    )

    # Review lists what is not verified (here: tracing still pending or done by the hub's worker).
    await app.state.pix.unlink(gp.system, "L0", by="t", reason="test")
    no_nhs = gp.registration(people[0], "NONHS", nhs=None)
    assert (await gp.feed(no_nhs)).status_code == 201
    review = await asyncio.to_thread(run, "pix", "review", "--status", "unverified", "--json")
    assert review.exit_code == 0, review.output
    [item] = [orjson.loads(line) for line in review.output.splitlines() if line.startswith("{")]
    assert (item["value"], item["status"], item["provider"]) == ("NONHS", "unverified", "cli-gp")

    a, b = people[1]["id"], people[2]["id"]
    merged = await asyncio.to_thread(run, "pix", "merge", a, b, "--reason", "duplicate")
    assert merged.exit_code == 0, merged.output
    shown = await asyncio.to_thread(run, "pix", "show", a)
    assert shown.exit_code == 0 and "was merged into" in shown.output and "merge:" in shown.output
    unmerge = await asyncio.to_thread(run, "pix", "unmerge", a)
    assert unmerge.exit_code == 1 and "Unmerge is not supported" in unmerge.output
    unlinked = await asyncio.to_thread(
        run, "pix", "unlink", f"{system_uri('cli-gp')}|L3", "--reason", "wrong"
    )
    assert unlinked.exit_code == 0 and "unlinked" in unlinked.output
