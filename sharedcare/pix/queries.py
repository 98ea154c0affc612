"""The index's read operations: IHE PIXm ``$ihe-pix`` (ITI-83) and ``$data-availability``.

``$ihe-pix`` (profiles.ihe.net/ITI/PIXm, ITI-83) answers a Parameters resource with one
``targetIdentifier`` per cross-referenced identifier and ``targetId`` references to the
Patient resources (the hub's golden Patient, and each provider's Patient where the registry
knows its FHIR base). Errors as ITI-83 §2:3.83.4.1.3 prescribes:

* 400 when the sourceIdentifier's domain (system) is not known to the hub;
* 403 when a targetSystem is not a known domain;
* 404 when the domain is known but the identifier is not (or is registered but not verified:
  an unverified registration is never cross-referenced).

Only verified linkages are returned: the same rule that decides query routing.

``$data-availability`` tells a consumer which providers hold records for a person — the
registry's provider ids and organisations, with each linkage's last-updated time, never any
clinical data or local identifiers. Only consumer systems (kind consumer or both) may ask, for
a direct-care purpose (:data:`DIRECT_CARE`); every answer is audited like a release.

Both need ``system/Patient.s`` and the end-user context (the middleware's rule for patient
data): where a person receives care is itself sensitive.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import structlog
from starlette.requests import Request
from starlette.responses import Response

from sharedcare.audit.record import MINOR_FAILURE, SUCCESS, AuditRecord
from sharedcare.fhir.errors import FHIRError
from sharedcare.fhir.responses import fhir_json
from sharedcare.iam.context import AccessContext, access
from sharedcare.pix.connections import is_connection_failure
from sharedcare.pix.index import VERIFIED, PatientIndex, Person
from sharedcare.pix.metrics import record_availability, record_query
from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM, explain_invalid, normalise_nhs_number
from sharedcare.registry.service import Registry

log = structlog.get_logger("sharedcare.pix")
DIRECT_CARE: Final = frozenset({"TREAT", "ETREAT", "BTG", "CAREMGT", "COC", "PATRQT"})


class Domains:
    """The identifier systems the hub knows (NHS number + every registered system's), cached."""

    def __init__(self, registry: Registry, ttl: float = 2.0):
        self.registry = registry
        self.ttl = ttl
        self._at = -1e9
        self._owners: dict[str, str] = {}
        self._bases: dict[str, str] = {}
        self._lock = asyncio.Lock()

    async def _refresh(self) -> None:
        if time.monotonic() - self._at <= self.ttl:
            return
        async with self._lock:  # one refresh at a time, not one per concurrent request
            if time.monotonic() - self._at <= self.ttl:
                return
            owners: dict[str, str] = {}
            bases: dict[str, str] = {}
            try:
                systems = await self.registry.systems()
            except Exception as exc:
                if not is_connection_failure(exc) or self._at < 0:
                    raise
                # Keep answering from the last known domains while the database is
                # saturated; try again after another ttl.
                log.warning("pix domains refresh failed; using the cached ones", error=repr(exc))
                self._at = time.monotonic()
                return
            for system in systems:
                for ident in system.identifier_systems:
                    owners.setdefault(ident, system.client_id)
                if system.fhir_base:
                    bases[system.client_id] = system.fhir_base.rstrip("/")
            self._owners, self._bases, self._at = owners, bases, time.monotonic()

    async def owners(self) -> dict[str, str]:
        """identifier system → client id of the system that owns it."""
        await self._refresh()
        return self._owners

    async def fhir_base(self, client_id: str) -> str | None:
        """The registered FHIR base of a provider system."""
        await self._refresh()
        return self._bases.get(client_id)

    async def known(self, system: str) -> bool:
        return system == NHS_NUMBER_SYSTEM or system in await self.owners()


def _outcome(status: int, code: str, message: str, metric: str) -> FHIRError:
    record_query(metric)
    return FHIRError.of(status, code, message)


async def ihe_pix(request: Request) -> Response:
    """GET /fhir/Patient/$ihe-pix?sourceIdentifier=system|value[&targetSystem=...]."""
    params = request.query_params
    sources = params.getlist("sourceIdentifier")
    if len(sources) != 1 or "|" not in sources[0]:
        raise _outcome(
            400, "invalid", "$ihe-pix needs exactly one sourceIdentifier=system|value.", "invalid"
        )
    system, _, value = sources[0].partition("|")
    if not system or not value:
        raise _outcome(
            400, "invalid", "sourceIdentifier must be system|value with both parts.", "invalid"
        )
    domains: Domains = request.app.state.pix_domains
    if not await domains.known(system):
        raise _outcome(
            400,
            "code-invalid",
            f"sourceIdentifier Assigning Authority not found: {system}",
            "unknown_source",
        )
    targets = [t for raw in params.getlist("targetSystem") for t in raw.split(",") if t]
    for target in targets:
        if not await domains.known(target):
            raise _outcome(
                403, "code-invalid", f"targetSystem not found: {target}", "unknown_target"
            )
    person, source_link = await _resolve(request.app.state.pix, system, value)
    if person is None:
        raise _outcome(
            404,
            "not-found",
            f"sourceIdentifier Patient Identifier not found: {system}|{value}",
            "not_found",
        )
    base = request.app.state.settings.fhir_base
    wanted = set(targets)
    parameters: list[dict[str, Any]] = []
    if (
        person.nhs_number
        and system != NHS_NUMBER_SYSTEM
        and (not wanted or NHS_NUMBER_SYSTEM in wanted)
    ):
        parameters.append(
            {
                "name": "targetIdentifier",
                "valueIdentifier": {"system": NHS_NUMBER_SYSTEM, "value": person.nhs_number},
            }
        )
    provider_ids: list[str] = []
    for link in person.routable:
        if (link.system, link.value) == source_link or (wanted and link.system not in wanted):
            continue
        parameters.append(
            {
                "name": "targetIdentifier",
                "valueIdentifier": {"system": link.system, "value": link.value},
            }
        )
        fhir_base = await domains.fhir_base(link.provider)
        if fhir_base:
            parameters.append(
                {
                    "name": "targetId",
                    "valueReference": {"reference": f"{fhir_base}/Patient/{link.value}"},
                }
            )
        provider_ids.append(link.provider)
    parameters.append(
        {"name": "targetId", "valueReference": {"reference": f"{base}/Patient/{person.id}"}}
    )
    await _audit(request, person, tuple(dict.fromkeys(provider_ids)))
    record_query("ok")
    return fhir_json({"resourceType": "Parameters", "parameter": parameters})


async def _resolve(
    index: PatientIndex, system: str, value: str
) -> tuple[Person | None, tuple[str, str] | None]:
    """The person a source identifier names, through a verified linkage only."""
    if system == NHS_NUMBER_SYSTEM:
        if explain_invalid(value) is not None:
            return None, None
        return await index.find(nhs_number=normalise_nhs_number(value)), None
    found = await index.find_link(system, value)
    if found is None or found[0].status != VERIFIED:
        return None, None
    return found[1], (system, value)


async def data_availability(request: Request) -> Response:
    """GET /fhir/Patient/$data-availability?identifier=system|value or ?patient=Patient/{id}."""
    context = access(request)
    consumer = await request.app.state.iam.registry.lookup(context.client_id)
    if consumer is None or consumer.kind not in ("consumer", "both"):
        record_availability(context.client_id, "refused")
        raise FHIRError.of(
            403,
            "forbidden",
            "Only consumer systems may ask which providers hold records for a person.",
        )
    if context.reason_for_access not in DIRECT_CARE:
        record_availability(context.client_id, "refused")
        await _audit(
            request, None, (), refused=f"reason {context.reason_for_access} is not direct care"
        )
        raise FHIRError.of(
            403,
            "forbidden",
            f"Data availability is answered for direct care only (reason_for_access one of "
            f"{', '.join(sorted(DIRECT_CARE))}); this token says {context.reason_for_access}.",
        )
    index: PatientIndex = request.app.state.pix
    identifiers = request.query_params.getlist("identifier")
    patients = request.query_params.getlist("patient")
    if len(identifiers) + len(patients) != 1:
        record_availability(context.client_id, "invalid")
        raise FHIRError.of(
            400, "invalid", "Give exactly one of identifier=system|value or patient=Patient/{id}."
        )
    person: Person | None
    if patients:
        person = await index.find(person_id=patients[0].removeprefix("Patient/"))
    else:
        system, _, value = identifiers[0].partition("|")
        if not system or not value:
            record_availability(context.client_id, "invalid")
            raise FHIRError.of(400, "invalid", "identifier must be system|value with both parts.")
        if not await request.app.state.pix_domains.known(system):
            record_availability(context.client_id, "invalid")
            raise FHIRError.of(
                400, "code-invalid", f"Identifier system not known to the hub: {system}"
            )
        person, _ = await _resolve(index, system, value)
    if person is None:
        record_availability(context.client_id, "not_found")
        raise FHIRError.of(
            404,
            "not-found",
            "No person in the index matches (or none through a verified registration).",
        )
    latest: dict[str, Any] = {}
    for link in person.routable:
        if link.provider not in latest or link.updated > latest[link.provider]:
            latest[link.provider] = link.updated
    registry = request.app.state.iam.registry
    parameters: list[dict[str, Any]] = [
        {"name": "patient", "valueReference": {"reference": f"Patient/{person.id}"}}
    ]
    for provider_id, updated in sorted(latest.items()):
        parts: list[dict[str, Any]] = [{"name": "id", "valueString": provider_id}]
        provider = await registry.lookup(provider_id)
        if provider is not None and provider.organization_id:
            org: dict[str, Any] = {"reference": f"Organization/{provider.organization_id}"}
            if provider.organization_name:
                org["display"] = provider.organization_name
            parts.append({"name": "organization", "valueReference": org})
        parts.append(
            {"name": "lastUpdated", "valueInstant": updated.isoformat(timespec="seconds") + "Z"}
        )
        parameters.append({"name": "provider", "part": parts})
    await _audit(request, person, tuple(latest))
    record_availability(context.client_id, "ok")
    return fhir_json({"resourceType": "Parameters", "parameter": parameters})


async def _audit(
    request: Request, person: Person | None, providers: tuple[str, ...], refused: str | None = None
) -> None:
    """Record the answer durably before it is sent (it reveals where a person receives care)."""
    context: AccessContext = access(request)
    user = context.requesting_user
    query = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    record = AuditRecord(
        action="operation",
        request_id=str(request.scope.get("state", {}).get("request_id") or "-"),
        client_id=context.client_id,
        query=f"GET {query}",
        outcome=MINOR_FAILURE if refused else SUCCESS,
        outcome_desc=refused,
        user_id=user.id if user else None,
        user_name=user.name if user else None,
        user_role=user.role if user else None,
        purpose_of_use=context.reason_for_access,
        organization=context.requesting_organization,
        patient=f"Patient/{person.id}" if person else None,
        nhs_number=person.nhs_number if person else None,
        providers=providers,
        client_address=request.client.host if request.client else None,
    )
    await request.app.state.audit.record(record)
