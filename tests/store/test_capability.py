"""The CapabilityStatement says exactly what the server does (hl7.org/fhir/R4/capabilitystatement.html).

Declared ⇒ served: every declared interaction is exercised over HTTP, and every declared
search parameter, modifier, _include and _revinclude is accepted by a search. Served ⇒
declared: every FHIR route of the app maps to a declared interaction.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from helpers import FHIR_JSON, patient
from starlette.routing import Route

# (path template, method) of every FHIR route → the interaction code it serves.
ROUTE_INTERACTIONS = {
    ("/fhir", "POST"): ("transaction", "batch"),
    ("/fhir/{type}", "GET"): ("search-type",),
    ("/fhir/{type}/_search", "POST"): ("search-type",),
    ("/fhir/{type}", "POST"): ("create",),
    ("/fhir/{type}/_history", "GET"): ("history-type",),
    ("/fhir/{type}/{id}", "GET"): ("read",),
    ("/fhir/{type}/{id}", "PUT"): ("update",),
    ("/fhir/{type}/{id}", "DELETE"): ("delete",),
    ("/fhir/{type}/{id}/_history", "GET"): ("history-instance",),
    ("/fhir/{type}/{id}/_history/{vid}", "GET"): ("vread",),
}
# A harmless value for each search parameter type: must parse and match nothing in particular.
HARMLESS = {"token": "x", "string": "x", "date": "2020", "reference": "Patient/x", "uri": "http://x"}
MODIFIER_VALUES = {"missing": "true", "not": "x", "exact": "x", "contains": "x"}


async def metadata(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/fhir/metadata")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    return response.json()


def resource(statement: dict[str, Any], rtype: str) -> dict[str, Any]:
    return next(r for r in statement["rest"][0]["resource"] if r["type"] == rtype)


async def test_statement_basics(client: httpx.AsyncClient, app: Any) -> None:
    statement = await metadata(client)  # no credentials: the statement is public
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["kind"] == "instance" and statement["status"] == "active"
    assert "json" in statement["format"] or "application/fhir+json" in statement["format"]
    rest = statement["rest"][0]
    assert rest["mode"] == "server"
    assert {r["type"] for r in rest["resource"]} == set(app.state.fhir.store.types)
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}


async def test_every_fhir_route_maps_to_a_declared_interaction(client: httpx.AsyncClient, app: Any) -> None:
    statement = await metadata(client)
    system = {i["code"] for i in statement["rest"][0]["interaction"]}
    per_type = [{i["code"] for i in r["interaction"]} for r in statement["rest"][0]["resource"]]
    assert all(codes == per_type[0] for codes in per_type), "every type declares the same interactions"
    declared = system | per_type[0]
    served: set[str] = set()
    fhir_routes = [r for r in app.router.routes if isinstance(r, Route) and r.path.startswith("/fhir")]
    assert fhir_routes
    for route in fhir_routes:
        if route.path == "/fhir/metadata" or "/.well-known/" in route.path:
            continue  # the statement itself and discovery documents are not REST interactions
        for method in route.methods or ():
            if method == "HEAD":
                continue
            codes = ROUTE_INTERACTIONS.get((route.path, method))
            assert codes is not None, f"{method} {route.path} serves no known interaction"
            assert set(codes) <= declared, f"{method} {route.path} serves {codes}, not declared"
            served.update(codes)
    assert served == declared, f"declared but not routed: {declared - served}"


async def test_each_declared_interaction_works_over_http(client: httpx.AsyncClient) -> None:
    statement = await metadata(client)
    declared = {i["code"] for i in resource(statement, "Patient")["interaction"]}
    declared |= {i["code"] for i in statement["rest"][0]["interaction"]}
    state: dict[str, Any] = {}

    async def create() -> None:
        response = await client.post("/fhir/Patient", json=patient(), headers=FHIR_JSON)
        assert response.status_code == 201
        state["body"] = response.json()

    async def read() -> None:
        assert (await client.get(f"/fhir/Patient/{state['body']['id']}")).status_code == 200

    async def update() -> None:
        body = {**state["body"], "name": [{"family": "Updated"}]}
        response = await client.put(f"/fhir/Patient/{body['id']}", json=body, headers=FHIR_JSON)
        assert response.status_code == 200 and response.json()["meta"]["versionId"] == "2"

    async def vread() -> None:
        response = await client.get(f"/fhir/Patient/{state['body']['id']}/_history/1")
        assert response.status_code == 200 and response.json()["meta"]["versionId"] == "1"

    async def history_instance() -> None:
        page = (await client.get(f"/fhir/Patient/{state['body']['id']}/_history")).json()
        assert page["type"] == "history" and len(page["entry"]) == 2

    async def history_type() -> None:
        page = (await client.get("/fhir/Patient/_history")).json()
        assert page["type"] == "history" and len(page["entry"]) == 2

    async def search_type() -> None:
        assert (await client.get("/fhir/Patient?family=Updated")).json()["total"] == 1
        form = {"Content-Type": "application/x-www-form-urlencoded"}
        posted = await client.post("/fhir/Patient/_search", content=b"family=Updated", headers=form)
        assert posted.json()["total"] == 1

    async def delete() -> None:
        assert (await client.delete(f"/fhir/Patient/{state['body']['id']}")).status_code == 204
        assert (await client.get(f"/fhir/Patient/{state['body']['id']}")).status_code == 410

    async def bundle(kind: str) -> None:
        body = {
            "resourceType": "Bundle",
            "type": kind,
            "entry": [{"resource": patient(), "request": {"method": "POST", "url": "Patient"}}],
        }
        response = await client.post("/fhir", json=body, headers=FHIR_JSON)
        assert response.status_code == 200 and response.json()["type"] == f"{kind}-response"

    async def transaction() -> None:
        await bundle("transaction")

    async def batch() -> None:
        await bundle("batch")

    checks: dict[str, Callable[[], Awaitable[None]]] = {
        "create": create,
        "read": read,
        "update": update,
        "vread": vread,
        "history-instance": history_instance,
        "history-type": history_type,
        "search-type": search_type,
        "delete": delete,
        "transaction": transaction,
        "batch": batch,
    }
    assert declared == set(checks), "a declared interaction has no HTTP check here"
    for check in checks.values():  # in this order: each builds on the one before
        await check()


async def test_every_declared_search_parameter_is_accepted(client: httpx.AsyncClient) -> None:
    statement = await metadata(client)
    failures = []
    for entry in statement["rest"][0]["resource"]:
        rtype = entry["type"]
        for param in entry["searchParam"]:
            value = HARMLESS[param["type"]]
            response = await client.get(f"/fhir/{rtype}?{param['name']}={quote(value)}")
            if response.status_code != 200:
                failures.append((rtype, param["name"], response.status_code, response.text[:200]))
    assert not failures, failures


async def test_declared_modifiers_includes_and_revincludes_are_accepted(client: httpx.AsyncClient) -> None:
    statement = await metadata(client)
    failures = []
    queries = []
    patient_entry = resource(statement, "Patient")
    for param in patient_entry["searchParam"]:
        documented = param.get("documentation", "")
        for modifier in documented.removeprefix("Modifiers: ").split(", ") if documented else ():
            name = modifier.lstrip(":")
            queries.append(("Patient", f"{param['name']}{modifier}={quote(MODIFIER_VALUES[name])}"))
    for entry in statement["rest"][0]["resource"]:
        queries += [(entry["type"], f"_include={quote(i)}") for i in entry.get("searchInclude", [])]
        queries += [(entry["type"], f"_revinclude={quote(i)}") for i in entry.get("searchRevInclude", [])]
    assert len(queries) > 50
    for rtype, query in queries:
        response = await client.get(f"/fhir/{rtype}?{query}")
        if response.status_code != 200:
            failures.append((rtype, query, response.status_code, response.text[:200]))
    assert not failures, failures


@pytest.mark.parametrize("path", ["/fhir/metadata", "/fhir/metadata?_format=json"])
async def test_metadata_is_stable(client: httpx.AsyncClient, path: str) -> None:
    first = (await client.get(path)).json()
    assert first == (await client.get(path)).json()
