"""The audit trail through the FHIR API, as an auditor and an operator use it, on both databases."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import orjson
import pytest
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy import func, select

from sharedcare.audit import AuditRecord, AuditWriter, to_audit_event
from sharedcare.audit.schema import audit_events
from sharedcare.store import migrate
from sharedcare.store.db import Database
from sharedcare.store.repository import Store
from sharedcare.store.schema import INDEX_TABLES, resources

Make = Callable[..., AuditRecord]
FHIR_JSON = {"Content-Type": "application/fhir+json"}


def imported(n: int, *, patient: str = "Patient/p1", **extra: Any) -> dict[str, Any]:
    """An AuditEvent as an earlier system recorded it, on 2025-01-{n}."""
    return {
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
        "subtype": [{"system": "http://hl7.org/fhir/restful-interaction", "code": "read"}],
        "action": "R",
        "recorded": f"2025-01-{n:02d}T09:00:00Z",
        "outcome": "0",
        "agent": [{"requestor": True, "altId": f"old-user-{n}", "who": {"reference": "Practitioner/pr1"}}],
        "source": {"observer": {"display": "old portal"}},
        "entity": [{"what": {"reference": patient}}],
        **extra,
    }


async def post(client: httpx.AsyncClient, event: dict[str, Any]) -> httpx.Response:
    return await client.post("/fhir/AuditEvent", content=orjson.dumps(event), headers=FHIR_JSON)


def entry_ids(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", ()) if e["search"]["mode"] == "match"]


async def trail_size(app: Any) -> int:
    async with app.state.db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(audit_events))).scalar_one())


async def test_an_imported_event_is_read_vread_and_has_one_version(client: httpx.AsyncClient) -> None:
    created = await post(client, imported(3))
    assert created.status_code == 201, created.text
    location = created.headers["Location"]
    event_id = location.split("/AuditEvent/")[1].split("/")[0]
    assert location.endswith(f"/AuditEvent/{event_id}/_history/1")
    read = await client.get(f"/fhir/AuditEvent/{event_id}")
    assert read.status_code == 200 and read.headers["ETag"] == 'W/"1"'
    body = read.json()
    AuditEvent.model_validate(body)
    assert body["id"] == event_id and body["meta"]["versionId"] == "1"
    assert body["agent"][0]["altId"] == "old-user-3"
    assert (await client.get(f"/fhir/AuditEvent/{event_id}/_history/1")).json() == body
    second = await client.get(f"/fhir/AuditEvent/{event_id}/_history/2")
    assert second.status_code == 404 and "only version 1" in second.text
    history = (await client.get(f"/fhir/AuditEvent/{event_id}/_history")).json()
    assert history["type"] == "history" and [e["resource"]["id"] for e in history["entry"]] == [event_id]
    missing = await client.get("/fhir/AuditEvent/no-such-event")
    assert missing.status_code == 404 and missing.json()["resourceType"] == "OperationOutcome"


@pytest.mark.parametrize(
    ("change", "status", "words"),
    [
        ({"recorded": "2025-01-03"}, 422, "AuditEvent.recorded"),  # a date, not an instant
        ({"action": "X"}, 422, "AuditEvent.action"),
        ({"agent": []}, 422, "agent"),
        ({"resourceType": "Patient"}, 400, "Patient"),
    ],
)
async def test_a_bad_import_is_refused_and_nothing_is_written(
    app: Any, client: httpx.AsyncClient, change: dict[str, Any], status: int, words: str
) -> None:
    response = await post(client, {**imported(1), **change})
    assert response.status_code == status, response.text
    assert response.json()["resourceType"] == "OperationOutcome" and words in response.text
    assert await trail_size(app) == 0


async def test_pages_walk_the_whole_trail_in_time_order_both_ways(app: Any, client: httpx.AsyncClient) -> None:
    for day in (5, 1, 7, 3, 2, 6, 4):  # imported out of time order
        assert (await post(client, imported(day))).status_code == 201
    seen: list[str] = []
    # (Reading the trail is itself audited, today: the date keeps those events out.)
    url: str | None = "/fhir/AuditEvent?patient=Patient/p1&date=lt2025-02&_sort=-_lastUpdated&_count=3"
    pages = []
    while url:
        page = (await client.get(url)).json()
        pages.append(page)
        seen += [e["resource"]["recorded"] for e in page.get("entry", ())]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
        if url:
            parts = urlsplit(url)
            url = f"{parts.path}?{parts.query}"
    assert seen == [f"2025-01-{d:02d}T09:00:00Z" for d in (7, 6, 5, 4, 3, 2, 1)]
    assert [p["total"] for p in pages] == [7, 7, 7]
    # The second page's previous link is the first page again.
    previous = next(link["url"] for link in pages[1]["link"] if link["relation"] == "previous")
    back = (await client.get("/fhir/AuditEvent", params=parse_qsl(urlsplit(previous).query))).json()
    assert entry_ids(back) == entry_ids(pages[0])
    # Without _sort: the order events reached the trail.
    arrival = (await client.get("/fhir/AuditEvent", params={"altid": "old-user-5,old-user-1"})).json()
    assert [e["resource"]["recorded"][:10] for e in arrival["entry"]] == ["2025-01-05", "2025-01-01"]
    since = (await client.get("/fhir/AuditEvent/_history", params={"_since": "2025-01-06T00:00:00Z"})).json()
    days = [e["resource"]["recorded"][:10] for e in since["entry"]]
    assert days[-2:] == ["2025-01-07", "2025-01-06"]  # newest first; today's are the trail reads
    assert all(day >= "2025-01-06" for day in days)


@pytest.mark.parametrize(
    ("query", "words"),
    [
        ("AuditEvent?type=110110", "Supported: _id, _lastUpdated, action, agent"),
        ("AuditEvent?entity-role=1", "entity-role"),
        ("AuditEvent?_include=AuditEvent:patient", "searched on its own"),
        ("AuditEvent?date=sa2025-01-01", "prefix 'sa' is not supported"),
        ("AuditEvent?patient:contains=p1", "Modifier :contains is not supported"),
        ("AuditEvent?_sort=recorded", "_sort='recorded' is not supported"),
        ("AuditEvent?_cursor=bogus", "not one this server issued"),
        # The trail is not joined into other searches.
        ("Patient?_revinclude=AuditEvent:patient", "AuditEvent is searched on its own"),
        ("Patient?_revinclude=AuditEvent:entity", "AuditEvent is searched on its own"),
    ],
)
async def test_searches_the_trail_cannot_answer_are_a_400_saying_why(
    client: httpx.AsyncClient, query: str, words: str
) -> None:
    response = await client.get(f"/fhir/{query}")
    assert response.status_code == 400, response.text
    assert words in response.json()["issue"][0]["diagnostics"]


async def test_lenient_handling_ignores_what_it_cannot_search_and_says_so(client: httpx.AsyncClient) -> None:
    await post(client, imported(2))
    response = await client.get(
        "/fhir/AuditEvent?type=110110&patient=p1", headers={"Prefer": "handling=lenient"}
    )
    assert response.status_code == 200
    bundle = response.json()
    assert len(entry_ids(bundle)) == 1
    [warning] = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert "type" in warning["resource"]["issue"][0]["diagnostics"]


async def test_bundles_do_not_carry_audit_events(app: Any, client: httpx.AsyncClient) -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": "AuditEvent?patient=p1"}},
            {"resource": imported(1), "request": {"method": "POST", "url": "AuditEvent"}},
        ],
    }
    response = await client.post("/fhir", content=orjson.dumps(bundle), headers=FHIR_JSON)
    assert response.status_code == 400 and "GET /fhir/AuditEvent" in response.text
    assert await trail_size(app) == 0


async def test_events_in_the_store_move_to_the_trail_on_upgrade(
    db: Database, store: Store, writer: AuditWriter, make_record: Make
) -> None:
    """A hub upgraded from 0005 keeps its trail: the store's AuditEvents move, ids and all."""
    await writer.stop()
    await migrate.downgrade(db, "0005_messaging")
    try:
        old = [to_audit_event(make_record(request_id=f"old-{i}", patient=f"Patient/p{i}")) for i in range(3)]
        stored = [await store.create(store.prepare("AuditEvent", event)) for event in old]
        deleted = await store.create(store.prepare("AuditEvent", old[0]))
        await store.delete("AuditEvent", deleted.id)
    finally:
        await migrate.upgrade(db)
    async with db.read() as conn:
        rows = (await conn.execute(select(audit_events.c.id, audit_events.c.patient, audit_events.c.body))).all()
        left = (await conn.execute(select(func.count()).where(resources.c.type == "AuditEvent"))).scalar_one()
        indexed = 0
        for table in INDEX_TABLES.values():
            indexed += (await conn.execute(select(func.count()).where(table.c.type == "AuditEvent"))).scalar_one()
    assert sorted((r.id, r.patient) for r in rows) == sorted((s.id, f"p{i}") for i, s in enumerate(stored))
    assert all(orjson.loads(r.body)["id"] == r.id for r in rows)
    assert left == 0 and indexed == 0  # nothing of them is left in the store's tables


async def test_a_downgrade_refuses_to_drop_a_trail_that_holds_events(
    db: Database, writer: AuditWriter, make_record: Make
) -> None:
    await writer.record(make_record())
    with pytest.raises(RuntimeError, match="export them"):
        await migrate.downgrade(db, "0005_messaging")
    assert await migrate.is_current(db)
