"""How the patient index (issue 4) plugs into the hub: registration feeds, ``$ihe-pix``,
``$data-availability``, and the PDS trace worker.

Routes (mounted before the store's generic FHIR routes):

=========================================================  =====================================
``PUT /fhir/Patient?identifier=system|value``              IHE PIXm Patient Identity Feed
                                                           (ITI-104): create or update a provider's
                                                           registration (201 / 200).
``POST /fhir/Patient``                                     From a provider system: a registration.
                                                           From any other system: the store's own
                                                           create (an operator writing a Patient).
``GET /fhir/Patient/$ihe-pix``                             IHE PIXm query (ITI-83).
``GET /fhir/Patient/$data-availability``                   Which providers hold records for a
                                                           person (no clinical data).
=========================================================  =====================================

:func:`lifespan` puts the :class:`PatientIndex` on ``app.state.pix``, runs the trace worker
(when ``SHAREDCARE_PDS_BASE_URL`` is set) and refreshes the count metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from sharedcare.fhir.errors import FHIRError
from sharedcare.fhir.responses import fhir_json
from sharedcare.iam.context import access
from sharedcare.pix import queries
from sharedcare.pix.connections import connection_failures_as_503
from sharedcare.pix.index import STATUSES, PatientIndex, RegisterResult
from sharedcare.pix.metrics import record_registration, set_counts
from sharedcare.pix.registration import (
    Refused,
    Registration,
    parse_registration,
    parse_token,
    refuse,
)
from sharedcare.pix.tracing import Tracer, TraceResult, trace_worker
from sharedcare.queue.store import keep_done_seconds
from sharedcare.registry.model import System
from sharedcare.store import routes as store_routes

log = structlog.get_logger("sharedcare.pix")
STATUS_SYSTEM = "https://sharedcare.example.org/fhir/CodeSystem/pix-link-status"
# What /fhir/metadata declares for these routes (merged by sharedcare.store.capability).
CAPABILITY: dict[str, Any] = {
    "routes": (
        ("GET", "/fhir/Patient/$ihe-pix"),
        ("GET", "/fhir/Patient/$data-availability"),
        ("POST", "/fhir/Patient"),
        ("PUT", "/fhir/Patient"),
    ),
    "resource": [
        {
            "type": "Patient",
            "documentation": (
                "From a provider system, POST /fhir/Patient and PUT /fhir/Patient?identifier="
                "system|value (IHE PIXm Patient Identity Feed, ITI-104) register the person in the "
                "patient index and answer with the registration and its link status."
            ),
            "conditionalUpdate": True,
            "operation": [
                {
                    "name": "ihe-pix",
                    "definition": "https://profiles.ihe.net/ITI/PIXm/OperationDefinition/IHE.PIXm.pix",
                    "documentation": "IHE PIXm query (ITI-83): sourceIdentifier, targetSystem.",
                },
                {
                    "name": "data-availability",
                    "definition": "https://sharedcare.example.org/fhir/OperationDefinition/Patient-data-availability",
                    "documentation": (
                        "Which provider systems hold records for a person (no clinical data): "
                        "identifier=system|value or patient=Patient/{id}."
                    ),
                },
            ],
        }
    ],
}


async def _provider(request: Request) -> System | None:
    """The caller's registry entry when it is a provider system, else None."""
    system = await request.app.state.iam.registry.lookup(access(request).client_id)
    return system if system is not None and system.is_provider else None


def _not_a_provider(request: Request) -> Refused:
    return refuse(
        "not_provider",
        403,
        "forbidden",
        f"{access(request).client_id} is not registered as a provider system, so it cannot register "
        "people in the index (IHE PIXm feed). Writing the hub's own Patient resources needs an "
        "operator token with end-user context.",
    )


async def create_patient(request: Request) -> Response:
    """POST /fhir/Patient: a provider's registration, else the store's create."""
    provider = await _provider(request)
    if provider is None:
        context = access(request)
        if (
            not context.has_end_user
        ):  # the middleware lets Patient writes through for providers only
            record_registration(context.client_id, "refused", "not_provider")
            raise _not_a_provider(request).error
        request.scope.setdefault("path_params", {})["type"] = "Patient"  # the store's route shape
        return await store_routes.create(request)
    return await _register(request, provider, None)


async def feed(request: Request) -> Response:
    """PUT /fhir/Patient?identifier=system|value (IHE PIXm ITI-104)."""
    provider = await _provider(request)
    if provider is None:
        record_registration(access(request).client_id, "refused", "not_provider")
        raise _not_a_provider(request).error
    values = request.query_params.getlist("identifier")
    try:
        if len(values) != 1:
            raise refuse(
                "malformed",
                400,
                "invalid",
                "The PIXm feed is PUT /fhir/Patient?identifier=system|value with exactly one identifier: "
                "your local identifier for this person.",
            )
        url_identifier = parse_token(values[0])
    except Refused as refused:
        record_registration(provider.client_id, "refused", refused.reason)
        raise refused.error from None
    return await _register(request, provider, url_identifier)


async def _register(
    request: Request, provider: System, url_identifier: tuple[str, str] | None
) -> Response:
    index: PatientIndex = request.app.state.pix
    try:
        try:
            body = await store_routes.json_body(request)
        except FHIRError as exc:
            raise Refused("malformed", exc) from None
        registration = parse_registration(body, provider, url_identifier=url_identifier)
        try:
            result = await index.register(registration)
        except FHIRError as exc:  # validation of the golden record; a concurrent conflicting write
            raise Refused("conflict" if exc.status == 409 else "malformed", exc) from None
    except Refused as refused:
        record_registration(provider.client_id, "refused", refused.reason)
        log.info("registration refused", provider=provider.client_id, reason=refused.reason)
        raise refused.error from None
    outcome = "created" if result.created else ("updated" if result.changed else "unchanged")
    record_registration(provider.client_id, outcome)
    worker = getattr(request.app.state, "pix_worker", None)
    if worker is not None and result.changed:
        worker.wake()
    return _registered(request, registration, result)


def _registered(request: Request, reg: Registration, result: RegisterResult) -> Response:
    """The registration as the hub holds it, with its status as a meta tag."""
    base = request.app.state.settings.fhir_base
    identifiers = [{"system": reg.system, "value": reg.value}]
    if reg.nhs_number:
        identifiers.append({"system": queries.NHS_NUMBER_SYSTEM, "value": reg.nhs_number})
    d = reg.demographics
    body: dict[str, Any] = {
        "resourceType": "Patient",
        "meta": {"tag": [{"system": STATUS_SYSTEM, "code": result.status}]},
        "identifier": identifiers,
        "name": [{"family": d.family, "given": [d.given]}],
        "gender": d.gender,
        "birthDate": d.birth_date,
    }
    if d.postcode:
        body["address"] = [{"postalCode": d.postcode}]
    headers: dict[str, str] = {}
    if result.person_id:
        body["link"] = [{"other": {"reference": f"Patient/{result.person_id}"}, "type": "seealso"}]
        headers["Location"] = f"{base}/Patient/{result.person_id}"
    return fhir_json(body, 201 if result.created else 200, headers)


Endpoint = Callable[[Request], Awaitable[Response]]


def _db_failures_as_503(endpoint: Endpoint) -> Endpoint:
    """A database without a free connection (pool exhausted, server out of connections,
    connection lost) answers 503 with Retry-After, whichever step met it — the index, the
    registry, the store — never a 500."""

    @functools.wraps(endpoint)
    async def wrapped(request: Request) -> Response:
        async with connection_failures_as_503():
            return await endpoint(request)

    return wrapped


def routes() -> list[BaseRoute]:
    return [
        Route("/fhir/Patient/$ihe-pix", _db_failures_as_503(queries.ihe_pix), methods=["GET"]),
        Route(
            "/fhir/Patient/$data-availability",
            _db_failures_as_503(queries.data_availability),
            methods=["GET"],
        ),
        Route("/fhir/Patient", _db_failures_as_503(create_patient), methods=["POST"]),
        Route("/fhir/Patient", _db_failures_as_503(feed), methods=["PUT"]),
    ]


async def _refresh_counts(index: PatientIndex, every: float) -> None:
    while True:
        try:
            people, links = await index.counts()
            set_counts(people, links, STATUSES)
        except Exception:
            log.warning("pix count refresh failed", exc_info=True)
        await asyncio.sleep(every)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    settings = app.state.settings
    index = PatientIndex(app.state.db, app.state.fhir.store, keep_connections=True)
    app.state.pix = index
    app.state.pix_worker = None
    app.state.pix_domains = queries.Domains(
        app.state.iam.registry, ttl=max(1.0, settings.registry_cache_seconds)
    )
    tasks = [asyncio.create_task(_refresh_counts(index, settings.pix_count_seconds))]
    tracer: Tracer | None = None
    if settings.pds_base_url:
        tracer = Tracer(settings.pds_base_url, timeout_s=settings.pds_timeout_seconds)

        async def on_result(registration_id: str, result: TraceResult) -> None:
            await index.apply_trace(registration_id, result)

        worker = trace_worker(
            app.state.db,
            tracer,
            on_result,
            concurrency=settings.pix_trace_concurrency,
            keep_done=keep_done_seconds(settings.queue_keep_done_hours),
        )
        app.state.pix_worker = worker
        tasks.append(asyncio.create_task(worker.run()))
    try:
        yield
    finally:
        if app.state.pix_worker is not None:
            app.state.pix_worker.stop()
        for task in tasks[1:]:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
        tasks[0].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[0]
        if tracer is not None:
            await tracer.aclose()
        await index.close()
