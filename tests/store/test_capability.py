"""The CapabilityStatement says exactly what the server does (hl7.org/fhir/R4/capabilitystatement.html).

Declared ⇒ served: every declared interaction and operation is exercised over HTTP, and every
declared search parameter, modifier, _include and _revinclude is accepted by a search. Served ⇒
declared: every FHIR route of the app maps to a declared interaction or operation, per kind of
type: the hub's own (store) types, and the clinical types the providers hold (federated).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fhir.resources.R4B.capabilitystatement import CapabilityStatement
from helpers import FHIR_JSON, patient
from starlette.routing import Route

from sharedcare.query.params import NHS_NUMBER_SYSTEM, federated_types
from sharedcare.store.capability import capability_statement
from sharedcare.store.routes import store_routes
from sharedcare.store.searchparams import HUB_TYPES, load_search_params

# (path template, method) of every FHIR route → what it serves, as (where, code):
# "system" interaction, "store" / "federated" interaction of every type of that kind,
# "operation" (rest.operation name), "Patient$" (a Patient operation name), and
# "Patient:conditional-update" (Patient.conditionalUpdate).
ROUTE_INTERACTIONS: dict[tuple[str, str], tuple[tuple[str, str], ...]] = {
    ("/fhir", "POST"): (("system", "transaction"), ("system", "batch")),
    ("/fhir/{type}", "GET"): (("store", "search-type"),),
    ("/fhir/{type}/_search", "POST"): (("store", "search-type"),),
    ("/fhir/{type}", "POST"): (("store", "create"),),
    ("/fhir/{type}/_history", "GET"): (("store", "history-type"),),
    ("/fhir/{type}/{id}", "GET"): (("store", "read"),),
    ("/fhir/{type}/{id}", "PUT"): (("store", "update"),),
    ("/fhir/{type}/{id}", "DELETE"): (("store", "delete"),),
    ("/fhir/{type}/{id}/_history", "GET"): (("store", "history-instance"),),
    ("/fhir/{type}/{id}/_history/{vid}", "GET"): (("store", "vread"),),
    # The patient index: PIXm feed (provider registrations), ITI-83, data availability.
    ("/fhir/Patient", "POST"): (("store", "create"),),
    ("/fhir/Patient", "PUT"): (("Patient", "conditional-update"),),
    ("/fhir/Patient/$ihe-pix", "GET"): (("Patient$", "ihe-pix"),),
    ("/fhir/Patient/$data-availability", "GET"): (("Patient$", "data-availability"),),
    # The federated query and the provider-proxied read (the fullUrl of federated entries).
    ("/fhir/{type:federated}", "GET"): (("federated", "search-type"),),
    ("/fhir/{type:federated}/_search", "POST"): (("federated", "search-type"),),
    ("/fhir/providers/{provider}/{type}/{id}", "GET"): (("federated", "read"),),
    # Messaging.
    ("/fhir/$process-message", "POST"): (("operation", "process-message"),),
    ("/fhir/$mailbox", "GET"): (("operation", "mailbox"),),
    ("/fhir/$mailbox/{mid}", "GET"): (("operation", "mailbox"),),
    ("/fhir/$mailbox/{mid}/$acknowledge", "POST"): (("operation", "acknowledge"),),
}
# A harmless value for each search parameter type: must parse and match nothing in particular.
HARMLESS = {
    "token": "x",
    "string": "x",
    "date": "2020",
    "reference": "Patient/x",
    "uri": "http://x",
}
MODIFIER_VALUES = {"missing": "true", "not": "x", "exact": "x", "contains": "x"}


async def metadata(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/fhir/metadata")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    return response.json()


def resource(statement: dict[str, Any], rtype: str) -> dict[str, Any]:
    return next(r for r in statement["rest"][0]["resource"] if r["type"] == rtype)


def federated_only(app: Any) -> set[str]:
    """Clinical types only the providers hold (DocumentReference is also the store's)."""
    return set(federated_types()) - set(app.state.fhir.store.types)


def declarations(statement: dict[str, Any], app: Any) -> set[tuple[str, str]]:
    """What the statement declares, in ROUTE_INTERACTIONS' terms; each kind declares one set."""
    rest = statement["rest"][0]
    declared = {("system", i["code"]) for i in rest["interaction"]}
    declared |= {("operation", o["name"]) for o in rest.get("operation", [])}
    store = set(app.state.fhir.store.types)
    for kind, types in (("store", store), ("federated", federated_only(app))):
        per_type = [
            {i["code"] for i in r["interaction"]} for r in rest["resource"] if r["type"] in types
        ]
        assert len(per_type) == len(types)
        assert all(codes == per_type[0] for codes in per_type), (
            f"every {kind} type declares the same interactions"
        )
        declared |= {(kind, code) for code in per_type[0]}
    for entry in rest["resource"]:
        declared |= {(f"{entry['type']}$", o["name"]) for o in entry.get("operation", [])}
        if entry.get("conditionalUpdate"):
            declared.add((entry["type"], "conditional-update"))
        for op in entry.get("operation", []):
            assert op["definition"].startswith(("http://", "https://")), op
    for op in rest.get("operation", []):
        assert op["definition"].startswith(("http://", "https://")), op
    return declared


async def test_statement_basics(client: httpx.AsyncClient, app: Any) -> None:
    statement = await metadata(client)  # no credentials: the statement is public
    assert statement["resourceType"] == "CapabilityStatement"
    assert statement["fhirVersion"] == "4.0.1"
    assert statement["kind"] == "instance" and statement["status"] == "active"
    assert "json" in statement["format"] or "application/fhir+json" in statement["format"]
    rest = statement["rest"][0]
    assert rest["mode"] == "server"
    types = [r["type"] for r in rest["resource"]]
    assert len(types) == len(set(types)), "each type is described once"
    assert set(types) == set(app.state.fhir.store.types) | set(federated_types())
    assert {"Observation", "MedicationStatement", "DocumentReference"} <= set(types)
    assert {i["code"] for i in rest["interaction"]} == {"transaction", "batch"}
    assert {o["name"] for o in rest["operation"]} == {"process-message", "mailbox", "acknowledge"}
    pix = {o["name"]: o["definition"] for o in resource(statement, "Patient")["operation"]}
    assert pix["ihe-pix"] == "https://profiles.ihe.net/ITI/PIXm/OperationDefinition/IHE.PIXm.pix"
    assert "providers/{provider}" in resource(statement, "DocumentReference")["documentation"]
    assert "[base]/providers/{provider}/{type}/{id}" in rest["documentation"]
    CapabilityStatement.model_validate(statement)  # R4B's model: CapabilityStatement is as in R4


async def test_federated_types_declare_the_query_pathway(client: httpx.AsyncClient) -> None:
    observation = resource(await metadata(client), "Observation")
    assert {i["code"] for i in observation["interaction"]} == {"read", "search-type"}
    read = next(i for i in observation["interaction"] if i["code"] == "read")
    assert "[base]/providers/{provider}/Observation/{id}" in read["documentation"]
    params = {p["name"]: p for p in observation["searchParam"]}
    assert {"patient", "subject", "code", "date", "_id", "_lastUpdated"} <= set(params)
    assert NHS_NUMBER_SYSTEM in params["patient"]["documentation"]
    assert "patient.identifier" in params["patient"]["documentation"]


async def test_every_fhir_route_maps_to_a_declared_interaction(
    client: httpx.AsyncClient, app: Any
) -> None:
    statement = await metadata(client)
    declared = declarations(statement, app)
    served: set[tuple[str, str]] = set()
    fhir_routes = [
        r for r in app.router.routes if isinstance(r, Route) and r.path.startswith("/fhir")
    ]
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


async def test_each_declared_interaction_works_over_http(
    client: httpx.AsyncClient, app: Any
) -> None:
    statement = await metadata(client)
    declared = {
        code for where, code in declarations(statement, app) if where in ("store", "system")
    }
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


def diagnostics(response: httpx.Response) -> str:
    body = response.json()
    assert body["resourceType"] == "OperationOutcome", body
    return " ".join(i.get("diagnostics", "") for i in body["issue"])


async def test_each_declared_operation_and_federated_interaction_reaches_its_handler(
    client: httpx.AsyncClient, app: Any
) -> None:
    """Each is answered by its own pathway (its own refusal or result), not the store's 404.

    Their full behaviour is tested with their capabilities; here the declaration is the point.
    """
    statement = await metadata(client)
    declared = {d for d in declarations(statement, app) if d[0] not in ("store", "system")}
    form = {"Content-Type": "application/x-www-form-urlencoded"}

    async def ihe_pix() -> None:
        response = await client.get("/fhir/Patient/$ihe-pix")
        assert response.status_code == 400 and "sourceIdentifier" in diagnostics(response)

    async def data_availability() -> None:
        response = await client.get("/fhir/Patient/$data-availability")
        assert response.status_code == 400, response.text

    async def conditional_update() -> None:  # the PIXm feed takes registrations from providers
        response = await client.put(
            "/fhir/Patient?identifier=urn:x|1", json=patient(), headers=FHIR_JSON
        )
        assert response.status_code == 403 and "not registered as a provider" in diagnostics(
            response
        )

    async def federated_search() -> None:
        response = await client.get("/fhir/Observation?code=x")
        assert response.status_code == 400 and "must name one person" in diagnostics(response)
        posted = await client.post("/fhir/Observation/_search", content=b"code=x", headers=form)
        assert posted.status_code == 400 and "must name one person" in diagnostics(posted)

    async def federated_read() -> None:
        response = await client.get("/fhir/providers/nowhere/Observation/1")
        assert response.status_code == 404 and "nowhere" in diagnostics(response)

    async def process_message() -> None:
        response = await client.post("/fhir/$process-message", content=b"{}", headers=FHIR_JSON)
        assert response.status_code == 400, response.text

    async def mailbox() -> None:
        listed = await client.get("/fhir/$mailbox")
        assert listed.status_code == 200 and listed.json()["type"] == "searchset"
        one = await client.get("/fhir/$mailbox/1")
        assert one.status_code == 404 and "mailbox holds no message" in diagnostics(one)

    async def acknowledge() -> None:
        response = await client.post("/fhir/$mailbox/1/$acknowledge")
        assert response.status_code == 404 and "mailbox holds no message" in diagnostics(response)

    checks: dict[tuple[str, str], Callable[[], Awaitable[None]]] = {
        ("Patient$", "ihe-pix"): ihe_pix,
        ("Patient$", "data-availability"): data_availability,
        ("Patient", "conditional-update"): conditional_update,
        ("federated", "search-type"): federated_search,
        ("federated", "read"): federated_read,
        ("operation", "process-message"): process_message,
        ("operation", "mailbox"): mailbox,
        ("operation", "acknowledge"): acknowledge,
    }
    assert declared == set(checks), "a declared operation or interaction has no HTTP check here"
    for check in checks.values():
        await check()


async def test_every_declared_search_parameter_is_accepted(
    client: httpx.AsyncClient, app: Any
) -> None:
    statement = await metadata(client)
    federated = federated_only(app)
    failures = []
    for entry in statement["rest"][0]["resource"]:
        rtype = entry["type"]
        if rtype in federated:
            # One search per type naming the person (nobody: no provider is asked) and every
            # other declared parameter; an undeclared one would be a 400 naming it.
            params = [p for p in entry["searchParam"] if p["name"] not in ("patient", "subject")]
            query = "&".join(f"{p['name']}={quote(HARMLESS.get(p['type'], 'x'))}" for p in params)
            for person in {"patient", "subject"} & {p["name"] for p in entry["searchParam"]}:
                response = await client.get(f"/fhir/{rtype}?{person}=Patient/nobody&{query}")
                if response.status_code != 200:
                    failures.append((rtype, person, response.status_code, response.text[:300]))
            continue
        for param in entry["searchParam"]:
            value = HARMLESS[param["type"]]
            response = await client.get(f"/fhir/{rtype}?{param['name']}={quote(value)}")
            if response.status_code != 200:
                failures.append((rtype, param["name"], response.status_code, response.text[:200]))
    assert not failures, failures
    undeclared = await client.get("/fhir/Observation?patient=Patient/nobody&undeclared=x")
    assert undeclared.status_code == 400 and "undeclared" in undeclared.text  # the check has teeth


async def test_declared_modifiers_includes_and_revincludes_are_accepted(
    client: httpx.AsyncClient,
) -> None:
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
        queries += [
            (entry["type"], f"_revinclude={quote(i)}") for i in entry.get("searchRevInclude", [])
        ]
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


def test_capabilities_whose_routes_are_not_mounted_are_not_declared() -> None:
    """Declared ⇒ served when the app is built without the capabilities' routes."""
    statement = capability_statement(
        store_routes(), load_search_params(HUB_TYPES), "http://hub.example/fhir"
    )
    rest = statement["rest"][0]
    assert "operation" not in rest
    assert {r["type"] for r in rest["resource"]} == set(HUB_TYPES)
    assert resource(statement, "Patient")["conditionalUpdate"] is False
    assert "operation" not in resource(statement, "Patient")
    assert "providers/{provider}" not in rest["documentation"]
