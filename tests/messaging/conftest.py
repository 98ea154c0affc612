"""Messaging fixtures: registered sender/recipient systems with real tokens, recipient simulators."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any, Self

import httpx
import pytest
import pytest_asyncio

from sharedcare.iam.client import generate_key
from sharedcare.simulators.pds import SimulatorServer
from sharedcare.simulators.recipient import AckConfig, RecipientFaults, create_recipient_app

FHIR_JSON = {"Content-Type": "application/fhir+json"}
SCOPES = "system/MessageHeader.crs"


def message(
    sender: str,
    recipient: str,
    *,
    bundle_id: str | None = None,
    n: int = 0,
    unordered: bool = False,
    payload_bytes: int = 0,
    destination: str | None = None,
) -> dict[str, Any]:
    """A discharge-summary-like message Bundle from ``sender`` to ``recipient``."""
    header: dict[str, Any] = {
        "resourceType": "MessageHeader",
        "id": str(uuid.uuid4()),
        "eventCoding": {
            "system": "https://fhir.nhs.uk/CodeSystem/message-event",
            "code": "discharge-summary",
        },
        "destination": [{"endpoint": destination or f"urn:participant:{recipient}"}],
        "source": {"endpoint": f"urn:participant:{sender}"},
    }
    if unordered:
        header["extension"] = [
            {
                "url": "https://sharedcare.example.org/fhir/StructureDefinition/message-ordering",
                "valueCode": "unordered",
            }
        ]
    patient = {
        "resourceType": "Patient",
        "id": "p1",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9434765919"}],
        "name": [{"family": "Smith", "given": ["Jo"]}],
    }
    entries = [
        {"fullUrl": "urn:uuid:h", "resource": header},
        {"fullUrl": "urn:uuid:p", "resource": patient},
    ]
    comp = {
        "resourceType": "Composition",
        "id": "c1",
        "status": "final",
        "title": f"n={n}",
        "text": {"status": "generated", "div": "<div>" + "x" * payload_bytes + "</div>"},
    }
    entries.append({"fullUrl": "urn:uuid:c", "resource": comp})
    return {
        "resourceType": "Bundle",
        "id": bundle_id or str(uuid.uuid4()),
        "type": "message",
        "entry": entries,
    }


class Sim:
    """A recipient simulator on a real socket."""

    def __init__(self, faults: RecipientFaults | None = None, ack: AckConfig | None = None):
        self.app = create_recipient_app(faults, ack)
        self.server = SimulatorServer(self.app)
        self.url = ""

    def __enter__(self) -> Self:
        self.url = self.server.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stop()

    @property
    def state(self) -> Any:
        return self.app.state.recipient

    @property
    def endpoint(self) -> str:
        return f"{self.url}/messages"

    def received(self, *, responses: bool | None = None) -> list[dict[str, Any]]:
        out = list(self.state.received)
        if responses is not None:
            out = [r for r in out if bool(r["response_code"]) == responses]
        return out


@pytest.fixture
def sims() -> Iterator[Any]:
    started: list[Sim] = []

    def make(faults: RecipientFaults | None = None, ack: AckConfig | None = None) -> Sim:
        sim = Sim(faults, ack).__enter__()
        started.append(sim)
        return sim

    yield make
    for sim in started:
        sim.__exit__()


@pytest.fixture
def key() -> Any:
    return generate_key("ES384")


@pytest_asyncio.fixture
async def system_client(app: Any, register_system: Any, get_token: Any) -> AsyncIterator[Any]:
    """``await system_client(client_id, endpoint=None, scopes=SCOPES)``: register a provider, get a client."""
    opened: list[httpx.AsyncClient] = []

    async def make(
        client_id: str,
        endpoint: str | None = None,
        scopes: str = SCOPES,
        organization: str | None = None,
    ) -> httpx.AsyncClient:
        k = generate_key("ES384")
        await register_system(
            client_id,
            k,
            scopes,
            kind="provider",
            fhir_base=f"https://{client_id}.example/fhir",
            messaging_endpoint=endpoint,
            organization=organization,
        )
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )
        token = await get_token(http, client_id, k, scopes, end_user=None)
        http.headers["Authorization"] = f"Bearer {token}"
        http.headers["Content-Type"] = "application/fhir+json"
        opened.append(http)
        return http

    yield make
    for http in opened:
        await http.aclose()


async def eventually(check: Any, timeout: float = 20.0, every: float = 0.05) -> Any:
    """Poll ``check()`` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(every)


@pytest.fixture
def messaging_overrides() -> dict[str, Any]:
    """Settings a test module or test overrides (parametrize ``messaging_overrides``)."""
    return {}


@pytest.fixture
def settings(settings: Any, messaging_overrides: dict[str, Any]) -> Any:
    quick = {
        "messaging_retry_base_seconds": 0.05,
        "messaging_retry_cap_seconds": 0.3,
        "messaging_delivery_timeout_seconds": 3.0,
        "messaging_max_message_bytes": 256 * 1024,
        "rate_limit_per_second": 0,
    }
    return settings.model_copy(update={**quick, **messaging_overrides})
