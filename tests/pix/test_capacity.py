"""A database with no connection free answers 503 with Retry-After, never a 500 (bench/pix.py
saw 500s when PostgreSQL ran out of connections under load)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import END_USER  # type: ignore[attr-defined]
from helpers import free_port  # type: ignore[import-not-found]
from sqlalchemy.util import greenlet_spawn

from sharedcare.fhir.errors import FHIRError
from sharedcare.pix.index import PatientIndex
from sharedcare.settings import Settings
from sharedcare.store.db import Database
from sharedcare.store.repository import Store

from .conftest import system_uri


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # A small pool to exhaust; registry entries cached past the test and no rate limit
    # (as bench/pix.py runs), so that only the index needs the database while it is held.
    return settings.model_copy(
        update={"db_pool_size": 2, "registry_cache_seconds": 60, "rate_limit_per_second": 0}
    )


async def _hold_every_connection(app: Any) -> list[Any]:
    """Check out connections until the pool has none left (its own overflow included)."""
    held: list[Any] = []
    while True:
        try:
            async with asyncio.timeout(2.0):  # a new connection: ~20 ms, more when slow
                held.append(await app.state.db.engine.raw_connection())
        except TimeoutError:
            return held


async def test_no_free_connection_is_503_with_retry_after(app: Any, make_system: Any) -> None:
    await make_system("cap-a")
    consumer = await make_system(
        "cap-portal", kind="consumer", scopes="system/Patient.rs", end_user=END_USER
    )
    query = {"sourceIdentifier": f"{system_uri('cap-a')}|nobody"}
    assert (await consumer.http.get("/fhir/Patient/$ihe-pix", params=query)).status_code == 404

    index: PatientIndex = app.state.pix
    await index.close()  # the idle lookup lease gives its connection back to the pool
    index.lease_wait = 0.3
    held = await _hold_every_connection(app)
    try:
        answer = await consumer.http.get("/fhir/Patient/$ihe-pix", params=query)
        assert answer.status_code == 503, answer.text
        assert answer.headers["Retry-After"] == "1"
        body = answer.json()
        assert body["resourceType"] == "OperationOutcome"
        assert "no connection free" in body["issue"][0]["diagnostics"]
    finally:
        for pooled in held:
            await greenlet_spawn(pooled.close)
    # Capacity back: the same query is answered again.
    assert (await consumer.http.get("/fhir/Patient/$ihe-pix", params=query)).status_code == 404


async def test_unreachable_database_is_503(backend: str) -> None:
    if backend != "postgresql":
        pytest.skip("SQLite is a file: there is no server to be unreachable")
    db = Database(f"postgresql+asyncpg://postgres@127.0.0.1:{free_port()}/nowhere", pool_size=2)
    index = PatientIndex(db, Store(db), keep_connections=True)
    try:
        for lookup in (
            index.find(nhs_number="9434765919"),
            index.find_link("https://fhir.example.org/x/Id/patient", "1"),
        ):
            with pytest.raises(FHIRError) as caught:
                await lookup
            assert caught.value.status == 503
            assert caught.value.headers == {"Retry-After": "1"}
    finally:
        await index.close()
        await db.close()
