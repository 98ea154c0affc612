"""Create, read, vread, update, delete and history through HTTP, on both databases."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from helpers import FHIR_JSON, nhs_number, patient


async def create(client: httpx.AsyncClient, body: dict) -> dict:
    response = await client.post(f"/fhir/{body['resourceType']}", json=body, headers=FHIR_JSON)
    assert response.status_code == 201, response.text
    return response.json()


async def test_create_assigns_id_version_and_location(client: httpx.AsyncClient) -> None:
    response = await client.post("/fhir/Patient", json=patient(), headers=FHIR_JSON)
    assert response.status_code == 201
    assert response.headers["content-type"].startswith("application/fhir+json")
    body = response.json()
    assert body["id"] and body["meta"]["versionId"] == "1"
    assert body["meta"]["lastUpdated"].endswith("Z")
    assert response.headers["ETag"] == 'W/"1"'
    assert response.headers["Location"] == f"http://testserver/fhir/Patient/{body['id']}/_history/1"
    read = await client.get(f"/fhir/Patient/{body['id']}")
    assert read.status_code == 200
    assert read.json() == body


async def test_client_supplied_id_on_create_is_replaced(client: httpx.AsyncClient) -> None:
    body = await create(client, {**patient(), "id": "chosen-by-client"})
    assert body["id"] != "chosen-by-client"


async def test_update_versions_and_vread_returns_each_version(client: httpx.AsyncClient) -> None:
    first = await create(client, patient(family="Smith"))
    pid = first["id"]
    changed = {**first, "name": [{"family": "Jones", "given": ["Jo"]}]}
    response = await client.put(f"/fhir/Patient/{pid}", json=changed, headers=FHIR_JSON)
    assert response.status_code == 200
    assert response.json()["meta"]["versionId"] == "2"
    v1 = await client.get(f"/fhir/Patient/{pid}/_history/1")
    v2 = await client.get(f"/fhir/Patient/{pid}/_history/2")
    assert v1.json()["name"][0]["family"] == "Smith"
    assert v2.json()["name"][0]["family"] == "Jones"
    missing = await client.get(f"/fhir/Patient/{pid}/_history/3")
    assert missing.status_code == 404


async def test_update_as_create_with_client_id(client: httpx.AsyncClient) -> None:
    response = await client.put("/fhir/Patient/pat-1", json={**patient(), "id": "pat-1"}, headers=FHIR_JSON)
    assert response.status_code == 201
    assert (await client.get("/fhir/Patient/pat-1")).json()["meta"]["versionId"] == "1"


@pytest.mark.parametrize(
    ("if_match", "status"),
    [('W/"1"', 200), ('"1"', 200), ('W/"2"', 412), ('W/"0"', 412)],
)
async def test_if_match(client: httpx.AsyncClient, if_match: str, status: int) -> None:
    body = await create(client, patient())
    response = await client.put(
        f"/fhir/Patient/{body['id']}", json=body, headers={**FHIR_JSON, "If-Match": if_match}
    )
    assert response.status_code == status
    if status == 412:
        assert response.json()["resourceType"] == "OperationOutcome"
        # a stale write changed nothing
        assert (await client.get(f"/fhir/Patient/{body['id']}")).json()["meta"]["versionId"] == "1"


async def test_concurrent_updates_with_same_if_match_only_one_wins(client: httpx.AsyncClient) -> None:
    body = await create(client, patient())
    headers = {**FHIR_JSON, "If-Match": 'W/"1"'}
    responses = await asyncio.gather(
        *(client.put(f"/fhir/Patient/{body['id']}", json=body, headers=headers) for _ in range(5))
    )
    assert sorted(r.status_code for r in responses) == [200, 412, 412, 412, 412]


async def test_delete_leaves_tombstone_and_history(client: httpx.AsyncClient) -> None:
    body = await create(client, patient())
    pid = body["id"]
    deleted = await client.delete(f"/fhir/Patient/{pid}")
    assert deleted.status_code == 204
    gone = await client.get(f"/fhir/Patient/{pid}")
    assert gone.status_code == 410
    assert gone.json()["issue"][0]["code"] == "deleted"
    assert (await client.delete(f"/fhir/Patient/{pid}")).status_code == 204  # idempotent
    search = (await client.get("/fhir/Patient", params={"_id": pid})).json()
    assert search["total"] == 0
    history = (await client.get(f"/fhir/Patient/{pid}/_history")).json()
    assert [e["request"]["method"] for e in history["entry"]] == ["DELETE", "POST"]
    assert "resource" not in history["entry"][0]
    assert (await client.get(f"/fhir/Patient/{pid}/_history/1")).status_code == 200
    # re-creating after delete continues the version sequence
    again = await client.put(f"/fhir/Patient/{pid}", json={**body, "id": pid}, headers=FHIR_JSON)
    assert again.status_code == 200 and again.json()["meta"]["versionId"] == "3"


async def test_delete_unknown_is_404(client: httpx.AsyncClient) -> None:
    assert (await client.delete("/fhir/Patient/nope")).status_code == 404


async def test_instance_and_type_history_page_newest_first(client: httpx.AsyncClient) -> None:
    body = await create(client, patient())
    for family in ("B", "C", "D", "E"):
        body = {**body, "name": [{"family": family}]}
        assert (await client.put(f"/fhir/Patient/{body['id']}", json=body, headers=FHIR_JSON)).status_code == 200
    await create(client, patient(family="Other"))
    seen: list[str] = []
    url: str | None = f"/fhir/Patient/{body['id']}/_history?_count=2"
    while url:
        page = (await client.get(url)).json()
        assert page["type"] == "history"
        seen += [e["resource"]["meta"]["versionId"] for e in page["entry"]]
        url = next((link["url"] for link in page["link"] if link["relation"] == "next"), None)
    assert seen == ["5", "4", "3", "2", "1"]
    type_history = (await client.get("/fhir/Patient/_history?_count=100")).json()
    assert len(type_history["entry"]) == 6
    assert type_history["entry"][0]["resource"]["name"][0]["family"] == "Other"


async def test_history_since_filters(client: httpx.AsyncClient) -> None:
    first = await create(client, patient())
    await asyncio.sleep(0.01)
    second = await create(client, patient(family="Later"))
    since = second["meta"]["lastUpdated"]
    page = (await client.get("/fhir/Patient/_history", params={"_since": since})).json()
    ids = {e["resource"]["id"] for e in page["entry"]}
    assert second["id"] in ids and first["id"] not in ids


async def test_conditional_create_if_none_exist(client: httpx.AsyncClient) -> None:
    nhs = nhs_number(42)
    headers = {**FHIR_JSON, "If-None-Exist": f"identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}"}
    first = await client.post("/fhir/Patient", json=patient(nhs=nhs), headers=headers)
    second = await client.post("/fhir/Patient", json=patient(nhs=nhs), headers=headers)
    assert (first.status_code, second.status_code) == (201, 200)
    assert first.json()["id"] == second.json()["id"]


async def test_concurrent_conditional_creates_make_one_resource(client: httpx.AsyncClient) -> None:
    nhs = nhs_number(77)
    headers = {**FHIR_JSON, "If-None-Exist": f"identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}"}
    responses = await asyncio.gather(
        *(client.post("/fhir/Patient", json=patient(nhs=nhs), headers=headers) for _ in range(6))
    )
    assert sorted(r.status_code for r in responses) == [200] * 5 + [201]
    assert len({r.json()["id"] for r in responses}) == 1


@pytest.mark.parametrize(
    ("prefer", "has_body", "resource_type"),
    [
        ("return=minimal", False, None),
        ("return=representation", True, "Patient"),
        ("return=OperationOutcome", True, "OperationOutcome"),
    ],
)
async def test_prefer_return(
    client: httpx.AsyncClient, prefer: str, has_body: bool, resource_type: str | None
) -> None:
    response = await client.post("/fhir/Patient", json=patient(), headers={**FHIR_JSON, "Prefer": prefer})
    assert response.status_code == 201
    assert "Location" in response.headers
    assert bool(response.content) == has_body
    if has_body:
        assert response.json()["resourceType"] == resource_type
