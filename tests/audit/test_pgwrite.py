"""The writer's fast paths (pgwrite, sqlitewrite) write exactly the rows Store.create_many_in writes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from sqlalchemy import select

from sharedcare.audit import AuditRecord, AuditWriter
from sharedcare.audit.pgwrite import insert_events
from sharedcare.audit.sqlitewrite import insert_events_sqlite
from sharedcare.store.db import Database
from sharedcare.store.repository import Store
from sharedcare.store.schema import INDEX_TABLES, change_log, resource_versions, resources


async def _rows(db: Database, ids: list[str]) -> dict[str, Any]:
    """Every row the store holds for ``ids``, in a form free of keys and timestamps."""
    out: dict[str, Any] = {}
    async with db.read() as conn:
        keys = dict((await conn.execute(select(resources.c.rid, resources.c.id).where(resources.c.id.in_(ids)))).all())
        order = {rid: ids.index(i) for rid, i in keys.items()}

        def body(raw: bytes) -> Any:
            doc = orjson.loads(raw)
            return {**doc, "id": "-", "meta": {**doc["meta"], "lastUpdated": "-"}}

        res = (await conn.execute(select(resources).where(resources.c.rid.in_(keys)))).all()
        out["resources"] = sorted((order[r.rid], r.type, r.version, r.deleted, body(r.body)) for r in res)
        ver = (await conn.execute(select(resource_versions).where(resource_versions.c.rid.in_(keys)))).all()
        out["versions"] = sorted(
            (order[r.rid], r.version, r.type, r.method, r.deleted, body(r.body)) for r in ver
        )
        log = (await conn.execute(select(change_log).where(change_log.c.id.in_(ids)).order_by(change_log.c.seq))).all()
        out["change_log"] = [(ids.index(r.id), r.type, r.version, r.op, body(r.body)) for r in log]
        for kind, table in INDEX_TABLES.items():
            rows = (await conn.execute(select(table).where(table.c.rid.in_(keys)))).all()
            out[kind] = sorted(
                tuple(repr(v) for k, v in r._mapping.items() if k != "rid") + (str(order[r.rid]),) for r in rows
            )
    return out


async def test_fast_insert_matches_the_store(
    backend: str, db: Database, store: Store, make_record: Callable[..., AuditRecord]
) -> None:
    """pgwrite on PostgreSQL, sqlitewrite on SQLite: the same rows as create_many_in."""
    fast = insert_events if backend == "postgresql" else insert_events_sqlite
    writer = AuditWriter(db, store)
    records = [
        make_record(),
        make_record(action="read", resource="providers/gp-1/Observation/o-1", providers=("gp-1",)),
        make_record(outcome=4, patient=None, user_id=None, user_name=None, organization=None, providers=()),
        make_record(organization_ref="Organization/org-1", user_name="Zoë Ångström"),
    ]
    prepared = [writer.prepare(r) for r in records]
    via_store = await db.write(lambda conn: store.create_many_in(conn, [(p, None) for p in prepared]))
    fast_ids = [f"fast-{i}" for i in range(len(prepared))]
    assert await db.write(lambda conn: fast(conn, list(zip(prepared, fast_ids, strict=True)))) == 4
    expected = await _rows(db, [s.id for s in via_store])
    assert await _rows(db, fast_ids) == expected
    assert all(expected[kind] for kind in ("resources", "versions", "change_log", "token", "reference"))
    # ...and the store reads and searches them like any other resource
    assert (await store.read("AuditEvent", "fast-3")).resource()["agent"][3]["who"]["reference"] == "Organization/org-1"


async def test_only_audit_events_go_this_way(backend: str, db: Database, store: Store) -> None:
    fast = insert_events if backend == "postgresql" else insert_events_sqlite
    patient = store.prepare("Patient", {"resourceType": "Patient"})
    with pytest.raises(ValueError, match="AuditEvents only"):
        await db.write(lambda conn: fast(conn, [(patient, "p-1")]))
