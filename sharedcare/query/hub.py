"""How the synchronous federated query (issue 6): fan-out, merge, provider proxy plugs into the hub app.

:func:`routes` are mounted before the store's generic FHIR routes; :func:`lifespan` runs
inside the app's lifespan after the database, store, IAM and audit writer are on
``app.state`` (``db``, ``store`` via ``app.state.fhir.store``, ``fhir``, ``iam``, ``audit``,
``settings``), in the order pix, consent, query, messaging.

Routes (the type segment only matches clinical types the hub does not own, so every other
type falls through to the store):

- ``GET /fhir/{Type}?...`` and ``POST /fhir/{Type}/_search``: the federated search.
  DocumentReference is held both by the hub (documents uploaded to it) and by providers:
  a DocumentReference search that names the person by NHS number (``patient.identifier`` or
  ``subject:Patient.identifier``) is federated; any other goes to the hub's own store.
- ``GET /fhir/providers/{provider}/{Type}/{id}``: a provider's resource, proxied.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import parse_qsl

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from sharedcare.fhir.errors import FHIRError
from sharedcare.query.metrics import refresh_maxima
from sharedcare.query.params import federated_types, is_federated
from sharedcare.query.providers import ProviderClients
from sharedcare.query.service import Federation
from sharedcare.store import routes as store_routes


class FederatedType(Convertor[str]):
    """A path segment naming a type the federated query answers."""

    regex = "|".join(sorted(federated_types()))

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("federated", FederatedType())


def _capability() -> dict[str, object]:
    """What /fhir/metadata declares for these routes (merged by sharedcare.store.capability)."""
    from sharedcare.query.params import NHS_NUMBER_SYSTEM, SHARED_TYPES
    from sharedcare.store.searchparams import load_search_params

    person = (
        f"Names the one person searched for: Patient/{{hub person id}}, or chained "
        f"patient.identifier (subject:Patient.identifier)={NHS_NUMBER_SYSTEM}|{{NHS number}}."
    )
    read = (
        "Only at the provider-qualified URL GET [base]/providers/{{provider}}/{rtype}/{{id}}, the "
        "fullUrl of each entry of a federated search: fetched from that provider, consent-filtered "
        "and audited. [base]/{rtype}/{{id}} is not served."
    )
    search = (
        "Federated: fanned out to every provider holding records for the person, merged, "
        "paged with _count and a next link; a provider that fails or exceeds the wait "
        "(X-Provider-Wait-Time) gives an OperationOutcome entry. Other parameters are forwarded "
        "to the providers as given."
    )
    types = sorted(federated_types())
    params = load_search_params([t for t in types if t not in SHARED_TYPES])
    resources: list[dict[str, object]] = []
    for rtype in types:
        if rtype in SHARED_TYPES:  # the store's entry, plus the federated pathway
            resources.append(
                {
                    "type": rtype,
                    "documentation": (
                        f"A search naming the person by NHS number (patient.identifier or "
                        f"subject:Patient.identifier={NHS_NUMBER_SYSTEM}|{{n}}) is federated to "
                        f"the providers; any other searches the hub's own. A provider's DocumentReference "
                        f"is read at [base]/providers/{{provider}}/DocumentReference/{{id}}, the "
                        f"fullUrl of each federated entry."
                    ),
                }
            )
            continue
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
            {"name": p.code, "type": p.type, "definition": p.url}
            | ({"documentation": person} if p.code in ("patient", "subject") else {})
            for p in sorted(params[rtype].values(), key=lambda p: p.code)
        ]
        resources.append(
            {
                "type": rtype,
                "documentation": "Held by the provider systems, not the hub.",
                "interaction": [
                    {"code": "read", "documentation": read.format(rtype=rtype)},
                    {"code": "search-type", "documentation": search},
                ],
                "searchParam": search_params,
            }
        )
    return {
        "documentation": (
            "Federated query: a search of a type the providers hold names one person and is "
            "answered from every provider holding their records. Each entry's fullUrl is "
            "[base]/providers/{provider}/{type}/{id}, where GET reads that resource from the "
            "provider (any R4 type; consent-filtered and audited)."
        ),
        "routes": (
            ("GET", "/fhir/providers/{provider}/{type}/{id}"),
            ("POST", "/fhir/{type:federated}/_search"),
            ("GET", "/fhir/{type:federated}"),
        ),
        "resource": resources,
    }


CAPABILITY = _capability()


def _federation(request: Request) -> Federation:
    return request.app.state.query  # type: ignore[no-any-return]


async def search(request: Request) -> Response:
    rtype = request.path_params["type"]
    items = list(request.query_params.multi_items())
    if request.method == "POST":  # POST [type]/_search with a form body (search.html#Introduction)
        media = request.headers.get("content-type", "").split(";")[0].strip()
        if media != "application/x-www-form-urlencoded":
            raise FHIRError.of(
                415, "not-supported", "POST _search takes application/x-www-form-urlencoded."
            )
        limit = request.app.state.settings.max_body_bytes
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise FHIRError.of(
                413, "too-costly", f"The request body is larger than the limit of {limit} bytes."
            )
        raw = await request.body()  # cached: the store's handler can read it again
        items += parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
    if not is_federated(rtype, items):
        return await store_routes.search(request)  # the hub's own DocumentReferences
    return await _federation(request).search(
        request, rtype, items, lenient=store_routes.lenient(request)
    )


async def proxied_read(request: Request) -> Response:
    p = request.path_params
    return await _federation(request).read(request, p["provider"], p["type"], p["id"])


def routes() -> list[BaseRoute]:
    return [
        Route("/fhir/providers/{provider}/{type}/{id}", proxied_read, methods=["GET"]),
        Route("/fhir/{type:federated}/_search", search, methods=["POST"]),
        Route("/fhir/{type:federated}", search, methods=["GET"]),
    ]


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    s = app.state.settings
    clients = ProviderClients(
        connections=s.query_provider_connections,
        connect_timeout=s.query_connect_timeout_ms / 1000,
        breaker_failures=s.query_breaker_failures,
        breaker_open_seconds=s.query_breaker_open_seconds,
    )
    app.state.query = Federation(s, clients)

    async def publish_maxima() -> None:
        while True:
            refresh_maxima()
            await asyncio.sleep(5)

    task = asyncio.create_task(publish_maxima(), name="query-metrics")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await clients.close()
