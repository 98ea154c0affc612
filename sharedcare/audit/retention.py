"""Retention of the audit trail: export to NDJSON for keeping off the platform, then prune.

"By time" is ``audit_events.recorded`` (``AuditEvent.recorded``): both functions walk
``ix_audit_events_recorded`` (recorded, seq) in keyset order, one bounded page or chunk at a
time, and never hold a long transaction (on SQLite a prune chunk holds the single writer for
milliseconds, so live audit writes interleave with it).

Pruning deletes physically, from ``audit_events`` and ``audit_event_patients``. Export first:
what is pruned is gone from the database.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, BinaryIO

from sqlalchemy import and_, delete, func, or_, select, true
from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.audit.schema import audit_event_patients, audit_events
from sharedcare.store.db import Database

__all__ = ["count_events", "export_ndjson", "naive_utc", "prune"]

Progress = Callable[[int], None]


def naive_utc(ts: datetime) -> datetime:
    """The store's form of an instant: naive UTC (a naive argument is taken as UTC already)."""
    return ts.astimezone(UTC).replace(tzinfo=None) if ts.tzinfo is not None else ts


def _window(since: datetime | None, until: datetime | None) -> list[Any]:
    e = audit_events.c
    conds: list[Any] = []
    if since is not None:
        conds.append(e.recorded >= naive_utc(since))
    if until is not None:
        conds.append(e.recorded < naive_utc(until))
    return conds


async def count_events(db: Database, since: datetime | None = None, until: datetime | None = None) -> int:
    """AuditEvents recorded in ``[since, until)`` (for progress bars and dry runs)."""
    query = select(func.count()).select_from(audit_events).where(*_window(since, until))
    async with db.read() as conn:
        return int((await conn.execute(query)).scalar_one())


async def export_ndjson(
    db: Database,
    since: datetime | None,
    until: datetime | None,
    out: BinaryIO,
    *,
    page: int = 1000,
    progress: Progress | None = None,
) -> int:
    """Write every AuditEvent recorded in ``[since, until)`` to ``out``, one per line.

    Oldest first; each line is the event exactly as served (hl7.org/fhir/R4/nd-json.html).
    Returns how many were written.
    """
    e = audit_events.c
    base = _window(since, until)
    after: tuple[datetime, int] | None = None
    written = 0
    while True:
        conds = list(base)
        if after is not None:
            # Not a row value: the instant must be bound as the column's type (SQLite text).
            conds.append(or_(e.recorded > after[0], and_(e.recorded == after[0], e.seq > after[1])))
        query = (
            select(e.seq, e.recorded, e.body)
            .where(and_(true(), *conds))
            .order_by(e.recorded, e.seq)
            .limit(page)
        )
        async with db.read() as conn:
            rows = (await conn.execute(query)).all()
        if not rows:
            return written
        chunk = b"".join(bytes(row.body) + b"\n" for row in rows)
        await asyncio.to_thread(out.write, chunk)  # a slow disk must not stall the event loop
        written += len(rows)
        after = (rows[-1].recorded, rows[-1].seq)
        if progress is not None:
            progress(len(rows))


async def prune(
    db: Database, before: datetime, *, chunk: int = 1000, progress: Progress | None = None
) -> int:
    """Physically delete every AuditEvent recorded before ``before``; return how many.

    Export first (:func:`export_ndjson`): what is pruned is gone from the database.
    """
    e = audit_events.c
    cutoff = naive_utc(before)

    async def one_chunk(conn: AsyncConnection) -> int:
        rows = (
            await conn.execute(
                select(e.seq, e.id).where(e.recorded < cutoff).order_by(e.recorded, e.seq).limit(chunk)
            )
        ).all()
        if not rows:
            return 0
        ids = [row.id for row in rows]
        await conn.execute(delete(audit_event_patients).where(audit_event_patients.c.event_id.in_(ids)))
        await conn.execute(delete(audit_events).where(e.seq.in_([row.seq for row in rows])))
        return len(rows)

    total = 0
    while True:
        n = await db.write(one_chunk)
        if n == 0:
            return total
        total += n
        if progress is not None:
            progress(n)
