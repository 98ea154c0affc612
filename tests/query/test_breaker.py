"""The circuit breaker's half-open trial: never lost, never spent on a request the hub made late."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from sharedcare.query.providers import ProviderClients


@pytest.fixture
async def silent_provider() -> AsyncIterator[str]:
    """A real socket that accepts requests and never answers them."""

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read()  # until the client hangs up
        writer.close()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/fhir/Observation?patient=Patient/1"
    finally:
        server.close()


async def _opened(silent_provider: str) -> ProviderClients:
    clients = ProviderClients(breaker_failures=1, breaker_open_seconds=10)
    first = await clients.get("p", silent_provider, 0.05)
    assert first.failure == "timeout"
    assert (await clients.get("p", silent_provider, 0.05)).failure == "circuit_open"
    # The open period ends (set, not slept: a stall on a slow machine must not end it
    # before the line above runs): the next request is the trial.
    clients.breaker("p").open_until = 0.0
    return clients


async def test_a_trial_cut_short_by_the_consumer_leaves_room_for_another(
    silent_provider: str,
) -> None:
    clients = await _opened(silent_provider)
    try:
        trial = asyncio.create_task(clients.get("p", silent_provider, 5.0))
        await asyncio.sleep(0.05)
        trial.cancel()  # the consumer hung up while the trial was out
        with contextlib.suppress(asyncio.CancelledError):
            await trial
        again = await clients.get("p", silent_provider, 0.05)
        assert again.failure == "timeout"  # asked (the next trial), not refused as circuit_open
    finally:
        await clients.close()


async def test_a_request_the_hub_made_late_is_not_the_trial(silent_provider: str) -> None:
    clients = await _opened(silent_provider)
    try:
        late = await clients.get(
            "p", silent_provider, 1.0, deadline=time.perf_counter() + 0.1
        )  # 10 % of the wait left
        assert late.failure == "circuit_open"
        trial = await clients.get("p", silent_provider, 0.05)
        assert trial.failure == "timeout"  # the trial was still there to take
    finally:
        await clients.close()
