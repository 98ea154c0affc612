"""What the hub charges to a provider: the wait for its answer, not the hub's own work on it.

The provider's external round trip (``Fetched.seconds``, the per-provider metric an operator
alerts on) ends when the answer's last byte arrives. Parsing and checking the answer is the
hub's time and counts in the internal round trip: a provider must not look slow because the
hub was busy with what it sent.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from sharedcare.query.providers import ProviderClients
from sharedcare.query.service import _received

BODY = orjson.dumps({"resourceType": "Bundle", "type": "searchset", "total": 0, "entry": []})


@pytest.fixture
async def prompt_provider() -> AsyncIterator[str]:
    """A real socket answering every request at once with an empty searchset."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/fhir+json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/fhir/Observation?patient=Patient/1"
    finally:
        server.close()


@pytest.mark.parametrize("hub_work_s", [0.0, 0.2])
async def test_the_hubs_checking_is_not_the_providers_round_trip(
    prompt_provider: str, hub_work_s: float
) -> None:
    def slow_check(body: Any) -> str | None:
        time.sleep(hub_work_s)  # the hub busy with the answer (parsing, checking)
        return None

    clients = ProviderClients()
    try:
        started = time.perf_counter()
        got = await clients.get("p", prompt_provider, 5.0, check=slow_check)
        ended = time.perf_counter()
    finally:
        await clients.close()
    assert got.ok, got.message
    assert got.seconds is not None
    assert got.sent_at <= got.done_at <= ended
    # The whole call took the hub's work too; the provider's share did not.
    assert ended - started >= hub_work_s
    assert got.seconds <= (ended - started) - hub_work_s
    assert ended - got.done_at >= hub_work_s


@pytest.mark.parametrize(
    ("state", "handler_start", "start"),
    [
        # The first middleware's clock: authentication and routing count as the hub's time.
        ({"received_at": 10.0}, 10.5, 10.0),
        # Served without that middleware (the app embedded elsewhere): the handler's start.
        ({}, 10.5, 10.5),
        # Not a time before the handler started (another clock, a stray value): not used.
        ({"received_at": 11.0}, 10.5, 10.5),
        ({"received_at": "10.0"}, 10.5, 10.5),
        ({"received_at": None}, 10.5, 10.5),
    ],
)
def test_the_internal_round_trip_starts_at_receipt(
    state: dict[str, Any], handler_start: float, start: float
) -> None:
    assert _received(state, handler_start) == start
