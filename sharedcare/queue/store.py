"""A durable, table-backed work queue with transactional enqueue (an outbox).

Producers call :func:`enqueue` inside the same transaction as their business write, so
an item exists if and only if the write committed. Workers :func:`claim` ready items
under a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so claimers never wait on each
other; the single writer on SQLite), then :func:`complete` or :func:`fail` them.
Delivery is at-least-once: an item whose lease expires (its worker died) is claimed
again, so handlers must be idempotent; ``key`` makes enqueueing idempotent too.

Items sharing a ``partition`` are handed out strictly in enqueue order, one at a time:
a later item is not claimable while an earlier one is unfinished (messaging order
between one sender and one recipient, issue 7).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.queue.schema import queue_items
from sharedcare.store.db import Database
from sharedcare.store.repository import now_utc

READY, LEASED, DONE, DEAD = "ready", "leased", "done", "dead"


@dataclass(frozen=True, slots=True)
class Item:
    """One claimed unit of work."""

    id: int
    queue: str
    key: str | None
    partition: str | None
    payload: dict[str, Any]
    attempts: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog's "full jitter")."""

    base: float = 1.0
    cap: float = 300.0
    max_attempts: int = 20
    expire_after: float | None = None  # seconds after enqueue; then dead-letter

    def delay(self, attempts: int, rng: random.Random | None = None) -> float:
        ceiling = min(self.cap, self.base * 2 ** max(0, attempts - 1))
        return (rng or random).uniform(ceiling / 2, ceiling)


async def enqueue(
    conn: AsyncConnection,
    queue: str,
    payload: dict[str, Any],
    *,
    key: str | None = None,
    partition: str | None = None,
    delay: float = 0.0,
) -> bool:
    """Add an item in the caller's transaction; False if ``key`` was already queued."""
    ts = now_utc()
    values = {
        "queue": queue,
        "key": key,
        "partition": partition,
        "payload": orjson.dumps(payload),
        "state": READY,
        "attempts": 0,
        "available_at": ts + timedelta(seconds=delay),
        "created_at": ts,
        "updated_at": ts,
    }
    insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = insert(queue_items).values(**values)
    if key is not None:
        statement = statement.on_conflict_do_nothing(index_elements=["queue", "key"])
    result = await conn.execute(statement)
    return bool(result.rowcount)


def _claimable(queue: str, now: datetime) -> Any:
    q = queue_items.c
    earlier = queue_items.alias("earlier")
    blocked = (
        select(earlier.c.id)
        .where(
            earlier.c.queue == q.queue,
            earlier.c.partition == q.partition,
            earlier.c.id < q.id,
            earlier.c.state.in_((READY, LEASED)),
        )
        .exists()
    )
    return and_(
        q.queue == queue,
        or_(
            and_(q.state == READY, q.available_at <= now),
            and_(q.state == LEASED, q.leased_until < now),  # its worker died: take it over
        ),
        or_(q.partition.is_(None), ~blocked),
    )


async def claim(
    db: Database, queue: str, *, limit: int = 50, lease: float = 30.0, owner: str = ""
) -> list[Item]:
    """Lease up to ``limit`` ready items of ``queue``, oldest first."""
    now = now_utc()
    q = queue_items.c
    candidates = select(q.id).where(_claimable(queue, now)).order_by(q.id).limit(limit)
    if db.dialect == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)

    async def work(conn: AsyncConnection) -> list[Item]:
        ids = [row.id for row in (await conn.execute(candidates)).all()]
        if not ids:
            return []
        rows = (
            await conn.execute(
                update(queue_items)
                .where(q.id.in_(ids))
                .values(
                    state=LEASED,
                    attempts=q.attempts + 1,
                    leased_until=now + timedelta(seconds=lease),
                    lease_owner=owner,
                    updated_at=now,
                )
                .returning(q.id, q.queue, q.key, q.partition, q.payload, q.attempts, q.created_at)
            )
        ).all()
        return sorted(
            (
                Item(r.id, r.queue, r.key, r.partition, orjson.loads(r.payload), r.attempts, r.created_at)
                for r in rows
            ),
            key=lambda item: item.id,
        )

    return await db.write(work)


async def complete(db: Database, ids: list[int]) -> None:
    """Mark items done (kept for audit and idempotency until pruned)."""
    if not ids:
        return
    now = now_utc()

    async def work(conn: AsyncConnection) -> None:
        await conn.execute(
            update(queue_items)
            .where(queue_items.c.id.in_(ids))
            .values(state=DONE, leased_until=None, updated_at=now)
        )

    await db.write(work)


async def fail(db: Database, item: Item, error: str, backoff: Backoff, *, permanent: bool = False) -> str:
    """Schedule a retry with backoff, or dead-letter the item; returns the new state."""
    now = now_utc()
    expired = backoff.expire_after is not None and now >= item.created_at + timedelta(
        seconds=backoff.expire_after
    )
    dead = permanent or expired or item.attempts >= backoff.max_attempts
    values: dict[str, Any] = {"last_error": error[:2000], "leased_until": None, "updated_at": now}
    if dead:
        values["state"] = DEAD
    else:
        values["state"] = READY
        values["available_at"] = now + timedelta(seconds=backoff.delay(item.attempts))

    async def work(conn: AsyncConnection) -> None:
        await conn.execute(update(queue_items).where(queue_items.c.id == item.id).values(**values))

    await db.write(work)
    return str(values["state"])


async def redrive(db: Database, item_id: int) -> bool:
    """Put a dead-lettered item back on its queue now; False if it is not dead."""
    now = now_utc()

    async def work(conn: AsyncConnection) -> bool:
        result = await conn.execute(
            update(queue_items)
            .where(queue_items.c.id == item_id, queue_items.c.state == DEAD)
            .values(state=READY, available_at=now, attempts=0, updated_at=now)
        )
        return bool(result.rowcount)

    return await db.write(work)


async def sizes(db: Database) -> dict[tuple[str, str], int]:
    """Item counts by (queue, state), for metrics and the operator's view."""
    q = queue_items.c
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(q.queue, q.state, func.count()).where(q.state != DONE).group_by(q.queue, q.state)
            )
        ).all()
    return {(r[0], r[1]): r[2] for r in rows}


async def get(db: Database, item_id: int) -> dict[str, Any] | None:
    """One item with its state and last error (operators' inspection)."""
    async with db.read() as conn:
        row = (await conn.execute(select(queue_items).where(queue_items.c.id == item_id))).first()
    if row is None:
        return None
    out = dict(row._mapping)
    out["payload"] = orjson.loads(out["payload"])
    return out
