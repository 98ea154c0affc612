"""A durable, table-backed work queue with transactional enqueue (an outbox).

Producers call :func:`enqueue` inside the same transaction as their business write, so
an item exists if and only if the write committed. Workers :func:`claim` ready items
under a lease (``FOR UPDATE SKIP LOCKED`` on PostgreSQL, so claimers never wait on each
other; the single writer on SQLite), then :func:`complete` or :func:`fail` them.
Delivery is at-least-once: an item whose lease expires (its worker died) is claimed
again, so handlers must be idempotent; ``key`` makes enqueueing idempotent too.

Items sharing a ``partition`` are handed out strictly in enqueue order, one at a time:
a later item is not claimable while an earlier one is unfinished (messaging order
between one sender and one recipient, issue 7). Only a partition's head is ever
``ready``; the items behind it wait in state ``waiting`` and the transaction that finishes
the head (done or dead) promotes the next one. So a partition stuck behind a recipient
that is down costs claims nothing, however long its backlog grows. Enqueue and promotion
of one partition are serialised by a transaction-scoped advisory lock on PostgreSQL (the
single writer does it on SQLite).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from sqlalchemy import DateTime, and_, func, or_, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import dialect as _sqlite_dialect_class
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.queue.schema import queue_items
from sharedcare.store.db import Database
from sharedcare.store.repository import now_utc

READY, LEASED, DONE, DEAD, WAITING = "ready", "leased", "done", "dead", "waiting"
UNFINISHED = (READY, LEASED, WAITING)


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
    state = READY
    if partition is not None:
        await _lock_partitions(conn, queue, [partition])
        if await _has_unfinished(conn, queue, partition):
            state = WAITING  # behind the partition's head; promoted when the head finishes
    values = {
        "queue": queue,
        "key": key,
        "partition": partition,
        "payload": orjson.dumps(payload),
        "state": state,
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


async def enqueue_many(
    conn: AsyncConnection, queue: str, items: list[tuple[dict[str, Any], str | None]]
) -> None:
    """Add ``(payload, partition)`` items in the caller's transaction, in list order.

    The batch form of :func:`enqueue` (without idempotency keys): a few statements however
    many items, for producers that group-commit (messaging's ``$process-message``).
    """
    if not items:
        return
    ts = now_utc()
    partitions = sorted({p for _payload, p in items if p is not None})
    busy: set[str] = set()
    if partitions:
        await _lock_partitions(conn, queue, partitions)
        q = queue_items.c
        rows = await conn.execute(
            select(q.partition)
            .where(q.queue == queue, q.partition.in_(partitions), q.state.in_(UNFINISHED))
            .group_by(q.partition)
        )
        busy = {r.partition for r in rows}
    values = []
    for payload, partition in items:
        state = READY
        if partition is not None:
            state = WAITING if partition in busy else READY
            busy.add(partition)  # the next item of this partition waits behind this one
        values.append(
            {
                "queue": queue, "key": None, "partition": partition, "payload": orjson.dumps(payload),
                "state": state, "attempts": 0, "available_at": ts, "created_at": ts, "updated_at": ts,
            }
        )  # fmt: skip
    await conn.execute(queue_items.insert(), values)


def _claimable(queue: str, now: datetime) -> Any:
    # Partition order needs no check here: only a partition's head is ever ready or leased.
    q = queue_items.c
    return and_(
        q.queue == queue,
        or_(
            and_(q.state == READY, q.available_at <= now),
            and_(q.state == LEASED, q.leased_until < now),  # its worker died: take it over
        ),
    )


async def _lock_partitions(conn: AsyncConnection, queue: str, partitions: list[str]) -> None:
    """Serialise enqueue and promotion per partition (PostgreSQL; SQLite has one writer)."""
    if conn.dialect.name != "postgresql" or not partitions:
        return
    keys = sorted({f"{queue}\x1f{p}" for p in partitions})  # sorted: no lock-order deadlocks
    await conn.execute(
        text(
            "SELECT pg_advisory_xact_lock(hashtext(k)) FROM unnest(CAST(:keys AS text[])) AS k ORDER BY k"
        ),
        {"keys": keys},
    )


async def _has_unfinished(conn: AsyncConnection, queue: str, partition: str) -> bool:
    q = queue_items.c
    found = await conn.execute(
        select(q.id)
        .where(q.queue == queue, q.partition == partition, q.state.in_(UNFINISHED))
        .limit(1)
    )
    return found.first() is not None


async def _promote(conn: AsyncConnection, queue: str, partitions: list[str], now: datetime) -> None:
    """Make the oldest waiting item of each partition that has no head left ready.

    One statement for all the partitions (this runs under their locks, so it must be short):
    each partition's oldest unfinished item is promoted if it is waiting.
    """
    if not partitions:
        return
    q = queue_items.c
    await _lock_partitions(conn, queue, partitions)
    oldest = (
        select(func.min(q.id))
        .where(q.queue == queue, q.partition.in_(sorted(set(partitions))), q.state.in_(UNFINISHED))
        .group_by(q.partition)
    )
    await conn.execute(
        update(queue_items)
        .where(q.id.in_(oldest.scalar_subquery()), q.state == WAITING)
        .values(state=READY, available_at=now, updated_at=now)
    )


_sqlite_dialect = _sqlite_dialect_class()

# A read that finds nothing to claim, on SQLite's inline reader (Database.inline): the same
# condition as _claimable, with instants in the form SQLAlchemy stores them.
_SQLITE_CLAIMABLE = (
    "SELECT 1 FROM queue_items WHERE queue = ? AND ((state = ? AND available_at <= ?) "
    "OR (state = ? AND leased_until < ?)) LIMIT 1"
)
_SQLITE_INSTANT = DateTime().dialect_impl(_sqlite_dialect).bind_processor(_sqlite_dialect)


async def claimable(db: Database, queue: str, now: datetime | None = None) -> bool:
    """Whether ``queue`` has an item to claim now: a read, which takes no write lock.

    An idle worker polls several times a second in every hub process. Through a write
    transaction, each empty poll held SQLite's single write lock (and the event loop, for
    SQLAlchemy's work) while the hub's requests waited for their audit commits behind it.
    """
    now = now or now_utc()
    if db.inline is not None:
        at = _SQLITE_INSTANT(now)
        return bool(db.inline.fetch(_SQLITE_CLAIMABLE, (queue, READY, at, LEASED, at)))
    async with db.read() as conn:
        found = await conn.execute(select(queue_items.c.id).where(_claimable(queue, now)).limit(1))
        return found.first() is not None


async def claim(
    db: Database, queue: str, *, limit: int = 50, lease: float = 30.0, owner: str = ""
) -> list[Item]:
    """Lease up to ``limit`` ready items of ``queue``, oldest first.

    On SQLite the write transaction (which takes the file's single write lock) is only
    opened when :func:`claimable` finds something. PostgreSQL locks rows, not the database,
    and a read first would only add a round trip to every claim that finds work.
    """
    now = now_utc()
    if db.inline is not None and not await claimable(db, queue, now):
        return []
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
                Item(
                    r.id,
                    r.queue,
                    r.key,
                    r.partition,
                    orjson.loads(r.payload),
                    r.attempts,
                    r.created_at,
                )
                for r in rows
            ),
            key=lambda item: item.id,
        )

    return await db.write(work)


async def complete(db: Database, ids: list[int]) -> None:
    """Mark items done (kept for audit and idempotency until pruned)."""
    if not ids:
        return
    await db.write(lambda conn: complete_in(conn, ids))


async def complete_in(conn: AsyncConnection, ids: list[int]) -> None:
    """Mark items done inside the caller's transaction (with the business write it finishes)."""
    if not ids:
        return
    now = now_utc()
    q = queue_items.c
    rows = (
        await conn.execute(
            update(queue_items)
            .where(q.id.in_(ids))
            .values(state=DONE, leased_until=None, updated_at=now)
            .returning(q.queue, q.partition)
        )
    ).all()
    by_queue: dict[str, list[str]] = {}
    for row in rows:
        if row.partition is not None:
            by_queue.setdefault(row.queue, []).append(row.partition)
    for queue, partitions in by_queue.items():
        await _promote(conn, queue, partitions, now)


async def release(db: Database, item: Item, delay: float, error: str | None = None) -> None:
    """Hand a claimed item back untried, to be claimed again after ``delay`` seconds.

    Not an attempt: for a worker that chose not to run the item now (its target is known to
    be down or busy), so attempts and expiry keep counting real tries only.
    """
    now = now_utc()

    async def work(conn: AsyncConnection) -> None:
        values: dict[str, Any] = {
            "state": READY,
            "attempts": queue_items.c.attempts - 1,
            "available_at": now + timedelta(seconds=delay),
            "leased_until": None,
            "updated_at": now,
        }
        if error is not None:
            values["last_error"] = error[:2000]
        await conn.execute(
            update(queue_items)
            .where(queue_items.c.id == item.id, queue_items.c.state == LEASED)
            .values(**values)
        )

    await db.write(work)


async def fail(
    db: Database, item: Item, error: str, backoff: Backoff, *, permanent: bool = False
) -> str:
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
        if dead and item.partition is not None:
            await _promote(conn, item.queue, [item.partition], now)

    await db.write(work)
    return str(values["state"])


async def redrive(db: Database, item_id: int) -> bool:
    """Put a dead-lettered item back on its queue now; False if it is not dead."""
    now = now_utc()

    async def work(conn: AsyncConnection) -> bool:
        q = queue_items.c
        row = (
            await conn.execute(select(q.queue, q.partition).where(q.id == item_id, q.state == DEAD))
        ).first()
        if row is None:
            return False
        state = READY
        if row.partition is not None:
            await _lock_partitions(conn, row.queue, [row.partition])
            if await _has_unfinished(conn, row.queue, row.partition):
                state = WAITING  # goes next: it is older than everything waiting there
        result = await conn.execute(
            update(queue_items)
            .where(q.id == item_id, q.state == DEAD)
            .values(state=state, available_at=now, attempts=0, updated_at=now)
        )
        return bool(result.rowcount)

    return await db.write(work)


def keep_done_seconds(hours: float) -> float | None:
    """``SHAREDCARE_QUEUE_KEEP_DONE_HOURS`` as the seconds :func:`prune_done` takes (0: never)."""
    return hours * 3600.0 if hours > 0 else None


PRUNE_MOST = 20_000  # items one prune_done call deletes at most


async def prune_done(
    db: Database, queue: str, keep_seconds: float, *, chunk: int = 1000, most: int = PRUNE_MOST
) -> int:
    """Delete ``queue``'s finished (done) items older than ``keep_seconds``; returns how many.

    Done items are kept a while so that an idempotency key seen recently still dedupes and
    an operator can look an item up; after that they are only weight in every claim's
    index. Deleted in chunks of ``chunk`` (each its own short transaction, so the SQLite
    writer is never held long), at most about ``most`` per call: a caller that gets
    ``most`` or more back should call again soon. Dead-lettered items are never pruned:
    they wait for an operator.
    """
    before = now_utc() - timedelta(seconds=keep_seconds)
    q = queue_items.c
    # In the claim index's order (queue, state, available_at, id), so a chunk is read off
    # the index and stops at the limit however many old items there are; updated_at is
    # when the item finished.
    oldest = (
        select(q.id)
        .where(q.queue == queue, q.state == DONE, q.available_at < before, q.updated_at < before)
        .order_by(q.available_at, q.id)
        .limit(chunk)
    )

    async def work(conn: AsyncConnection) -> tuple[int, int]:
        ids = [row[0] for row in (await conn.execute(oldest)).all()]
        if not ids:
            return 0, 0
        gone = await conn.execute(queue_items.delete().where(q.id.in_(ids), q.state == DONE))
        return len(ids), int(gone.rowcount or 0)  # another process may have taken some

    deleted = 0
    for _ in range(max(1, most // chunk)):
        found, gone = await db.write(work)
        deleted += gone
        if found < chunk:
            break
    return deleted


async def sizes(db: Database) -> dict[tuple[str, str], int]:
    """Item counts by (queue, state), for metrics and the operator's view."""
    q = queue_items.c
    async with db.read() as conn:
        rows = (
            await conn.execute(
                select(q.queue, q.state, func.count())
                .where(q.state != DONE)
                .group_by(q.queue, q.state)
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
