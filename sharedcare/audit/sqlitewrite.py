"""Group commit of AuditEvents on SQLite without SQLAlchemy's per-row work.

Writes exactly the rows :meth:`Store.create_many_in` writes (``resources``,
``resource_versions``, ``change_log`` and the ``idx_*`` tables), as one ``executemany`` per
table of plain tuples through :meth:`AsyncConnection.exec_driver_sql`: one hop to
aiosqlite's thread per table, no parameter dicts, no ``RETURNING``. Values go through the
columns' own bind processors, so they are stored exactly as the store stores them.

``rid`` values are assigned here (``max(rid) + 1 ...``): on SQLite every write runs under
the database's single writer lock (:meth:`Database.write`), so nobody else can take them,
and that is what SQLite's ``INTEGER PRIMARY KEY`` would have assigned anyway.

``tests/audit/test_sqlitewrite.py`` writes the same events both ways and compares every
table, as ``test_pgwrite.py`` does for PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from sqlalchemy import Table
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.audit.pgwrite import AUDIT_TYPE, stamp
from sharedcare.store.repository import Prepared, now_utc
from sharedcare.store.schema import INDEX_TABLES, change_log, resource_versions, resources

__all__ = ["insert_events_sqlite"]

_RESOURCE_COLS = ("rid", "type", "id", "version", "last_updated", "deleted", "body")
_VERSION_COLS = ("rid", "version", "type", "id", "last_updated", "method", "deleted", "body")
_CHANGE_COLS = ("ts", "type", "id", "version", "op", "body")
_ROWS_ATTR = {
    "token": "tokens",
    "string": "strings",
    "reference": "references",
    "date": "dates",
    "uri": "uris",
}


class _Statement:
    """An INSERT of plain tuples, with the columns' bind processors applied."""

    def __init__(self, table: Table, columns: tuple[str, ...], dialect: Dialect):
        self.sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
        procs: list[Callable[[Any], Any] | None] = [
            table.c[c].type.bind_processor(dialect) for c in columns
        ]
        self.procs = procs
        self.plain = all(p is None for p in procs)

    def rows(self, values: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        if self.plain:
            return values
        procs = self.procs
        return [
            tuple(v if p is None or v is None else p(v) for p, v in zip(procs, row, strict=True))
            for row in values
        ]


_cache: dict[int, dict[str, _Statement]] = {}


def _statements(dialect: Dialect) -> dict[str, _Statement]:
    found = _cache.get(id(dialect))
    if found is None:
        found = {
            "resources": _Statement(resources, _RESOURCE_COLS, dialect),
            "versions": _Statement(resource_versions, _VERSION_COLS, dialect),
            "change_log": _Statement(change_log, _CHANGE_COLS, dialect),
        }
        for kind, table in INDEX_TABLES.items():
            found[kind] = _Statement(table, tuple(c.name for c in table.columns), dialect)
        _cache[id(dialect)] = found
    return found


async def insert_events_sqlite(conn: AsyncConnection, items: list[tuple[Prepared, str]]) -> int:
    """Insert AuditEvents (version 1, ids given) inside ``conn``'s transaction; return how many."""
    if not items:
        return 0
    statements = _statements(conn.dialect)
    ts: datetime = now_utc()
    first = (await conn.exec_driver_sql("SELECT COALESCE(MAX(rid), 0) FROM resources")).scalar_one()
    res: list[tuple[Any, ...]] = []
    ver: list[tuple[Any, ...]] = []
    log: list[tuple[Any, ...]] = []
    index: dict[str, list[tuple[Any, ...]]] = {kind: [] for kind in INDEX_TABLES}
    for n, (prepared, rid) in enumerate(items, start=int(first) + 1):
        if prepared.type != AUDIT_TYPE:
            raise ValueError(f"insert_events_sqlite writes AuditEvents only, not {prepared.type}")
        body = stamp(prepared.resource, rid, ts)
        res.append((n, AUDIT_TYPE, rid, 1, ts, False, body))
        ver.append((n, 1, AUDIT_TYPE, rid, ts, "create", False, body))
        log.append((ts, AUDIT_TYPE, rid, 1, "create", body))
        for kind in INDEX_TABLES:
            for row in getattr(prepared.rows, _ROWS_ATTR[kind]):
                index[kind].append((n, AUDIT_TYPE, *row))
    for name, values in (
        ("resources", res),
        ("versions", ver),
        ("change_log", log),
        *index.items(),
    ):
        if values:
            stmt = statements[name]
            await conn.exec_driver_sql(stmt.sql, stmt.rows(values))
    return len(items)
