"""Fixtures for the patient index: a real PDS simulator, provider and consumer systems with real tokens."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from sharedcare.iam.client import generate_key
from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM
from sharedcare.settings import Settings
from sharedcare.simulators.pds import SimulatorServer, create_pds_app, generated_patients

PDS_PEOPLE = 40
SEED = 2026
PROVIDER_SCOPES = "system/Patient.cu"
CONSUMER_SCOPES = "system/Patient.rs"


def system_uri(provider: str) -> str:
    return f"https://fhir.example.org/{provider}/Id/patient"


@pytest.fixture(scope="session")
def pds_server() -> Iterator[SimulatorServer]:
    with SimulatorServer(create_pds_app(PDS_PEOPLE, SEED)) as server:
        yield server


@pytest.fixture(scope="session")
def pds_people() -> list[dict[str, Any]]:
    return list(generated_patients(PDS_PEOPLE, SEED).values())


@pytest.fixture
def settings(settings: Settings, pds_server: SimulatorServer) -> Settings:
    return settings.model_copy(update={"pds_base_url": pds_server.url, "pds_timeout_seconds": 2.0})


@pytest.fixture(scope="session")
def system_key() -> Any:
    return generate_key("ES384", kid="pix-test-es384")


class Caller:
    """An HTTP client over the app acting as one registered system with a real token."""

    def __init__(self, http: httpx.AsyncClient, client_id: str):
        self.http = http
        self.client_id = client_id
        self.system = system_uri(client_id)

    def registration(self, person: dict[str, Any], local_id: str, **changes: Any) -> dict[str, Any]:
        """``person`` (a PDS Patient) as this provider would send it under ``local_id``."""
        nhs = changes.pop("nhs", person["id"])
        body = {
            "resourceType": "Patient",
            "identifier": [{"system": self.system, "value": local_id}],
            "name": [
                {"family": person["name"][0]["family"], "given": person["name"][0]["given"][:1]}
            ],
            "gender": person["gender"],
            "birthDate": person["birthDate"],
            "address": [{"postalCode": person["address"][0]["postalCode"]}],
        }
        if nhs:
            body["identifier"].append({"system": NHS_NUMBER_SYSTEM, "value": nhs})
        body.update(changes)
        return body

    async def feed(self, body: dict[str, Any], local_id: str | None = None) -> httpx.Response:
        local_id = local_id or body["identifier"][0]["value"]
        return await self.http.put(
            "/fhir/Patient",
            params={"identifier": f"{self.system}|{local_id}"},
            json=body,
            headers={"Content-Type": "application/fhir+json"},
        )


@pytest.fixture
async def make_system(
    app: Any, system_key: Any, register_system: Any, get_token: Any
) -> AsyncIterator[Any]:
    """``await make_system(client_id, kind, scopes, end_user=None)`` → a :class:`Caller`."""
    opened: list[httpx.AsyncClient] = []

    async def make(
        client_id: str,
        kind: str = "provider",
        scopes: str = PROVIDER_SCOPES,
        end_user: Any = None,
        **fields: Any,
    ) -> Caller:
        fields.setdefault(
            "identifier_systems", (system_uri(client_id),) if kind != "consumer" else ()
        )
        if kind != "consumer":
            fields.setdefault("fhir_base", f"https://{client_id}.example.org/fhir")
        await register_system(client_id, system_key, scopes, kind=kind, **fields)
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )
        opened.append(http)
        token = await get_token(http, client_id, system_key, scopes, end_user=end_user)
        http.headers["Authorization"] = f"Bearer {token}"
        return Caller(http, client_id)

    yield make
    for http in opened:
        await http.aclose()


async def wait_for(check: Any, timeout: float = 10.0) -> Any:
    """Poll ``await check()`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)
