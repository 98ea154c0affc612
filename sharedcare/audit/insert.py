"""Insert a batch of audit rows: one statement for the whole batch.

PostgreSQL gets ONE statement for the whole batch, both tables in data-modifying CTEs fed by
column arrays (``unnest``), sent straight to asyncpg, which prepares it once per connection.
:func:`insert_rows_autocommit` sends it on a bare driver connection with no transaction
around it: the statement is its own transaction, atomic and durable when it returns, so a
flush is ONE round trip (no BEGIN, no COMMIT). :func:`insert_rows` runs the same statement
inside a caller's transaction (a delivery that commits with its audit rows; an import).

SQLite gets one ``executemany`` of plain tuples per table, with values through the columns'
bind processors so that they are stored exactly as SQLAlchemy would store them:
:func:`insert_rows` inside a caller's transaction, and :func:`insert_rows_sqlite` as one
whole transaction on a plain ``sqlite3`` connection, for the writer's own thread (one hop
per flush; through SQLAlchemy and aiosqlite a write transaction is five hops and about
1.4 ms even when it does nothing, ``bench/audit.py``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from functools import cache
from typing import Any

from sqlalchemy.dialects.sqlite.aiosqlite import SQLiteDialect_aiosqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.audit.columns import EventRow
from sharedcare.audit.schema import audit_events

__all__ = ["insert_rows", "insert_rows_autocommit", "insert_rows_sqlite", "sqlite_values"]

_COLUMNS = (
    "id", "recorded", "patient", "user_id", "organization", "client_id", "subtype", "action",
    "outcome", "request_id", "agent_name", "agent_role", "agent", "entity", "body",
)
_N = len(_COLUMNS)
_PG_TYPES = (
    "text", "timestamp", "text", "text", "text", "text", "text", "text", "text", "text",
    "text", "text", "text", "text", "bytea",
)
_PG_SQL = (
    f"WITH e AS (INSERT INTO audit_events ({', '.join(_COLUMNS)}) "
    f"SELECT * FROM unnest({', '.join(f'${i + 1}::{t}[]' for i, t in enumerate(_PG_TYPES))})), "
    "p AS (INSERT INTO audit_event_patients (patient, event_id) "
    f"SELECT * FROM unnest(${_N + 1}::text[], ${_N + 2}::text[]) ON CONFLICT DO NOTHING) "
    "SELECT 1"
)
# One event naming one person (most flushes below ~1,000 records/s): a plain INSERT, which
# PostgreSQL runs in ~50 µs less than the array form (no unnest, no CTE).
_PG_ONE = (
    f"INSERT INTO audit_events ({', '.join(_COLUMNS)}) "
    f"VALUES ({', '.join(f'${i + 1}::{t}' for i, t in enumerate(_PG_TYPES))})"
)
_SQLITE_EVENTS = f"INSERT INTO audit_events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_SQLITE_PEOPLE = "INSERT OR IGNORE INTO audit_event_patients (patient, event_id) VALUES (?, ?)"


def _people(rows: Sequence[EventRow]) -> list[tuple[str, str]]:
    return [(p, row.id) for row in rows for p in row.other_patients]


def _pg_arguments(rows: Sequence[EventRow]) -> list[list[Any]]:
    columns = [list(c) for c in zip(*(row[:_N] for row in rows), strict=True)]
    people = _people(rows)
    return [*columns, [p for p, _ in people], [e for _, e in people]]


async def insert_rows_autocommit(driver: Any, rows: Sequence[EventRow]) -> int:
    """PostgreSQL: insert ``rows`` as one statement on an asyncpg connection in autocommit."""
    if len(rows) == 1 and not rows[0].other_patients:
        await driver.execute(_PG_ONE, *rows[0][:_N])
    elif rows:
        await driver.execute(_PG_SQL, *_pg_arguments(rows))
    return len(rows)


async def insert_rows(conn: AsyncConnection, rows: Sequence[EventRow]) -> int:
    """Insert ``rows`` (ids already assigned) in ``conn``'s transaction; return how many."""
    if not rows:
        return 0
    if conn.dialect.name == "postgresql":
        await conn.exec_driver_sql(_PG_SQL, tuple(_pg_arguments(rows)))
        return len(rows)
    values, people = sqlite_values(rows, conn.dialect)
    await conn.exec_driver_sql(_SQLITE_EVENTS, values)
    if people:
        await conn.exec_driver_sql(_SQLITE_PEOPLE, people)
    return len(rows)


@cache
def _sqlite_dialect() -> Dialect:
    return SQLiteDialect_aiosqlite()


def sqlite_values(
    rows: Sequence[EventRow], dialect: Dialect | None = None
) -> tuple[list[tuple[Any, ...]], list[tuple[str, str]]]:
    """The parameter tuples of both SQLite inserts (CPU only: build them outside the lock)."""
    dialect = dialect or _sqlite_dialect()
    # The dialect's own DateTime (the generic type has no processor): stored as the store stores it.
    recorded = audit_events.c.recorded.type.dialect_impl(dialect).bind_processor(dialect)
    values: list[tuple[Any, ...]] = [
        (r.id, recorded(r.recorded) if recorded else r.recorded, *r[2:_N]) for r in rows
    ]
    return values, _people(rows)


def insert_rows_sqlite(
    conn: sqlite3.Connection,
    values: list[tuple[Any, ...]],
    people: list[tuple[str, str]],
    *,
    begun: bool = False,
) -> None:
    """One whole write transaction on a driver-autocommit ``sqlite3`` connection (blocking).
    ``BEGIN IMMEDIATE`` waits out another writer (``busy_timeout``); with ``begun`` the
    caller has taken the write lock already."""
    if not begun:
        conn.execute("BEGIN IMMEDIATE")
    try:
        conn.executemany(_SQLITE_EVENTS, values)
        if people:
            conn.executemany(_SQLITE_PEOPLE, people)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise

