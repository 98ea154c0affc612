"""The CapabilityStatement (hl7.org/fhir/R4/capabilitystatement.html), built from what is served.

Interactions are read off the app's own routes, and search parameters off the store's
loaded definitions, so the statement cannot claim what the server does not do
(``tests/store/test_capability.py`` checks it against the routes).
"""

from __future__ import annotations

from typing import Any

from starlette.routing import BaseRoute, Route

from sharedcare import __version__
from sharedcare.store import routes as r
from sharedcare.store.search_parse import MODIFIERS
from sharedcare.store.searchparams import SearchParam

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


def served_interactions(app_routes: list[BaseRoute]) -> tuple[set[str], set[str]]:
    """(type-level, system-level) interaction codes that the given routes serve."""
    endpoints = {route.endpoint for route in app_routes if isinstance(route, Route)}
    type_level = {code for fn, code in TYPE_INTERACTIONS.items() if fn in endpoints}
    system_level = {code for fn, codes in SYSTEM_INTERACTIONS.items() if fn in endpoints for code in codes}
    return type_level, system_level


def capability_statement(
    app_routes: list[BaseRoute], params: dict[str, dict[str, SearchParam]], base: str
) -> dict[str, Any]:
    type_level, system_level = served_interactions(app_routes)
    resources = []
    for rtype in sorted(params):
        search_params = [
            {"name": "_id", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id"},
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
                "documentation": "Modifiers: " + ", ".join(sorted(":" + m for m in MODIFIERS[p.type])),
            }
            for p in sorted(params[rtype].values(), key=lambda p: p.code)
        ]
        references = sorted(f"{rtype}:{p.code}" for p in params[rtype].values() if p.type == "reference")
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
                    for p in sorted(params[src].values(), key=lambda p: p.code)
                    if p.type == "reference" and (not p.targets or rtype in p.targets)
                ],
                "searchParam": search_params,
            }
        )
    return {
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
                    "Search: parameters AND when repeated, OR when comma-separated; _count "
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
                            "extension": [{"url": "token", "valueUri": f"{base.rsplit('/fhir', 1)[0]}/oauth2/token"}],
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
                "resource": resources,
                "interaction": [{"code": c} for c in sorted(system_level)],
            }
        ],
    }


async def metadata(request: Any) -> Any:
    """GET /fhir/metadata: public, no token needed (SMART: the statement is discoverable)."""
    from sharedcare.fhir.responses import fhir_json

    app = request.app
    if getattr(app.state, "capability", None) is None:
        app.state.capability = capability_statement(
            app.router.routes, app.state.fhir.store.params, app.state.settings.fhir_base
        )
    return fhir_json(app.state.capability)
