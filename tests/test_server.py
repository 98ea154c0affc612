"""The hub over a real socket: `sharedcare serve`, driven by a FHIR client written by others."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fhirpy import AsyncFHIRClient
from helpers import RunningHub, patient
from sharedcare.settings import Settings


def hub_env(settings: Settings) -> dict[str, str]:
    return {
        "SHAREDCARE_DATABASE_URL": settings.database,
        "SHAREDCARE_DATA_DIR": str(settings.data_dir),
    }


@pytest.fixture
def hub(settings: Settings):  # noqa: ANN201 - a context-managed fixture
    with RunningHub(hub_env(settings)) as running:
        yield running


async def test_fhirpy_create_read_search_and_page(hub: RunningHub, hub_auth: Any) -> None:
    headers = await hub_auth(hub.url)
    client = AsyncFHIRClient(
        f"{hub.url}/fhir",
        authorization=headers["Authorization"],
        extra_headers={"Accept": "application/fhir+json"},
    )
    created = []
    for i in range(23):
        resource = client.resource("Patient", **patient(family="Fhirpy", given=f"G{i:02d}"))
        await resource.save()
        created.append(resource.id)
    fetched = await client.reference("Patient", created[0]).to_resource()
    assert fetched["name"][0]["given"] == ["G00"]
    found = await client.resources("Patient").search(family="fhirpy").limit(5).fetch_all()
    assert sorted(p.id for p in found) == sorted(created)  # fetch_all follows next links
    assert len(await client.resources("Patient").search(family="fhirpy").limit(5).fetch()) == 5
    assert await client.resources("Patient").search(family="fhirpy").count() == 23
    one = await client.resources("Patient").search(given="G07").first()
    assert one is not None and one.id == created[7]


async def test_serve_exposes_health_and_metrics(hub: RunningHub) -> None:
    async with httpx.AsyncClient(base_url=hub.url) as http:
        assert (await http.get("/livez")).status_code == 200
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["migrations"] == "current"
        await http.get("/fhir/metadata")
        metrics = (await http.get("/metrics")).text
    assert 'sharedcare_http_requests_total{method="GET",route="/fhir/metadata",status="200"}' in metrics
