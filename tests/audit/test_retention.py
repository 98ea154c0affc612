"""Export to NDJSON, then prune by time: old events leave whole, newer ones stay searchable."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import orjson
from fhir.resources.R4B.auditevent import AuditEvent
from sqlalchemy import func, select

from sharedcare.audit import (
    AuditRecord,
    AuditWriter,
    count_events,
    export_ndjson,
    prune,
    request_id_of,
)
from sharedcare.audit.schema import audit_event_patients, audit_events
from sharedcare.audit.trail import AuditTrail
from sharedcare.store.db import Database
from sharedcare.store.repository import Store

Make = Callable[..., AuditRecord]


async def _rows_for(db: Database, ids: list[str]) -> int:
    """Rows left in the trail's tables for the events ``ids``."""
    async with db.read() as conn:
        events = (await conn.execute(select(func.count()).where(audit_events.c.id.in_(ids)))).scalar_one()
        people = (
            await conn.execute(select(func.count()).where(audit_event_patients.c.event_id.in_(ids)))
        ).scalar_one()
    return int(events) + int(people)


async def test_export_then_prune_old_events(
    writer: AuditWriter, store: Store, trail: AuditTrail, make_record: Make
) -> None:
    db = store.db
    patient = await store.create(store.prepare("Patient", {"resourceType": "Patient", "gender": "female"}))
    # Some events name several people: their extra rows go with them.
    old_ids = await asyncio.gather(
        *(writer.record(make_record(request_id=f"old-{i}", other_patients=("Patient/p9",))) for i in range(30))
    )
    await asyncio.sleep(0.02)
    cutoff = datetime.now(UTC)
    await asyncio.sleep(0.02)
    new_ids = await asyncio.gather(*(writer.record(make_record(request_id=f"new-{i}")) for i in range(5)))

    out = io.BytesIO()
    exported = await export_ndjson(db, None, cutoff, out, page=7)  # pages of 7: keyset paging
    lines = out.getvalue().splitlines()
    assert exported == len(lines) == 30 == await count_events(db, until=cutoff)
    events = [orjson.loads(line) for line in lines]
    for event in events:
        AuditEvent.model_validate(event)
    assert sorted(request_id_of(e) or "" for e in events) == sorted(f"old-{i}" for i in range(30))
    assert sorted(e["id"] for e in events) == sorted(old_ids)
    stamps = [e["meta"]["lastUpdated"] for e in events]
    assert stamps == sorted(stamps)  # oldest first

    ticks: list[int] = []
    assert await prune(db, cutoff, chunk=8, progress=ticks.append) == 30
    assert ticks == [8, 8, 8, 6]
    assert await _rows_for(db, list(old_ids)) == 0  # gone, with the further people they named
    assert await count_events(db) == 5
    assert orjson.loads(await trail.search([("patient", "Patient/p9")])).get("entry") is None
    # The newer events are still whole and searchable; other resource types are untouched.
    bundle = orjson.loads(await trail.search([("patient", "Patient/p1")]))
    assert sorted(e["resource"]["id"] for e in bundle["entry"]) == sorted(new_ids)
    assert (await store.read("Patient", patient.id)).version == 1
    assert await prune(db, cutoff) == 0  # idempotent


async def test_export_window_is_half_open(writer: AuditWriter, db: Database, make_record: Make) -> None:
    # Events a millisecond apart (AuditEvent.recorded has millisecond precision, and three
    # records in a row can commit within one).
    start = datetime.now(UTC)
    ids = [
        await writer.record(make_record(request_id=f"w-{i}", recorded=start + timedelta(milliseconds=i)))
        for i in range(3)
    ]
    async with db.read() as conn:
        stamps = dict((await conn.execute(select(audit_events.c.id, audit_events.c.recorded))).all())
    middle = stamps[ids[1]].replace(tzinfo=UTC)
    out = io.BytesIO()
    assert await export_ndjson(db, middle, middle + timedelta(microseconds=1), out) == 1
    assert orjson.loads(out.getvalue())["id"] == ids[1]
    out = io.BytesIO()
    assert await export_ndjson(db, middle, None, out) == 2  # since is inclusive, until exclusive
