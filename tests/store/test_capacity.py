"""A hub whose database connections are all in use says so promptly: 503 with Retry-After."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import httpx
import pytest

from sharedcare.settings import Settings


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"db_pool_timeout_seconds": 0.3})


async def _hold_every_connection(engine: Any, stack: contextlib.AsyncExitStack) -> int:
    pool = engine.sync_engine.pool
    room = pool.size() + max(0, getattr(pool, "_max_overflow", 0))
    for _ in range(room):
        await stack.enter_async_context(engine.connect())
    return room


async def test_an_exhausted_pool_answers_503_within_the_pool_timeout(
    app: Any, client: httpx.AsyncClient
) -> None:
    db = app.state.db
    async with contextlib.AsyncExitStack() as stack:
        held = await _hold_every_connection(db.engine, stack)
        assert held >= 1
        started = time.monotonic()
        async with asyncio.timeout(10):  # SQLAlchemy's own default would hold it for 30 s
            r = await client.get("/fhir/Patient", params={"family": "Smith"})
        waited = time.monotonic() - started
    assert r.status_code == 503, r.text
    assert r.headers["Retry-After"] == "1"
    assert r.json()["issue"][0]["code"] == "transient"
    assert "Retry shortly" in r.json()["issue"][0]["diagnostics"]
    assert waited >= 0.3  # it did wait for a connection to come free first
    r = await client.get("/fhir/Patient", params={"family": "Smith"})
    assert r.status_code == 200  # connections back: served again
