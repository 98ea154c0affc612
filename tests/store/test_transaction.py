"""Batch and transaction Bundles (hl7.org/fhir/R4/http.html#transaction), on both databases."""

from __future__ import annotations

import asyncio
import re
import time
from typing import Any

import httpx
import pytest
from helpers import FHIR_JSON, nhs_number, patient

NHS = "https://fhir.nhs.uk/Id/nhs-number"
ETAG_1 = 'W/"1"'


def bundle(kind: str, *entries: dict[str, Any]) -> dict[str, Any]:
    return {"resourceType": "Bundle", "type": kind, "entry": list(entries)}


def post(resource: dict[str, Any], full_url: str | None = None, **request: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "resource": resource,
        "request": {"method": "POST", "url": resource["resourceType"], **request},
    }
    if full_url:
        entry["fullUrl"] = full_url
    return entry


def put(resource: dict[str, Any], **request: Any) -> dict[str, Any]:
    url = f"{resource['resourceType']}/{resource['id']}"
    return {"resource": resource, "request": {"method": "PUT", "url": url, **request}}


def get(url: str) -> dict[str, Any]:
    return {"request": {"method": "GET", "url": url}}


def delete(url: str) -> dict[str, Any]:
    return {"request": {"method": "DELETE", "url": url}}


def organization(name: str = "Leeds GP") -> dict[str, Any]:
    return {"resourceType": "Organization", "name": name, "active": True}


def provenance(target: str, who: str) -> dict[str, Any]:
    return {
        "resourceType": "Provenance",
        "target": [{"reference": target}],
        "recorded": "2024-05-01T10:00:00Z",
        "agent": [{"who": {"reference": who}}],
    }


async def send(client: httpx.AsyncClient, body: dict[str, Any]) -> httpx.Response:
    return await client.post("/fhir", json=body, headers=FHIR_JSON)


async def count(client: httpx.AsyncClient, rtype: str, query: str = "") -> int:
    response = await client.get(f"/fhir/{rtype}?_count=0{'&' + query if query else ''}")
    assert response.status_code == 200, response.text
    return int(response.json()["total"])


async def create(client: httpx.AsyncClient, resource: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(f"/fhir/{resource['resourceType']}", json=resource, headers=FHIR_JSON)
    assert response.status_code == 201, response.text
    return response.json()


def issue_text(response: httpx.Response) -> str:
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    return " ".join(
        i["diagnostics"] + " " + " ".join(i.get("expression", [])) for i in outcome["issue"]
    )


# -- transaction: success -----------------------------------------------------------------
async def test_transaction_resolves_urn_uuids_and_rewrites_references(client: httpx.AsyncClient) -> None:
    org_urn, pat_urn = "urn:uuid:0c3151bd-1cbf-4d64-b04d-cd9187a4c6e0", "urn:uuid:9d8f2c44-1b0e-4a53-9a37-1f0c2f5b8e11"
    body = bundle(
        "transaction",
        post(provenance(pat_urn, org_urn), "urn:uuid:5b1c3a8e-7d2f-4e6b-8c9a-0f1e2d3c4b5a"),
        post(patient(managingOrganization={"reference": org_urn}), pat_urn),
        post(organization(), org_urn),
    )
    response = await send(client, body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    result = response.json()
    assert result["resourceType"] == "Bundle" and result["type"] == "transaction-response"
    entries = result["entry"]
    assert len(entries) == 3
    types = ["Provenance", "Patient", "Organization"]  # request order, not processing order
    ids = []
    for entry, rtype in zip(entries, types, strict=True):
        assert entry["response"]["status"].startswith("201")
        assert entry["response"]["etag"] == ETAG_1
        match = re.fullmatch(rf"http://testserver/fhir/{rtype}/([^/]+)/_history/1", entry["response"]["location"])
        assert match, entry["response"]["location"]
        ids.append(match.group(1))
        assert entry["resource"]["id"] == match.group(1)
    prov_id, pat_id, org_id = ids
    stored_patient = (await client.get(f"/fhir/Patient/{pat_id}")).json()
    assert stored_patient["managingOrganization"]["reference"] == f"Organization/{org_id}"
    stored_prov = (await client.get(f"/fhir/Provenance/{prov_id}")).json()
    assert stored_prov["target"][0]["reference"] == f"Patient/{pat_id}"
    assert stored_prov["agent"][0]["who"]["reference"] == f"Organization/{org_id}"
    # the rewritten references are indexed, so searches follow them
    assert await count(client, "Patient", f"organization=Organization/{org_id}") == 1
    assert await count(client, "Provenance", f"target=Patient/{pat_id}") == 1


async def test_transaction_mixes_update_delete_and_sees_its_writes_in_get(client: httpx.AsyncClient) -> None:
    keep = await create(client, patient(family="Keep", nhs=nhs_number(1)))
    gone = await create(client, patient(family="Gone", nhs=nhs_number(2)))
    nhs = nhs_number(3)
    body = bundle(
        "transaction",
        get(f"Patient?identifier={NHS}|{nhs}"),
        put({**keep, "name": [{"family": "Kept"}]}, ifMatch=ETAG_1),
        delete(f"Patient/{gone['id']}"),
        post(patient(family="New", nhs=nhs)),
        put({**patient(family="Chosen"), "id": "chosen-id"}),
        get(f"Patient/{keep['id']}"),
    )
    response = await send(client, body)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"] for e in entries] == [
        "200 OK", "200 OK", "204 No Content", "201 Created", "201 Created", "200 OK",
    ]
    search = entries[0]["resource"]
    assert search["type"] == "searchset" and search["total"] == 1  # sees the POST of this transaction
    assert search["entry"][0]["resource"]["name"][0]["family"] == "New"
    assert entries[1]["response"]["etag"] == 'W/"2"'
    assert entries[5]["resource"]["name"][0]["family"] == "Kept"  # sees the PUT of this transaction
    assert (await client.get(f"/fhir/Patient/{gone['id']}")).status_code == 410
    assert (await client.get("/fhir/Patient/chosen-id")).json()["name"][0]["family"] == "Chosen"


async def test_transaction_conditional_create_reuses_a_match(client: httpx.AsyncClient) -> None:
    nhs = nhs_number(10)
    existing = await create(client, patient(nhs=nhs))
    condition = f"identifier={NHS}|{nhs}"
    new_nhs = nhs_number(11)
    body = bundle(
        "transaction",
        post(patient(nhs=nhs), "urn:uuid:aaaaaaaa-0000-4000-8000-000000000001", ifNoneExist=condition),
        post(provenance("urn:uuid:aaaaaaaa-0000-4000-8000-000000000001", "Organization/x")),
        post(patient(nhs=new_nhs), "urn:uuid:aaaaaaaa-0000-4000-8000-000000000002",
             ifNoneExist=f"identifier={NHS}|{new_nhs}"),
        post(provenance("urn:uuid:aaaaaaaa-0000-4000-8000-000000000002", "Organization/x")),
    )
    response = await send(client, body)
    assert response.status_code == 200, response.text
    entries = response.json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["200 OK", "201 Created", "201 Created", "201 Created"]
    assert entries[0]["response"]["location"].startswith(f"http://testserver/fhir/Patient/{existing['id']}")
    assert entries[0]["resource"]["id"] == existing["id"]
    assert entries[1]["resource"]["target"][0]["reference"] == f"Patient/{existing['id']}"
    new_id = entries[2]["resource"]["id"]
    assert entries[3]["resource"]["target"][0]["reference"] == f"Patient/{new_id}"
    assert await count(client, "Patient") == 2
    # sent again, both conditional creates now match: no new Patients
    again = await send(client, body)
    assert [e["response"]["status"] for e in again.json()["entry"]] == [
        "200 OK", "201 Created", "200 OK", "201 Created",
    ]
    assert await count(client, "Patient") == 2


async def test_concurrent_conditional_transactions_make_one_resource(client: httpx.AsyncClient) -> None:
    nhs = nhs_number(30)
    urn = "urn:uuid:eeeeeeee-0000-4000-8000-000000000001"
    body = bundle(
        "transaction",
        post(patient(nhs=nhs), urn, ifNoneExist=f"identifier={NHS}|{nhs}"),
        post(provenance(urn, "Organization/x")),
    )
    responses = await asyncio.gather(*(send(client, body) for _ in range(5)))
    assert [r.status_code for r in responses] == [200] * 5, [r.text for r in responses]
    statuses = sorted(r.json()["entry"][0]["response"]["status"] for r in responses)
    assert statuses == ["200 OK"] * 4 + ["201 Created"]
    assert await count(client, "Patient") == 1
    pid = responses[0].json()["entry"][0]["resource"]["id"]
    assert await count(client, "Provenance", f"target=Patient/{pid}") == 5  # every reference resolved to it


# -- transaction: all or nothing ----------------------------------------------------------
async def test_transaction_with_an_invalid_entry_writes_nothing(client: httpx.AsyncClient) -> None:
    body = bundle(
        "transaction",
        post(organization(), "urn:uuid:bbbbbbbb-0000-4000-8000-000000000001"),
        post(patient(), "urn:uuid:bbbbbbbb-0000-4000-8000-000000000002"),
        post({**patient(), "birthDate": "not-a-date"}),
    )
    organizations = await count(client, "Organization")
    response = await send(client, body)
    assert response.status_code == 422
    text = issue_text(response)
    assert "Bundle.entry[2]" in text and "Bundle.entry[2].resource.birthDate" in text
    assert await count(client, "Patient") == 0
    assert await count(client, "Organization") == organizations


WRITE_TIME_FAILURES = {
    "PUT with a stale ifMatch": (
        lambda existing: put({**existing, "name": [{"family": "Stale"}]}, ifMatch='W/"7"'),
        412,
    ),
    "PUT with ifMatch on a missing resource": (
        lambda existing: put({**patient(), "id": "never-was"}, ifMatch=ETAG_1),
        412,
    ),
    "DELETE of an unknown id": (lambda existing: delete("Patient/no-such-id"), 404),
    "GET of an unknown id": (lambda existing: get("Patient/no-such-id"), 404),
}


@pytest.mark.parametrize(("make", "status"), WRITE_TIME_FAILURES.values(), ids=list(WRITE_TIME_FAILURES))
async def test_transaction_failing_while_writing_rolls_everything_back(
    client: httpx.AsyncClient, make: Any, status: int
) -> None:
    existing = await create(client, patient(family="Before"))
    organizations = await count(client, "Organization")
    body = bundle(
        "transaction",
        post(organization(), "urn:uuid:cccccccc-0000-4000-8000-000000000001"),
        post(patient(family="Created", nhs=nhs_number(5))),
        delete(f"Patient/{existing['id']}") if status != 412 else get(f"Patient/{existing['id']}"),
        make(existing),
    )
    response = await send(client, body)
    assert response.status_code == status, response.text
    assert "Bundle.entry[3]" in issue_text(response)
    assert await count(client, "Organization") == organizations
    assert await count(client, "Patient") == 1
    after = await client.get(f"/fhir/Patient/{existing['id']}")
    assert after.status_code == 200 and after.json()["meta"]["versionId"] == "1"
    assert (await client.get("/fhir/Patient/never-was")).status_code == 404


REJECTED = {
    "collection Bundle": ({"resourceType": "Bundle", "type": "collection", "entry": []}, 400, "Bundle.type"),
    "not a Bundle": (patient(), 400, None),
    "entry is not an array": ({"resourceType": "Bundle", "type": "transaction", "entry": {}}, 400, "Bundle.entry"),
    "entry without request": (bundle("transaction", {"resource": patient()}), 400, "Bundle.entry[0].request"),
    "unknown method": (
        bundle("transaction", {"resource": patient(), "request": {"method": "PATCH", "url": "Patient/1"}}),
        400,
        "Bundle.entry[0].request",
    ),
    "unknown type": (bundle("transaction", delete("Foo/1")), 404, "Bundle.entry[0]"),
    "foreign absolute url": (
        bundle("transaction", {"resource": patient(), "request": {"method": "POST", "url": "http://elsewhere/fhir/Patient"}}),
        400,
        "Bundle.entry[0].request.url",
    ),
    "same resource changed twice": (
        bundle("transaction", delete("Patient/p1"), put({**patient(), "id": "p1"})),
        400,
        "Bundle.entry[1]",
    ),
    "unresolved urn:uuid reference": (
        bundle("transaction", post(patient(managingOrganization={"reference": "urn:uuid:dddddddd-0000-4000-8000-000000000009"}))),
        400,
        "Bundle.entry[0]",
    ),
    "bad search in GET entry": (bundle("transaction", post(patient()), get("Patient?nonsense=1")), 400, "Bundle.entry[1]"),
    "bad ifNoneExist": (bundle("transaction", post(patient(), ifNoneExist="nonsense=1")), 400, "Bundle.entry[0]"),
}


@pytest.mark.parametrize(("body", "status", "where"), REJECTED.values(), ids=list(REJECTED))
async def test_rejected_bundles_write_nothing(
    client: httpx.AsyncClient, body: dict[str, Any], status: int, where: str | None
) -> None:
    response = await send(client, body)
    assert response.status_code == status, response.text
    text = issue_text(response)
    if where:
        assert where in text, text
    assert await count(client, "Patient") == 0


@pytest.mark.parametrize("kind", ["transaction", "batch"])
async def test_bundle_over_max_entries_is_413(client: httpx.AsyncClient, app: Any, kind: str) -> None:
    limit = app.state.settings.max_bundle_entries
    tiny = {"resourceType": "Patient", "gender": "unknown"}
    response = await send(client, bundle(kind, *(post(tiny) for _ in range(limit + 1))))
    assert response.status_code == 413, response.text[:300]
    assert f"limit is {limit}" in issue_text(response)
    assert await count(client, "Patient") == 0


async def test_bulk_transaction_of_1000_patients(client: httpx.AsyncClient) -> None:
    body = bundle(
        "transaction",
        *(post(patient(family=f"Bulk{i}", nhs=nhs_number(1000 + i)), f"urn:uuid:00000000-0000-4000-8000-{i:012d}")
          for i in range(1000)),
    )
    start = time.perf_counter()
    response = await send(client, body)
    elapsed = time.perf_counter() - start
    assert response.status_code == 200, response.text[:500]
    entries = response.json()["entry"]
    assert len(entries) == 1000 and all(e["response"]["status"] == "201 Created" for e in entries)
    assert len({e["resource"]["id"] for e in entries}) == 1000
    assert await count(client, "Patient") == 1000
    assert await count(client, "Patient", f"identifier={NHS}|{nhs_number(1999)}") == 1
    assert elapsed < 20, f"1000-entry transaction took {elapsed:.1f}s"


# -- batch ----------------------------------------------------------------------------------
async def test_batch_processes_each_entry_independently(client: httpx.AsyncClient) -> None:
    existing = await create(client, patient(family="There"))
    body = bundle(
        "batch",
        post(patient(family="Good")),
        post({**patient(), "birthDate": "not-a-date"}),
        get(f"Patient/{existing['id']}"),
        get("Patient/no-such-id"),
        delete("Foo/1"),
        put({**existing, "name": [{"family": "Stale"}]}, ifMatch='W/"9"'),
        {"request": {"method": "PATCH", "url": "Patient/1"}},
        get("Patient?family=Good"),
    )
    response = await send(client, body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["type"] == "batch-response"
    entries = result["entry"]
    statuses = [int(e["response"]["status"][:3]) for e in entries]
    assert statuses == [201, 422, 200, 404, 404, 412, 400, 200]
    for i, entry in enumerate(entries):
        if statuses[i] >= 400:
            outcome = entry["response"]["outcome"]
            assert outcome["resourceType"] == "OperationOutcome"
            assert f"Bundle.entry[{i}]" in outcome["issue"][0]["diagnostics"]
            assert "resource" not in entry
    assert "Bundle.entry[1].resource.birthDate" in entries[1]["response"]["outcome"]["issue"][0]["expression"]
    assert entries[0]["response"]["location"].startswith("http://testserver/fhir/Patient/")
    assert entries[0]["response"]["etag"] == ETAG_1
    assert entries[2]["resource"]["id"] == existing["id"]
    assert entries[7]["resource"]["total"] == 1  # a batch GET sees the batch's earlier POST
    assert await count(client, "Patient") == 2
    assert (await client.get(f"/fhir/Patient/{existing['id']}")).json()["meta"]["versionId"] == "1"


async def test_batch_conditional_create(client: httpx.AsyncClient) -> None:
    nhs = nhs_number(20)
    condition = f"identifier={NHS}|{nhs}"
    body = bundle("batch", post(patient(nhs=nhs), ifNoneExist=condition), post(patient(nhs=nhs), ifNoneExist=condition))
    entries = (await send(client, body)).json()["entry"]
    assert [e["response"]["status"] for e in entries] == ["201 Created", "200 OK"]
    assert entries[0]["resource"]["id"] == entries[1]["resource"]["id"]
    assert await count(client, "Patient") == 1


async def test_empty_transaction_and_batch(client: httpx.AsyncClient) -> None:
    for kind in ("transaction", "batch"):
        response = await send(client, {"resourceType": "Bundle", "type": kind})
        assert response.status_code == 200
        assert response.json()["type"] == f"{kind}-response"
        assert "entry" not in response.json()  # FHIR JSON has no empty arrays
