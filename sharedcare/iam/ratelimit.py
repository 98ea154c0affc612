"""Per-client rate limiting: one token bucket per client, shared by all hub processes.

The bucket lives in ``iam_rate`` (tokens left, last refill time). Taking from it costs a
database write, so a process takes a small *lease* of tokens at once (``burst / 20``, at
least 1) and spends it locally for up to ``LEASE_SECONDS``; unspent leased tokens lapse.
The shared bucket therefore never hands out more than ``rate`` per second plus ``burst``
across all processes, while a busy client costs one write per lease, not per request.

A busy client's next lease is taken in the background once the current one has a quarter
of its tokens or of its time left (tokens still held carry over). Its requests then never
wait for that write: they did, all of them in the process, once a second, behind the SQLite
write lock (up to 18 ms of a federated query's internal round trip, bench/sync_query.py).
A request that finds no lease at all (a client's first, or after a pause) still waits.

The update is atomic on both databases: on PostgreSQL one ``INSERT ... ON CONFLICT DO
UPDATE ... RETURNING`` (the row lock serialises processes); on SQLite a read and a write
inside the single writer transaction (``BEGIN IMMEDIATE`` locks the file for all processes).
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections.abc import Callable
from typing import Any

import structlog
from sqlalchemy import select, text

from sharedcare.iam.schema import iam_rate
from sharedcare.iam.sql import insert_for
from sharedcare.store.db import Database

LEASE_SECONDS = 1.0
_SQLITE_BUCKET = "SELECT tokens, updated FROM iam_rate WHERE client_id = ?"
_SQLITE_TAKE = (
    "INSERT INTO iam_rate (client_id, tokens, updated, granted) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (client_id) DO UPDATE SET "
    "tokens = excluded.tokens, updated = excluded.updated, granted = excluded.granted"
)
TOP_UP_AT = 0.25  # a lease with this fraction of its tokens or of its time left is topped up
log = structlog.get_logger("sharedcare.iam")

# The new row (first request) carries the lease as ``granted`` and the start-up values;
# on conflict the bucket is refilled for the time elapsed, then the lease is taken out.
_AVAILABLE = (
    "LEAST(CAST(:burst AS DOUBLE PRECISION), iam_rate.tokens"
    " + GREATEST(0, EXCLUDED.updated - iam_rate.updated) * CAST(:rate AS DOUBLE PRECISION))"
)
_PG_TAKE = text(
    f"""
    INSERT INTO iam_rate (client_id, tokens, updated, granted)
    VALUES (:cid, :fresh_tokens, :now, :lease)
    ON CONFLICT (client_id) DO UPDATE SET
      granted = LEAST(EXCLUDED.granted, FLOOR({_AVAILABLE})),
      tokens = {_AVAILABLE} - LEAST(EXCLUDED.granted, FLOOR({_AVAILABLE})),
      updated = GREATEST(iam_rate.updated, EXCLUDED.updated)
    RETURNING granted, tokens
    """
)


class RateLimiter:
    """Token buckets per client id; ``rate`` 0 turns limiting off."""

    def __init__(
        self, db: Database, *, rate: float, burst: int, clock: Callable[[], float] = time.time
    ):
        self.db = db
        self.rate = rate
        self.burst = burst
        self.lease = max(1, burst // 20)
        self.clock = clock
        self._leases: dict[str, list[float]] = {}  # client -> [tokens left, valid until]
        self._blocked: dict[str, float] = {}  # client -> refused until
        self._locks: dict[str, asyncio.Lock] = {}
        self._topping_up: dict[str, asyncio.Future[None]] = {}

    async def take(self, client_id: str) -> float | None:
        """Spend one token: None when allowed, else the seconds to wait before retrying."""
        if self.rate <= 0:
            return None
        now = self.clock()
        if self._spend(client_id, now):
            self._top_up_soon(client_id, now)
            return None
        lock = self._lock(client_id)
        # One refill per client at a time in this process: concurrent requests then share
        # the lease instead of each taking (and wasting) one.
        async with lock:
            now = self.clock()
            if self._spend(client_id, now):
                return None
            blocked = self._blocked.get(client_id, 0.0)
            if now < blocked:  # refused a moment ago: no tokens can have arrived since
                return blocked - now
            granted, left = await self._take_shared(client_id, now)
            if granted >= 1:
                self._leases[client_id] = [granted - 1, now + LEASE_SECONDS]
                return None
            wait = max((1 - left) / self.rate, 0.001)
            self._blocked[client_id] = now + wait
            return wait

    def _lock(self, client_id: str) -> asyncio.Lock:
        lock = self._locks.get(client_id)
        if lock is None:
            lock = self._locks[client_id] = asyncio.Lock()
        return lock

    def _top_up_soon(self, client_id: str, now: float) -> None:
        """Take the next lease in the background once this one is nearly spent or nearly
        over, so that a busy client's requests do not wait for the database's write."""
        if client_id in self._topping_up or not self._nearly_over(self._leases[client_id], now):
            return
        task = asyncio.ensure_future(self._top_up(client_id))
        self._topping_up[client_id] = task
        task.add_done_callback(lambda done: self._topped_up(client_id, done))

    async def _top_up(self, client_id: str) -> None:
        async with self._lock(client_id):  # after a refill in progress, not beside it
            now = self.clock()
            held = self._leases.get(client_id)
            if held is None or now >= held[1] or not self._nearly_over(held, now):
                return  # lapsed (the next request refills it) or refilled meanwhile
            granted, _left = await self._take_shared(client_id, now)
            if granted >= 1:
                # Tokens still held carry over: each was taken from the shared bucket once.
                self._leases[client_id] = [held[0] + granted, now + LEASE_SECONDS]

    def _nearly_over(self, held: list[float], now: float) -> bool:
        return held[0] <= self.lease * TOP_UP_AT or held[1] - now <= LEASE_SECONDS * TOP_UP_AT

    def _topped_up(self, client_id: str, done: asyncio.Future[None]) -> None:
        self._topping_up.pop(client_id, None)
        if not done.cancelled() and done.exception() is not None:
            # The lease runs out as it would have; the next request then refills it itself.
            log.warning("rate limit lease top-up failed", client_id=client_id, error=repr(done.exception())[:300])

    def _spend(self, client_id: str, now: float) -> bool:
        held = self._leases.get(client_id)
        if held is not None and held[0] >= 1 and now < held[1]:
            held[0] -= 1
            return True
        return False

    async def _take_shared(self, client_id: str, now: float) -> tuple[int, float]:
        params = {
            "cid": client_id, "burst": float(self.burst), "rate": float(self.rate), "now": now,
            "lease": self.lease, "fresh_tokens": float(self.burst - self.lease),
        }
        if self.db.dialect == "postgresql":

            async def pg(conn: Any) -> tuple[int, float]:
                row = (await conn.execute(_PG_TAKE, params)).one()
                return int(row.granted), float(row.tokens)

            return await self.db.write(pg)

        if self.db.inline_writer is not None:
            return await self.db.inline_writer.write(lambda conn: self._take_sqlite(conn, client_id, now))

        async def sqlite(conn: Any) -> tuple[int, float]:
            row = (await conn.execute(select(iam_rate).where(iam_rate.c.client_id == client_id))).first()
            tokens = float(self.burst) if row is None else min(
                float(self.burst), row.tokens + max(0.0, now - row.updated) * self.rate
            )
            granted = min(self.lease, math.floor(tokens))
            values = {"tokens": tokens - granted, "updated": max(now, row.updated if row else now), "granted": granted}
            stmt = insert_for("sqlite", iam_rate).values(client_id=client_id, **values)
            await conn.execute(stmt.on_conflict_do_update(index_elements=[iam_rate.c.client_id], set_=values))
            return granted, tokens - granted

        return await self.db.write(sqlite)

    def _take_sqlite(self, conn: sqlite3.Connection, client_id: str, now: float) -> tuple[int, float]:
        """The SQLite update on the event loop's thread (Database.inline_writer): inside one
        write transaction, so no other process reads the bucket between the read and the write."""
        row = conn.execute(_SQLITE_BUCKET, (client_id,)).fetchone()
        tokens = float(self.burst) if row is None else min(float(self.burst), row[0] + max(0.0, now - row[1]) * self.rate)
        granted = min(self.lease, math.floor(tokens))
        updated = max(now, row[1]) if row is not None else now
        conn.execute(_SQLITE_TAKE, (client_id, tokens - granted, updated, granted))
        return granted, tokens - granted
