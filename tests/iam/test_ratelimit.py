"""Per-client token buckets shared across processes, and the 429 a client sees."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from sharedcare.iam.ratelimit import RateLimiter
from sharedcare.settings import Settings
from sharedcare.store.db import Database


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
