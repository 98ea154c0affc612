"""The synchronous federated query: find the person, ask their providers in parallel, merge.

One :class:`Federation` per hub process (on ``app.state.query``). A search:

1. parses the request (:mod:`sharedcare.query.params`) and the provider wait;
2. finds the person in the patient index (``app.state.pix``), or continues a signed cursor;
3. opens the release gate (``app.state.release``: consent for this caller and person);
4. asks every provider with a verified link, in parallel, with that provider's local
   patient id, each within the wait (:mod:`sharedcare.query.providers`);
5. decides consent for every resource and queues the audit record, which then commits
   while the answer is rendered (:mod:`sharedcare.query.merge`): hub ``fullUrl``\\ s, one
   OperationOutcome entry per impaired provider, paging and total;
6. answers once the audit record is durable.

The internal round trip (the hub's own time) is measured as ARCHITECTURE says: from the hub
receiving the request (its first middleware, so authentication counts) to the last provider
request being sent, plus from the last provider answer's last byte to the response being
ready.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import structlog
from starlette.requests import Request
from starlette.responses import Response

from sharedcare.fhir.bundles import BundleWriter
from sharedcare.fhir.errors import FHIRError, Issue, operation_outcome
from sharedcare.fhir.responses import fhir_json
from sharedcare.iam.context import access
from sharedcare.query import cursor as cursors
from sharedcare.query.merge import (
    Stamp,
    check_resource,
    check_searchset,
    impairment,
    outcome_entry,
    take,
)
from sharedcare.query.metrics import record_query
from sharedcare.query.params import Search, parse_search, provider_wait, uses_patient_param
from sharedcare.query.providers import Fetched, ProviderClients
from sharedcare.settings import Settings

log = structlog.get_logger("sharedcare.query")
ID_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-.")


@dataclass(frozen=True, slots=True)
class Target:
    """One provider to ask: its id, name, FHIR base and what to fetch."""

    provider: str
    name: str | None
    base: str | None  # None: not registered as a reachable provider
    url: str = ""
    skip: int = 0
    key: str = ""  # the provider's key in a cursor (provider id, or id~n for a second record)


def _unavailable(what: str) -> FHIRError:
    return FHIRError.of(
        503, "transient", f"The {what} is not available in this hub process; retry shortly."
    )


class Federation:
    """Federated search and proxied reads for one hub process."""

    def __init__(self, settings: Settings, clients: ProviderClients) -> None:
        self.settings = settings
        self.clients = clients
        self.hub = settings.fhir_base

    # -- collaborators (other capabilities, found on app.state) -------------------------
    @staticmethod
    def _pix(request: Request) -> Any:
        pix = getattr(request.app.state, "pix", None)
        if pix is None:
            raise _unavailable("patient index")
        return pix

    @staticmethod
    def _gate(request: Request) -> Any:
        gate = getattr(request.app.state, "release", None)
        if gate is None:
            raise _unavailable("consent and audit gate")
        return gate

    def _wait(self, request: Request) -> float:
        s = self.settings
        return provider_wait(
            request.headers, s.query_provider_wait_ms, s.query_max_provider_wait_ms
        )

    async def _system(self, request: Request, provider: str) -> Any:
        return await request.app.state.iam.registry.lookup(provider)

    # -- search -------------------------------------------------------------------------
    async def search(
        self, request: Request, rtype: str, items: list[tuple[str, str]], *, lenient: bool
    ) -> Response:
        received = _received(request.scope.get("state", {}), time.perf_counter())
        context = access(request)
        try:
            return await self._search(request, rtype, items, lenient, received, context.client_id)
        except FHIRError as exc:
            record_query(context.client_id, "rejected" if exc.status < 500 else "error")
            raise
        except Exception:
            record_query(context.client_id, "error")
            raise

    async def _search(
        self,
        request: Request,
        rtype: str,
        items: list[tuple[str, str]],
        lenient: bool,
        received: float,
        client_id: str,
    ) -> Response:
        s = self.settings
        search = parse_search(rtype, items, lenient=lenient, max_count=s.max_page_size)
        wait = self._wait(request)
        pix, gate = self._pix(request), self._gate(request)
        # The person and their consent records come in one statement.
        if search.cursor is not None:
            cursor = await cursors.verify(
                request.app.state.iam.keys, search.cursor, rtype=rtype, client_id=client_id
            )
            person, consents = await pix.find_with(gate.consent_sql(), person_id=cursor.person_id)
            count = cursor.count
        else:
            cursor = None
            person, consents = await pix.find_with(
                gate.consent_sql(), nhs_number=search.nhs_number, person_id=search.person_id
            )
            count = s.default_page_size if search.count is None else search.count
        self_link = f"{self.hub}/{rtype}?{urlencode(items)}" if items else f"{self.hub}/{rtype}"
        if person is None:
            return await self._unknown_person(request, gate, search, self_link, received, client_id)

        release = await gate.open(
            request,
            patient=f"Patient/{person.id}",
            nhs_number=person.nhs_number,
            consent_bodies=consents,
        )
        targets = await self._targets(request, person, search, cursor, count)
        reachable = [t for t in targets if t.base]
        state = request.scope.get("state", {})
        request_id = state.get("request_id")
        deadline = received + wait
        fetched = await asyncio.gather(
            *(
                self.clients.get(
                    t.provider,
                    t.url,
                    wait,
                    request_id=request_id,
                    check=check_searchset,
                    deadline=deadline,
                )
                for t in reachable
            )
        )
        last_sent = max((f.sent_at for f in fetched), default=time.perf_counter())
        last_back = max((f.done_at for f in fetched), default=last_sent)

        out = BundleWriter("searchset")
        out.link("self", self_link)
        outcomes: list[dict[str, Any]] = []
        pages: list[tuple[Stamp, list[dict[str, Any]]]] = []
        rest: dict[str, tuple[str, int]] = {}
        totals: list[int | None] = []
        room = count
        released = 0
        for target in targets:
            if not target.base:
                outcomes.append(
                    impairment(
                        target.provider,
                        target.name,
                        "not_registered",
                        "it has no FHIR endpoint registered with the hub",
                    )
                )
                totals.append(None)
        for target, result in zip(reachable, fetched, strict=True):
            if not result.ok:
                outcomes.append(
                    impairment(
                        target.provider, target.name, result.failure or "error", result.message
                    )
                )
                totals.append(None)
                continue
            page = take(result.body, rtype, target.url, target.skip, room, target.base or "")
            totals.append(page.total)
            room -= len(page.resources)
            if page.rest is not None:
                rest[target.key or target.provider] = page.rest
            if page.dropped:
                outcomes.append(
                    operation_outcome(
                        Issue(
                            "structure",
                            f"Provider {target.provider}: {page.dropped} entries were not {rtype} resources "
                            "and were left out.",
                            severity="warning",
                        )
                    )
                )
            stamp = Stamp(
                target.provider, target.base or "", f"{self.hub}/providers/{target.provider}"
            )
            chosen = release.filter(page.resources, target.provider)
            pages.append((stamp, chosen))
            released += len(chosen)
        # Every consent decision is made, so the audit record is complete: it is committed
        # while the answer is rendered, and nothing is sent until it is durable.
        ticket = release.audit_soon(providers=tuple(t.provider for t in targets))
        try:
            if ticket.flushing:
                await asyncio.sleep(0)  # the flush sends its statement before the CPU work
            for stamp, chosen in pages:
                out.add_rendered(stamp.entries(rtype, chosen))
            notice = release.notice()
            issues = list(search.warnings)
            if not targets:
                issues.append(
                    Issue(
                        "not-found",
                        "The person is in the patient index but no provider holds verified records "
                        "for them; no provider was asked.",
                        severity="information",
                    )
                )
            if issues:
                out.add(outcome_entry(*issues))
            if notice:
                out.add(
                    {
                        "search": {"mode": "outcome"},
                        "resource": {"resourceType": "OperationOutcome", "issue": [notice]},
                    }
                )
            for oo in outcomes:
                out.add({"search": {"mode": "outcome"}, "resource": oo})
            if targets and all(t is not None for t in totals) and not release.withheld:
                out.total = sum(t for t in totals if t is not None)
            if rest:
                token = await cursors.sign(
                    request.app.state.iam.keys,
                    cursors.Cursor(rtype, person.id, client_id, count, rest),
                    s.query_cursor_lifetime_seconds,
                )
                out.link("next", f"{self.hub}/{rtype}?_cursor={token}")
            body = out.render()
        except BaseException:
            ticket.abandon()  # nothing is released: see AuditWriter.submit
            raise
        await ticket.committed()
        failed = sum(1 for f in fetched if not f.ok) + sum(1 for t in targets if not t.base)
        internal = (last_sent - received) + (time.perf_counter() - last_back)
        outcome = "complete" if not failed else ("no_data" if failed == len(targets) else "partial")
        record_query(
            client_id,
            outcome,
            internal=internal,
            resources=released,
            size=len(body),
            providers=len(targets),
        )
        return fhir_json(body)

    async def _unknown_person(
        self, request: Request, gate: Any, search: Search, self_link: str, received: float, client_id: str
    ) -> Response:
        release = await gate.open(request, patient=None, nhs_number=search.nhs_number)
        who = f"NHS number {search.nhs_number}" if search.nhs_number else f"id {search.person_id}"
        out = BundleWriter("searchset")
        out.total = 0
        out.link("self", self_link)
        issues = [
            *search.warnings,
            Issue(
                "not-found",
                f"No person with {who} is registered in the hub's patient index, so no provider was asked. "
                "Check the number, or ask the person's GP practice to register them.",
                severity="information",
            ),
        ]
        out.add(outcome_entry(*issues))
        await release.audited(providers=())
        body = out.render()
        record_query(
            client_id,
            "unknown_person",
            internal=time.perf_counter() - received,
            resources=0,
            size=len(body),
            providers=0,
        )
        return fhir_json(body)

    async def _targets(
        self,
        request: Request,
        person: Any,
        search: Search,
        cursor: cursors.Cursor | None,
        count: int,
    ) -> list[Target]:
        """The providers to ask and the URL of each, from the index (or the cursor)."""
        locals_by_provider: dict[str, list[str]] = {}
        for link in person.routable:
            locals_by_provider.setdefault(link.provider, []).append(link.value)
        out: list[Target] = []
        if cursor is not None:
            for key, (url, skip) in cursor.providers.items():
                provider = key.split("~", 1)[0]
                system = await self._system(request, provider)
                base = _base(system)
                # The person's links may have changed since the first page: stop asking a
                # provider no longer linked, and only ever fetch under its registered base.
                if provider not in locals_by_provider or not base or not url.startswith(base + "/"):
                    continue
                out.append(Target(provider, getattr(system, "name", None), base, url, skip, key))
            return out
        asked = sum(len(v) for v in locals_by_provider.values())
        per = math.ceil(count / asked) if asked else count
        patient_param = "patient" if uses_patient_param(search.rtype) else "subject"
        for provider, local_ids in locals_by_provider.items():
            system = await self._system(request, provider)
            base = _base(system)
            name = getattr(system, "name", None)
            if not base:
                out.append(Target(provider, name, None))
                continue
            # Rarely a provider holds two records of one person: one request each (a
            # comma list of references is not something every FHIR server supports).
            for n, local in enumerate(local_ids):
                query = [(patient_param, f"Patient/{local}"), *search.forward, ("_count", str(per))]
                key = provider if n == 0 else f"{provider}~{n}"
                out.append(
                    Target(
                        provider, name, base, f"{base}/{search.rtype}?{urlencode(query)}", 0, key
                    )
                )
        return out

    # -- proxied read -------------------------------------------------------------------
    async def read(self, request: Request, provider: str, rtype: str, rid: str) -> Response:
        """``GET /fhir/providers/{provider}/{rtype}/{rid}``: fetched, consent-filtered, audited."""
        received = _received(request.scope.get("state", {}), time.perf_counter())
        context = access(request)
        try:
            return await self._read(request, provider, rtype, rid, received, context.client_id)
        except FHIRError as exc:
            record_query(context.client_id, "rejected" if exc.status < 500 else "error")
            raise

    async def _read(
        self, request: Request, provider: str, rtype: str, rid: str, received: float, client_id: str
    ) -> Response:
        from sharedcare.store.searchparams import r4_resource_types

        if rtype not in r4_resource_types():
            raise FHIRError.of(404, "not-supported", f"{rtype!r} is not a FHIR R4 resource type.")
        if not rid or len(rid) > 64 or not set(rid) <= ID_CHARS:
            raise FHIRError.of(400, "invalid", f"{rid!r} is not a valid FHIR id.")
        system = await self._system(request, provider)
        base = _base(system)
        if not base:
            raise FHIRError.of(
                404,
                "not-found",
                f"There is no provider {provider!r} with a FHIR endpoint registered.",
            )
        wait = self._wait(request)
        pix, gate = self._pix(request), self._gate(request)
        state = request.scope.get("state", {})
        request_id = state.get("request_id")
        deadline = received + wait
        name = getattr(system, "name", None)
        got = await self.clients.get(
            provider,
            f"{base}/{rtype}/{rid}",
            wait,
            request_id=request_id,
            check=check_resource(rtype, rid),
            deadline=deadline,
        )
        sent, back = got.sent_at, got.done_at
        if not got.ok:
            raise _read_failure(provider, name, rtype, rid, got)
        resource: dict[str, Any] = got.body
        local = _patient_of(resource, base)
        patient: str | None = None
        nhs: str | None = None
        if local is not None:
            person = await self._owner(
                request, pix, provider, base, local, resource, deadline, wait
            )
            if person is None:
                await gate.refused(request, reason="resource-of-unlinked-patient", action="read")
                raise FHIRError.of(
                    403,
                    "forbidden",
                    f"Provider {provider}'s {rtype}/{rid} belongs to a patient the hub's index has not verified; "
                    "the hub cannot check consent for it, so it is not released.",
                )
            patient, nhs = f"Patient/{person.id}", person.nhs_number
        release = await gate.open(request, patient=patient, nhs_number=nhs, action="read")
        released = release.filter([resource], provider)
        if not released:
            await release.audited(providers=(provider,), resource=f"{rtype}/{rid}")
            from sharedcare.consent.gate import withheld_read

            refusal = withheld_read()
            record_query(
                client_id,
                "complete",
                internal=time.perf_counter() - received,
                resources=0,
                providers=1,
            )
            return fhir_json(refusal.outcome(), refusal.status)
        stamp = Stamp(provider, base, f"{self.hub}/providers/{provider}")
        body = stamp.render(released[0])
        await release.audited(providers=(provider,), resource=f"{rtype}/{rid}")
        internal = (sent - received) + (time.perf_counter() - back)
        record_query(
            client_id, "complete", internal=internal, resources=1, size=len(body), providers=1
        )
        return fhir_json(body)

    async def _owner(
        self,
        request: Request,
        pix: Any,
        provider: str,
        base: str,
        local: str,
        resource: dict[str, Any],
        deadline: float,
        wait: float,
    ) -> Any:
        """The indexed person whose verified link at ``provider`` is ``local``, or None."""
        system = await self._system(request, provider)
        for identifier_system in getattr(system, "identifier_systems", ()) or ():
            found = await pix.find_link(identifier_system, local)
            if found is not None and found[1] is not None and _links(found[1], provider, local):
                return found[1]
        # Not found by its local identifier: the provider's Patient names its NHS number.
        patient = resource if resource.get("resourceType") == "Patient" else None
        if patient is None:
            got = await self.clients.get(
                provider,
                f"{base}/Patient/{local}",
                wait,
                check=check_resource("Patient", local),
                deadline=deadline,
                excuse_late=False,  # the wait went on this provider's first answer, not the hub
            )
            if not got.ok:
                raise _read_failure(provider, None, "Patient", local, got)
            patient = got.body
        from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM

        numbers = [
            i.get("value")
            for i in patient.get("identifier") or ()
            if isinstance(i, dict)
            and i.get("system") == NHS_NUMBER_SYSTEM
            and isinstance(i.get("value"), str)
        ]
        for number in numbers:
            person = await pix.find(nhs_number=number)
            if person is not None and _links(person, provider, local):
                return person
        return None


def _received(state: dict[str, Any], t0: float) -> float:
    """When the hub received the request (its first middleware), or ``t0`` (the handler's
    start) if not known.

    The internal round trip starts here (ARCHITECTURE: "receipt"), and so does the providers'
    wait: counting it from receipt rather than from each provider request bounds what the
    consumer waits, whatever the hub spent before asking (queueing, the index, consent).
    """
    received = state.get("received_at")
    return received if isinstance(received, float) and received <= t0 else t0


def _links(person: Any, provider: str, local: str) -> bool:
    return any(link.provider == provider and link.value == local for link in person.routable)


def _base(system: Any) -> str | None:
    if (
        system is None
        or not getattr(system, "fhir_base", None)
        or not getattr(system, "active", True)
    ):
        return None
    if not getattr(system, "is_provider", True):
        return None
    return str(system.fhir_base).rstrip("/")


def _patient_of(resource: dict[str, Any], base: str) -> str | None:
    """The provider-local Patient id a resource is about (itself for a Patient), or None."""
    if resource.get("resourceType") == "Patient":
        return str(resource["id"])
    for name in ("patient", "subject", "beneficiary"):
        ref = resource.get(name)
        if isinstance(ref, dict) and isinstance(ref.get("reference"), str):
            value = ref["reference"]
            if value.startswith(base + "/"):
                value = value[len(base) + 1 :]
            kind, _, rid = value.partition("/")
            if kind == "Patient" and rid and "/" not in rid:
                return rid
    return None


def _read_failure(provider: str, name: str | None, rtype: str, rid: str, got: Fetched) -> FHIRError:
    if got.failure == "error" and got.status in (404, 410):
        return FHIRError.of(got.status, "not-found", f"Provider {provider} has no {rtype}/{rid}.")
    status = 504 if got.failure == "timeout" else 502
    oo = impairment(provider, name, got.failure or "error", got.message)
    issue = oo["issue"][0]
    return FHIRError(
        status,
        [
            Issue(
                issue["code"],
                issue["diagnostics"],
                details_code=issue["details"]["coding"][0]["code"],
            )
        ],
    )
