"""Per-client rate limiting: one token bucket per client, shared by all hub processes.

The bucket lives in ``iam_rate`` (tokens left, last refill time). Taking from it costs a
database write, so a process takes a small *lease* of tokens at once (``burst / 20``, at
least 1) and spends it locally for up to ``LEASE_SECONDS``; unspent leased tokens lapse.
The shared bucket therefore never hands out more than ``rate`` per second plus ``burst``
across all processes, while a busy client costs one write per lease, not per request.

The update is atomic on both databases: on PostgreSQL one ``INSERT ... ON CONFLICT DO
UPDATE ... RETURNING`` (the row lock serialises processes); on SQLite a read and a write
inside the single writer transaction (``BEGIN IMMEDIATE`` locks the file for all processes).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import select, text

from sharedcare.iam.schema import iam_rate
from sharedcare.iam.sql import insert_for
from sharedcare.store.db import Database

LEASE_SECONDS = 1.0

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

    async def take(self, client_id: str) -> float | None:
        """Spend one token: None when allowed, else the seconds to wait before retrying."""
        if self.rate <= 0:
            return None
        if self._spend(client_id, self.clock()):
            return None
        lock = self._locks.get(client_id)
        if lock is None:
            lock = self._locks[client_id] = asyncio.Lock()
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
