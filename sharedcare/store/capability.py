"""The CapabilityStatement (hl7.org/fhir/R4/capabilitystatement.html), built from what is served.

Interactions are read off the app's own routes, and search parameters off the store's
loaded definitions, so the statement cannot claim what the server does not do
(``tests/store/test_capability.py`` checks it against the routes).

Routes outside the store (the patient index, the federated query, messaging) are declared by
their own modules: each of :data:`CONTRIBUTORS` has a ``CAPABILITY`` dict with ``routes``
((method, path) pairs) and optionally ``documentation`` (appended to rest.documentation),
system-level ``operation`` entries and ``resource`` entries (merged into the store's entry for
the same type, else added). A contribution is declared only when all its routes are mounted.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Mapping
from typing import Any

from starlette.routing import BaseRoute, Route

from sharedcare import __version__
from sharedcare.store import routes as r
from sharedcare.store.search_parse import MODIFIERS
from sharedcare.store.searchparams import OWN_TABLE_PARAMS, SearchParam

TYPE_INTERACTIONS = {
    r.read: "read",
    r.vread: "vread",
    r.update: "update",
    r.delete: "delete",
    r.instance_history: "history-instance",
    r.type_history: "history-type",
    r.create: "create",
    r.search: "search-type",
}
SYSTEM_INTERACTIONS = {r.bundle: ("transaction", "batch")}
# Modules that serve FHIR routes outside the store, each with a CAPABILITY declaration.
CONTRIBUTORS = ("sharedcare.pix.hub", "sharedcare.query.hub", "sharedcare.messaging.routes")


def served_interactions(app_routes: list[BaseRoute]) -> tuple[set[str], set[str]]:
    """(type-level, system-level) interaction codes that the given routes serve."""
    endpoints = {route.endpoint for route in app_routes if isinstance(route, Route)}
    type_level = {code for fn, code in TYPE_INTERACTIONS.items() if fn in endpoints}
    system_level = {
        code for fn, codes in SYSTEM_INTERACTIONS.items() if fn in endpoints for code in codes
    }
    return type_level, system_level


def mounted_contributions(app_routes: list[BaseRoute]) -> list[Mapping[str, Any]]:
    """The ``CAPABILITY`` of each contributor whose routes are all mounted in ``app_routes``."""
    mounted = {
        (method, route.path)
        for route in app_routes
        if isinstance(route, Route)
        for method in route.methods or ()
    }
    out = []
    for name in CONTRIBUTORS:
        declared: Mapping[str, Any] = importlib.import_module(name).CAPABILITY
        if set(declared["routes"]) <= mounted:
            out.append(declared)
    return out


def _merge(
    resources: list[dict[str, Any]], contributions: Iterable[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """The store's resource entries with each contribution's merged in (one entry per type)."""
    by_type = {entry["type"]: entry for entry in resources}
    for contribution in contributions:
        for extra in contribution.get("resource", ()):
            entry = by_type.get(extra["type"])
            if entry is None:
                by_type[extra["type"]] = dict(extra)
                continue
            for key, value in extra.items():
                if key == "operation":
                    entry["operation"] = [*entry.get("operation", ()), *value]
                elif key == "documentation" and "documentation" in entry:
                    entry["documentation"] = f"{entry['documentation']} {value}"
                else:
                    entry[key] = value
    return [by_type[t] for t in sorted(by_type)]


def capability_statement(
    app_routes: list[BaseRoute],
    params: dict[str, dict[str, SearchParam]],
    base: str,
    contributions: Iterable[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """The statement for ``app_routes``; ``contributions`` default to the mounted CONTRIBUTORS'."""
    contributions = list(
        mounted_contributions(app_routes) if contributions is None else contributions
    )
    type_level, system_level = served_interactions(app_routes)
    resources = []
    for rtype in sorted(params):
        search_params = [
            {
                "name": "_id",
                "type": "token",
                "definition": "http://hl7.org/fhir/SearchParameter/Resource-id",
            },
            {
                "name": "_lastUpdated",
                "type": "date",
                "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated",
            },
        ]
        search_params += [
            {
                "name": p.code,
                "type": p.type,
                "definition": p.url,
                "documentation": "Modifiers: "
                + ", ".join(sorted(":" + m for m in MODIFIERS[p.type])),
            }
            for p in sorted(params[rtype].values(), key=lambda p: p.code)
        ]
        joined = rtype not in OWN_TABLE_PARAMS
        references = sorted(
            f"{rtype}:{p.code}" for p in params[rtype].values() if p.type == "reference" and joined
        )
        resources.append(
            {
                "type": rtype,
                "interaction": [{"code": c} for c in sorted(type_level)],
                "versioning": "versioned-update",
                "readHistory": True,
                "updateCreate": True,
                "conditionalCreate": True,
                "conditionalRead": "not-supported",
                "conditionalUpdate": False,
                "conditionalDelete": "not-supported",
                "searchInclude": references,
                "searchRevInclude": [
                    f"{src}:{p.code}"
                    for src in sorted(params)
                    if joined and src not in OWN_TABLE_PARAMS
                    for p in sorted(params[src].values(), key=lambda p: p.code)
                    if p.type == "reference" and (not p.targets or rtype in p.targets)
                ],
                "searchParam": search_params,
            }
        )
    statement: dict[str, Any] = {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "publisher": "sharedcare",
        "kind": "instance",
        "software": {"name": "sharedcare", "version": __version__},
        "implementation": {"description": "sharedcare regional hub", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "documentation": (
                    "Search of the hub's own types: parameters AND when repeated, OR when comma-separated; _count "
                    "(max per server setting), _sort=_lastUpdated|-_lastUpdated, "
                    "_total=accurate|none, _include and _revinclude (one level); unknown "
                    "parameters give 400 unless Prefer: handling=lenient."
                ),
                # SMART Backend Services (hl7.org/fhir/smart-app-launch/conformance.html):
                # the token endpoint, also in /.well-known/smart-configuration.
                "security": {
                    "extension": [
                        {
                            "url": "http://fhir-registry.smarthealthit.org/StructureDefinition/oauth-uris",
                            "extension": [
                                {
                                    "url": "token",
                                    "valueUri": f"{base.rsplit('/fhir', 1)[0]}/oauth2/token",
                                }
                            ],
                        }
                    ],
                    "service": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/restful-security-service",
                                    "code": "SMART-on-FHIR",
                                }
                            ]
                        }
                    ],
                    "description": "Bearer tokens from POST /oauth2/token (SMART Backend Services).",
                },
                "resource": _merge(resources, contributions),
                "interaction": [{"code": c} for c in sorted(system_level)],
            }
        ],
    }
    rest = statement["rest"][0]
    rest["documentation"] = " ".join(
        [
            rest["documentation"],
            *(c["documentation"] for c in contributions if "documentation" in c),
        ]
    )
    operations = [op for c in contributions for op in c.get("operation", ())]
    if operations:
        rest["operation"] = operations
    return statement


async def metadata(request: Any) -> Any:
    """GET /fhir/metadata: public, no token needed (SMART: the statement is discoverable)."""
    from sharedcare.fhir.responses import fhir_json

    app = request.app
    if getattr(app.state, "capability", None) is None:
        app.state.capability = capability_statement(
            app.router.routes, app.state.fhir.store.params, app.state.settings.fhir_base
        )
    return fhir_json(app.state.capability)
