"""The store's hot paths, on both databases.

On PostgreSQL a create is one statement through the bare asyncpg connection
(``Database.driver``) and searches run statements cached per *shape*; these tests hold
those paths to what the general ones do: the same rows, the same results, the same errors,
and no connection lost from the pool.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from helpers import FHIR_JSON, nhs_number, patient
from sqlalchemy import select, text

from sharedcare.fhir.errors import FHIRError
from sharedcare.store.db import Database
from sharedcare.store.repository import Store
from sharedcare.store.schema import INDEX_TABLES, change_log, resource_versions, resources

NHS = "https://fhir.nhs.uk/Id/nhs-number"


def _body(resource: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resource.items() if k not in ("id", "meta")}


async def _rows_of(db: Database, rtype: str, rid: str) -> dict[str, Any]:
    """Everything the store wrote for one resource, without its ids and timestamps."""
    async with db.read() as conn:
        key = (
            await conn.execute(
                select(resources.c.rid).where(resources.c.type == rtype, resources.c.id == rid)
            )
        ).scalar_one()
        version = (
            await conn.execute(
                select(
                    resource_versions.c.version,
                    resource_versions.c.method,
                    resource_versions.c.deleted,
                ).where(resource_versions.c.rid == key)
            )
        ).all()
        log = (
            await conn.execute(
                select(change_log.c.version, change_log.c.op, change_log.c.type).where(
                    change_log.c.id == rid
                )
            )
        ).all()
        index = {}
        for kind, table in INDEX_TABLES.items():
            cols = [c for c in table.columns if c.name != "rid"]
            index[kind] = sorted(
                tuple(row)
                for row in (await conn.execute(select(*cols).where(table.c.rid == key))).all()
            )
    return {"versions": [tuple(v) for v in version], "log": [tuple(x) for x in log], "index": index}


async def test_create_writes_the_same_rows_as_create_in_a_transaction(app: Any) -> None:
    store: Store = app.state.fhir.store
    resource = patient(family='Row"check\\ Ünïcødé 𝄞', given="Ann", nhs=nhs_number(4242))
    resource["birthDate"] = "1970-02-03"
    resource["deceasedDateTime"] = "2020-03-04T05:06:07.123456+01:00"  # sub-second, offset
    resource["address"] = [{"line": ["1 High St"], "city": "Leeds", "postalCode": "LS1 1AA"}]
    resource["managingOrganization"] = {"reference": "Organization/org-1"}
    resource["meta"] = {"profile": ["http://example.org/StructureDefinition/p"]}

    fast = await store.create(store.prepare("Patient", resource))  # one statement on PostgreSQL
    general = await store.db.write(
        lambda conn: store.create_in(conn, store.prepare("Patient", resource))
    )

    assert fast.version == 1 and _body(fast.resource()) == _body(general.resource())
    assert (await store.read("Patient", fast.id)).body == fast.body
    fast_rows = await _rows_of(store.db, "Patient", fast.id)
    assert fast_rows == await _rows_of(store.db, "Patient", general.id)
    assert fast_rows["versions"] == [(1, "create", False)] and fast_rows["log"] == [
        (1, "create", "Patient")
    ]
    assert all(fast_rows["index"][kind] for kind in INDEX_TABLES)  # every index table got rows


async def test_a_created_resource_is_found_by_every_kind_of_parameter(
    client: httpx.AsyncClient,
) -> None:
    number = nhs_number(5151)
    body = {**patient(family="Fastpath", given="Zed", nhs=number), "birthDate": "1981-05-06"}
    body["generalPractitioner"] = [{"reference": "Practitioner/gp-9"}]
    created = (await client.post("/fhir/Patient", json=body, headers=FHIR_JSON)).json()
    for query in (
        f"identifier={NHS}|{number}",  # token
        "family=fastp",  # string
        "general-practitioner=Practitioner/gp-9",  # reference
        "birthdate=1981-05-06",  # date
        f"_id={created['id']}",
    ):
        found = (await client.get(f"/fhir/Patient?{query}")).json()
        assert [e["resource"]["id"] for e in found.get("entry", [])] == [created["id"]], query


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        # Same shape as the first row, other values: the cached statement must not keep values.
        ("identifier={sys}|{a}", ["a"]),
        ("identifier={sys}|{b}", ["b"]),
        ("identifier={sys}|{a},{sys}|{c}", ["a", "c"]),
        ("identifier={sys}|{b},{sys}|{c}", ["b", "c"]),
        ("identifier={a}", ["a"]),  # no system: another shape
        ("identifier=|{a}", []),  # explicitly no system
        ("identifier:not={sys}|{a}&family=shape", ["b", "c"]),
        ("family=shape&given=amy", ["a"]),
        ("family=shape&given=bea", ["b"]),
        ("family:exact=Shape&given:contains=e", ["b"]),
        ("_id={id_a},{id_b}", ["a", "b"]),
        ("_id={id_c}", ["c"]),
        ("birthdate=lt1990-01-01&family=shape", ["a", "b"]),
        ("birthdate=ge1990-01-01&family=shape", ["c"]),
    ],
)
async def test_searches_of_one_shape_do_not_share_values(
    client: httpx.AsyncClient, query: str, expected: list[str]
) -> None:
    people = {
        "a": ("Amy", "1970-01-01"),
        "b": ("Bea", "1980-01-01"),
        "c": ("Cal", "1995-01-01"),
    }
    numbers = {name: nhs_number(7000 + i) for i, name in enumerate(people)}
    ids = {}
    for name, (given, born) in people.items():
        body = {**patient(family="Shape", given=given, nhs=numbers[name]), "birthDate": born}
        ids[name] = (await client.post("/fhir/Patient", json=body, headers=FHIR_JSON)).json()["id"]
    # Run every row's query once first, so each runs again from a warm statement cache.
    url = "/fhir/Patient?" + query.format(
        sys=NHS, **numbers, **{f"id_{k}": v for k, v in ids.items()}
    )
    for _ in range(2):
        found = (await client.get(url)).json()
        assert found["resourceType"] == "Bundle", found
        assert sorted(e["resource"]["id"] for e in found.get("entry", [])) == sorted(
            ids[n] for n in expected
        )
        assert found["total"] == len(expected)


async def test_paging_and_includes_through_cached_statements(client: httpx.AsyncClient) -> None:
    org = {
        "resourceType": "Organization",
        "name": "Paging Org",
        "identifier": [{"system": "urn:o", "value": "po"}],
    }
    org_id = (await client.post("/fhir/Organization", json=org, headers=FHIR_JSON)).json()["id"]
    made = []
    for i in range(7):
        body = {
            **patient(family="Pager", given=f"P{i}"),
            "managingOrganization": {"reference": f"Organization/{org_id}"},
        }
        made.append((await client.post("/fhir/Patient", json=body, headers=FHIR_JSON)).json()["id"])
    seen: list[str] = []
    url: str | None = "/fhir/Patient?family=pager&_count=3&_include=Patient:organization"
    while url:
        page = (await client.get(url)).json()
        entries = page.get("entry", [])
        seen += [e["resource"]["id"] for e in entries if e["search"]["mode"] == "match"]
        assert [e["resource"]["id"] for e in entries if e["search"]["mode"] == "include"] == [
            org_id
        ]
        assert page["total"] == 7
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert seen == made
    back = (
        await client.get(f"/fhir/Organization?_id={org_id}&_revinclude=Patient:organization")
    ).json()
    assert sorted(
        e["resource"]["id"] for e in back["entry"] if e["search"]["mode"] == "include"
    ) == sorted(made)


async def _returned(pool: Any) -> bool:
    """Whether every connection is back in the pool. The hub's own background work (the
    queue worker's idle poll, every 0.2 s) holds one for a millisecond now and then, so
    wait that out; a leaked connection never comes back."""
    for _ in range(100):
        if pool.checkedout() == 0:
            return True
        await asyncio.sleep(0.02)
    return False


async def test_driver_connection_errors_are_translated_and_the_pool_keeps_its_connections(
    app: Any, backend: str
) -> None:
    db: Database = app.state.db
    if backend == "sqlite":  # the bare-driver path exists for PostgreSQL only
        with pytest.raises(RuntimeError):
            async with db.driver():
                pass
        return
    pool = db.engine.sync_engine.pool
    await app.state.fhir.store.create(app.state.fhir.store.prepare("Patient", patient()))
    for _ in range(30):  # more failures than the pool has connections
        with pytest.raises(FHIRError) as caught:
            async with db.driver() as conn:
                await conn.execute(
                    "INSERT INTO resources (type, id, version, last_updated, deleted, body)"
                    " SELECT type, id, 1, now(), false, body FROM resources LIMIT 1"
                )
        assert caught.value.status == 409
    assert await _returned(pool)
    with pytest.raises(asyncpg.PostgresError):  # an error with no FHIR meaning: raised as it is
        async with db.driver() as conn:
            await conn.execute("SELECT no_such_column FROM resources")
    assert await _returned(pool)

    async def slow() -> None:
        async with db.driver() as conn:
            await conn.execute("SELECT pg_sleep(5)")

    task = asyncio.create_task(slow())
    await asyncio.sleep(0.3)
    task.cancel()  # a client that went away mid-statement
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await _returned(pool)  # discarded, not returned mid-statement
    async with db.driver() as conn:
        assert await conn.fetchval("SELECT count(*) FROM resources WHERE type = 'Patient'") == 1
    async with db.read() as conn:  # the SQLAlchemy side of the same pool still works
        assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1


@pytest.mark.parametrize("limit", [1, 2, 20])
async def test_by_token_and_bodies_answer_as_the_search_does(
    app: Any, client: httpx.AsyncClient, limit: int
) -> None:
    """The registry's lookups (Store.by_token, Store.bodies) against the search they replace:
    the same live resources in the same order, deleted ones and other systems left out."""
    store: Store = app.state.fhir.store
    system = "https://example.org/Id/lookup"

    async def made(given: str, ident_system: str, code: str) -> str:
        body = {**patient(family="Lookup", given=given), "identifier": [{"system": ident_system, "value": code}]}
        return (await client.post("/fhir/Patient", json=body, headers=FHIR_JSON)).json()["id"]

    first, gone_id, other_system = (
        await made("Ann", system, "x-1"),
        await made("Bea", system, "x-1"),
        await made("Cy", "https://example.org/Id/other", "x-1"),
    )
    third = await made("Dee", system, "x-1")
    assert (await client.delete(f"/fhir/Patient/{gone_id}")).status_code in (200, 204)

    searched = (await client.get(f"/fhir/Patient?identifier={system}|x-1&_count={limit}")).json()
    expected = [e["resource"]["id"] for e in searched.get("entry", [])]
    assert expected == [first, third][:limit]
    found = await store.by_token("Patient", "identifier", system, "x-1", limit=limit)
    assert [orjson.loads(b)["id"] for b in found] == expected
    assert await store.by_token("Patient", "identifier", system, "x-2", limit=limit) == []

    bodies = await store.bodies("Patient", [first, gone_id, other_system, "no-such-id"])
    assert sorted(bodies) == sorted([first, other_system])
    assert orjson.loads(bodies[first])["name"][0]["given"] == ["Ann"]
    assert await store.bodies("Patient", []) == {}
