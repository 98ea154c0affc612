"""One-statement group commit of AuditEvents on PostgreSQL.

Writes exactly the rows :meth:`Store.create_many_in` writes (``resources``,
``resource_versions``, ``change_log`` and the ``idx_*`` tables, in one transaction), but as
ONE statement of data-modifying CTEs fed by column arrays (``unnest``), sent straight
through asyncpg. ``create_many_in`` issues nine statements through SQLAlchemy's
executemany, which costs ~2.5 ms of CPU and ~4 ms of wall time per transaction on the
reference 2-core machine; this costs ~0.35 ms and ~1 ms (bench/audit.py), and that is the
difference between meeting issue 5's 2 ms p99 at 1,000 requests/s and missing it.

The rows must stay identical to the store's: ``tests/audit/test_pgwrite.py`` writes the
same events both ways and compares every table, so a change to the store's schema or
stamping that is not mirrored here fails the tests. SQLite keeps ``create_many_in``
(there every statement is a hop to aiosqlite's thread; see the report in bench/audit.py).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.store.repository import Prepared, instant, now_utc

__all__ = ["insert_events"]

AUDIT_TYPE = "AuditEvent"

# $1 ts; $2 ids, $3 bodies; then per index table: ids, then its value columns.
_SQL = """
WITH new AS (
  SELECT * FROM unnest($2::text[], $3::bytea[]) WITH ORDINALITY AS t(id, body, n)
), r AS (
  INSERT INTO resources (type, id, version, last_updated, deleted, body)
  SELECT 'AuditEvent', id, 1, $1, false, body FROM new ORDER BY n
  RETURNING rid, id
), v AS (
  INSERT INTO resource_versions (rid, version, type, id, last_updated, method, deleted, body)
  SELECT r.rid, 1, 'AuditEvent', new.id, $1, 'create', false, new.body
  FROM new JOIN r USING (id)
), c AS (
  INSERT INTO change_log (ts, type, id, version, op, body)
  SELECT $1, 'AuditEvent', id, 1, 'create', body FROM new ORDER BY n
), tok AS (
  INSERT INTO idx_token (rid, type, param, system, code)
  SELECT r.rid, 'AuditEvent', t.param, t.system, t.code
  FROM unnest($4::text[], $5::text[], $6::text[], $7::text[]) AS t(id, param, system, code)
  JOIN r USING (id)
), str AS (
  INSERT INTO idx_string (rid, type, param, norm, exact)
  SELECT r.rid, 'AuditEvent', t.param, t.norm, t.exact
  FROM unnest($8::text[], $9::text[], $10::text[], $11::text[]) AS t(id, param, norm, exact)
  JOIN r USING (id)
), ref AS (
  INSERT INTO idx_reference (rid, type, param, target_type, target_id, url)
  SELECT r.rid, 'AuditEvent', t.param, t.target_type, t.target_id, t.url
  FROM unnest($12::text[], $13::text[], $14::text[], $15::text[], $16::text[])
    AS t(id, param, target_type, target_id, url)
  JOIN r USING (id)
), dat AS (
  INSERT INTO idx_date (rid, type, param, low, high)
  SELECT r.rid, 'AuditEvent', t.param, t.low, t.high
  FROM unnest($17::text[], $18::text[], $19::timestamp[], $20::timestamp[]) AS t(id, param, low, high)
  JOIN r USING (id)
), uri AS (
  INSERT INTO idx_uri (rid, type, param, value)
  SELECT r.rid, 'AuditEvent', t.param, t.value
  FROM unnest($21::text[], $22::text[], $23::text[]) AS t(id, param, value)
  JOIN r USING (id)
)
SELECT count(*) FROM r
"""


def stamp(resource: dict[str, Any], rid: str, ts: datetime) -> bytes:
    """Version 1 of ``resource`` as the store serialises it (repository._stamp)."""
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = "1"
    meta["lastUpdated"] = instant(ts)
    out = {"resourceType": resource["resourceType"], "id": rid, "meta": meta}
    out.update((k, v) for k, v in resource.items() if k not in ("resourceType", "id", "meta"))
    return orjson.dumps(out)


def _columns(items: list[tuple[Prepared, str]], ts: datetime) -> list[Any]:
    ids: list[str] = []
    bodies: list[bytes] = []
    tok: tuple[list[Any], ...] = ([], [], [], [])
    st: tuple[list[Any], ...] = ([], [], [], [])
    ref: tuple[list[Any], ...] = ([], [], [], [], [])
    dat: tuple[list[Any], ...] = ([], [], [], [])
    uri: tuple[list[Any], ...] = ([], [], [])
    for prepared, rid in items:
        if prepared.type != AUDIT_TYPE:
            raise ValueError(f"insert_events writes AuditEvents only, not {prepared.type}")
        ids.append(rid)
        bodies.append(stamp(prepared.resource, rid, ts))
        rows = prepared.rows
        for cols, table_rows in ((tok, rows.tokens), (st, rows.strings), (ref, rows.references),
                                 (dat, rows.dates), (uri, rows.uris)):
            for row in table_rows:
                cols[0].append(rid)
                for col, value in zip(cols[1:], row, strict=True):
                    col.append(value)
    return [ts, ids, bodies, *tok, *st, *ref, *dat, *uri]


async def insert_events(conn: AsyncConnection, items: list[tuple[Prepared, str]]) -> int:
    """Insert AuditEvents (version 1, ids given) inside ``conn``'s transaction; return how many."""
    if not items:
        return 0
    # Through SQLAlchemy (so it joins the transaction and errors are DBAPIErrors that
    # Database.write translates), but as one driver-level statement: asyncpg prepares and
    # caches it per connection, so a flush is one round trip and no per-row Python.
    result = await conn.exec_driver_sql(_SQL, tuple(_columns(items, now_utc())))
    return int(result.scalar_one())
