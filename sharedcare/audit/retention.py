"""Retention of the audit trail: export to NDJSON for keeping off the platform, then prune.

AuditEvents are ordinary resources of the regional store, written once and never updated,
so "by time" is the store's ``last_updated`` column: both functions walk
``ix_resources_type_last_updated`` (type, last_updated, rid) in keyset order, one bounded
page or chunk at a time, and never hold a long transaction (on SQLite a prune chunk holds
the single writer for milliseconds, so live audit writes interleave with it).

``last_updated`` is the commit time, a few milliseconds after ``AuditEvent.recorded``.

Pruning deletes physically, from ``resources``, ``resource_versions`` and every ``idx_*``
table. It leaves ``change_log`` alone: that is what object-storage shipping and
point-in-time recovery replay, and it carries every AuditEvent off the platform already.
A point-in-time restore therefore brings pruned events back; the next prune removes them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, BinaryIO

from sqlalchemy import and_, delete, func, select, tuple_
from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.store.db import Database
from sharedcare.store.schema import INDEX_TABLES, resource_versions, resources

__all__ = ["count_events", "export_ndjson", "naive_utc", "prune"]

AUDIT_TYPE = "AuditEvent"
Progress = Callable[[int], None]


def naive_utc(ts: datetime) -> datetime:
    """The store's form of an instant: naive UTC (a naive argument is taken as UTC already)."""
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo is not None else ts


def _window(since: datetime | None, until: datetime | None) -> list[Any]:
    r = resources.c
    conds: list[Any] = [r.type == AUDIT_TYPE]
    if since is not None:
        conds.append(r.last_updated >= naive_utc(since))
    if until is not None:
        conds.append(r.last_updated < naive_utc(until))
    return conds


async def count_events(db: Database, since: datetime | None = None, until: datetime | None = None) -> int:
    """AuditEvents last updated in ``[since, until)`` (for progress bars and dry runs)."""
    async with db.read() as conn:
        return int(
            (await conn.execute(select(func.count()).where(*_window(since, until)))).scalar_one()
        )


async def export_ndjson(
    db: Database,
    since: datetime | None,
    until: datetime | None,
    out: BinaryIO,
    *,
    page: int = 1000,
    progress: Progress | None = None,
) -> int:
    """Write every AuditEvent last updated in ``[since, until)`` to ``out``, one per line.

    Oldest first; each line is the stored resource exactly (hl7.org/fhir/R4/nd-json.html).
    Returns how many were written.
    """
    r = resources.c
    base = _window(since, until) + [r.deleted.is_(False)]
    after: tuple[datetime, int] | None = None
    written = 0
    while True:
        conds = list(base)
        if after is not None:
            conds.append(tuple_(r.last_updated, r.rid) > tuple_(*after))
        query = (
            select(r.rid, r.last_updated, r.body)
            .where(and_(*conds))
            .order_by(r.last_updated, r.rid)
            .limit(page)
        )
        async with db.read() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return written
        chunk = b"".join(bytes(row.body) + b"\n" for row in rows)
        await asyncio.to_thread(out.write, chunk)  # a slow disk must not stall the event loop
        written += len(rows)
        after = (rows[-1].last_updated, rows[-1].rid)
        if progress is not None:
            progress(len(rows))


async def prune(
    db: Database, before: datetime, *, chunk: int = 1000, progress: Progress | None = None
) -> int:
    """Physically delete every AuditEvent last updated before ``before``; return how many.

    Export first (:func:`export_ndjson`): what is pruned is gone from the database.
    """
    r = resources.c
    cutoff = naive_utc(before)

    async def one_chunk(conn: AsyncConnection) -> int:
        rids = (
            (
                await conn.execute(
                    select(r.rid)
                    .where(r.type == AUDIT_TYPE, r.last_updated < cutoff)
                    .order_by(r.last_updated, r.rid)
                    .limit(chunk)
                )
            )
            .scalars()
            .all()
        )
        if not rids:
            return 0
        for table in INDEX_TABLES.values():
            await conn.execute(delete(table).where(table.c.rid.in_(rids)))
        await conn.execute(delete(resource_versions).where(resource_versions.c.rid.in_(rids)))
        # type is re-checked so that a rid can never name another resource type's row
        await conn.execute(delete(resources).where(r.rid.in_(rids), r.type == AUDIT_TYPE))
        return len(rids)

    total = 0
    while True:
        n = await db.write(one_chunk)
        if n == 0:
            return total
        total += n
        if progress is not None:
            progress(n)
