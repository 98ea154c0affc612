"""Per-client token buckets shared across processes, and the 429 a client sees."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import make_url

from sharedcare.iam.ratelimit import RateLimiter
from sharedcare.settings import Settings
from sharedcare.store.db import Database, sqlite_path


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"rate_limit_per_second": 2.0, "rate_limit_burst": 4})


async def test_over_the_limit_is_429_with_retry_after(
    app: Any, anon_client: httpx.AsyncClient, register_system: Any, get_token: Any, es_key: Any
) -> None:
    # The bucket's clock stands still until the test moves it: on a slow machine the
    # requests below could otherwise take long enough for a token to come back.
    now = [time.time()]
    app.state.iam.limiter.clock = lambda: now[0]
    await register_system("greedy", es_key, "system/*.read")
    token = await get_token(anon_client, "greedy", es_key, "system/*.read")  # spends one token
    headers = {"Authorization": f"Bearer {token}"}
    statuses = [(await anon_client.get("/fhir/Organization", headers=headers)).status_code for _ in range(4)]
    assert statuses[:3] == [200, 200, 200] and statuses[3] == 429
    refused = await anon_client.get("/fhir/Organization", headers=headers)
    assert refused.status_code == 429
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["issue"][0]["code"] == "throttled"
    now[0] += 0.6  # 2 tokens/s: one is back
    assert (await anon_client.get("/fhir/Organization", headers=headers)).status_code == 200


@pytest.mark.parametrize("burst", [10, 100])
async def test_processes_share_one_bucket(app: Any, settings: Settings, burst: int) -> None:
    """Two limiters on two engines (as two hub processes would have) never hand out more than the bucket."""
    other = Database(settings.database)
    try:
        limiters = [RateLimiter(db, rate=0.001, burst=burst) for db in (app.state.db, other)]
        results = await asyncio.gather(*(limiters[i % 2].take("shared") for i in range(burst + 20)))
        assert sum(r is None for r in results) == burst
        wait = await limiters[0].take("shared")
        assert wait is not None and wait > 100  # at 0.001 tokens/s the next one is far off
        assert await limiters[1].take("someone-else") is None  # buckets are per client
    finally:
        await other.close()


@asynccontextmanager
async def _bucket_locked(db: Database, client_id: str) -> AsyncIterator[None]:
    """Another process's write holding the client's bucket: a refill now waits for it."""
    if db.dialect == "sqlite":
        holder = sqlite3.connect(sqlite_path(db.url), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        return
    conn = await asyncpg.connect(make_url(db.url).set(drivername="postgresql").render_as_string(False))
    try:
        async with conn.transaction():
            await conn.execute("SELECT 1 FROM iam_rate WHERE client_id = $1 FOR UPDATE", client_id)
            yield
    finally:
        await conn.close()


@pytest.mark.parametrize(
    ("runs_out", "spent", "later_s"),
    [("tokens", 7, 0.0), ("time", 1, 0.8)],  # 2 of 10 tokens left; 0.2 s of 1 s left
)
async def test_a_busy_client_never_waits_for_its_next_lease(
    app: Any, runs_out: str, spent: int, later_s: float
) -> None:
    """The next lease is taken while the current one still has tokens and time: requests
    that keep coming spend on, even while the bucket's row is held by another process's
    write."""
    now = [1_000.0]
    limiter = RateLimiter(app.state.db, rate=100.0, burst=200, clock=lambda: now[0])  # leases of 10
    assert await limiter.take("busy") is None  # the first lease: this one waits for the write
    now[0] += later_s
    for _ in range(spent):  # the lease is nearly over: the next one is on its way
        assert await limiter.take("busy") is None
    for _ in range(200):  # it lands
        await asyncio.sleep(0.01)
        if not limiter._topping_up:
            break
    left = 10 - 1 - spent
    now[0] += 0.5  # within the new lease (and, in the "time" case, past the first one)
    async with _bucket_locked(app.state.db, "busy"):
        started = time.monotonic()
        async with asyncio.timeout(3):  # a refill would wait for the row as long as it is held
            results = [await limiter.take("busy") for _ in range(left + 10)]
        assert results == [None] * (left + 10)
        assert time.monotonic() - started < 1.0  # none of them waited for the locked row
