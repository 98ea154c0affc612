"""The release gate: consent decisions plus a durable audit record for every pathway.

Every pathway that lets patient data leave the platform (the store's own FHIR API, the
federated query, bulk, subscriptions, messaging) goes through the same three steps::

    release = await request.app.state.release.open(request, patient="Patient/123")
    kept = release.filter(resources, provider="gp-leeds-1")   # as often as needed
    if release.notice(): ...                                   # add the OperationOutcome issue
    await release.audited(providers=("gp-leeds-1",))           # durable BEFORE responding

:meth:`ReleaseGate.open` raises a 403 :class:`FHIRError` (after durably auditing the
refusal) when the caller may not receive patient data at all (no end-user context).
:meth:`ReleaseGate.refused` audits any other refusal of a patient-data request.

``open(patient=...)`` decides every resource with that person's consent records (the
federated query: resources from providers carry the providers' own patient ids).
:meth:`ReleaseGate.open_for` serves the hub's own store, whose resources may belong to
several people: each resource is decided with the consent records of the person it is
about (:func:`patients_of`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import AsyncIterator, Iterable, Sequence
from operator import itemgetter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import orjson
import structlog
from starlette.requests import Request

from sharedcare.audit.record import MINOR_FAILURE, SUCCESS, AuditRecord
from sharedcare.consent.decider import Decider, with_labels
from sharedcare.consent.metrics import record_decisions, record_policy_in_force
from sharedcare.consent.model import Decision, RequestContext
from sharedcare.consent.notice import withheld_issue, withheld_notice
from sharedcare.consent.policy import PolicySet
from sharedcare.consent.policy_file import PolicyError
from sharedcare.fhir.errors import FHIRError, Issue
from sharedcare.iam.context import AccessContext

if TYPE_CHECKING:
    from starlette.types import Scope

    from sharedcare.audit.writer import AuditWriter, Ticket
    from sharedcare.store.service import FhirService

__all__ = ["Release", "ReleaseGate", "audit_refusal", "patients_of", "withheld_read"]

log = structlog.get_logger("sharedcare.consent")

# Types that are not about a person (iam.middleware.DIRECTORY_TYPES): never consent-filtered.
DIRECTORY_TYPES: Final = frozenset({"Organization", "Practitioner", "PractitionerRole", "Endpoint"})
# Elements naming the person a resource is about, in the order tried (R4 Patient compartment,
# hl7.org/fhir/R4/compartmentdefinition-patient.html, reduced to its top-level references).
PATIENT_ELEMENTS: Final = ("patient", "subject", "beneficiary", "target")
_PATIENT_REF: Final = re.compile(r"(?:.*/)?(Patient/[A-Za-z0-9\-.]{1,64})(?:/_history/.*)?")
CONSENT_PAGE: Final = 1000
# The person's active Consent records, as the patient index's ``find_with`` attaches them to
# the person it finds (one statement for both, on PostgreSQL and SQLite). It selects what
# the store's ``Consent?patient=Patient/{id}&status=active`` search finds (sorted by rid),
# with the id taken from the person found; tests/query/test_consent.py checks the two agree.
# It starts from the person's own references and checks each record's status through the
# rid index, so its cost does not grow with the region's Consents. Asking for "every active
# Consent" as a list, as it once did, cost 82-92 ms per query on PostgreSQL with 20,000 of
# them (bench/consent_lookup.py). On SQLite, the unary ``+`` keeps the planner off the
# (type, param, code) index, which would list them all. One row more than a page means
# "too many to attach": the gate then pages through the search.
def _active_consents(plus: str) -> str:
    return (
        "FROM resources r WHERE r.rid IN (SELECT x.rid FROM person, idx_reference x "
        "WHERE person.merged_into IS NULL AND x.target_id = person.id "
        "AND x.target_type = 'Patient' AND x.param = 'patient' AND x.type = 'Consent') "
        "AND r.type = 'Consent' AND r.deleted = false "
        f"AND EXISTS (SELECT 1 FROM idx_token t WHERE t.rid = r.rid AND {plus}t.type = 'Consent' "
        f"AND {plus}t.param = 'status' AND {plus}t.code = 'active') "
        f"ORDER BY r.rid LIMIT {CONSENT_PAGE + 1}"
    )


CONSENT_BODIES: Final = f"SELECT ARRAY(SELECT r.body {_active_consents('')}) AS value"
# SQLite has no arrays: the same records as one JSON text of [rid, body] pairs (an
# aggregate's order is not promised there, so the rid comes along to sort by).
CONSENT_BODIES_SQLITE: Final = (
    "SELECT json_group_array(json_array(c.rid, json(CAST(c.body AS TEXT)))) AS value "
    f"FROM (SELECT r.rid, r.body {_active_consents('+')}) c"
)
NO_END_USER: Final = (
    "Patient data needs the end-user context: the access token must carry requesting_user, "
    "requesting_organization and reason_for_access."
)


def patients_of(resource: dict[str, Any]) -> tuple[str, ...]:
    """The ``Patient/{id}`` references of the people ``resource`` is about (may be empty).

    A Patient is about itself; any other type about the Patient references in its
    ``patient``, ``subject``, ``beneficiary`` or ``target`` (Provenance) element, a Group
    about its members.
    """
    rtype = resource.get("resourceType")
    if rtype == "Patient":
        rid = resource.get("id")
        return (f"Patient/{rid}",) if isinstance(rid, str) else ()
    out: list[str] = []
    elements: list[Any] = [resource.get(e) for e in PATIENT_ELEMENTS]
    if rtype == "Group":  # a Group of people is about each member
        elements.append(
            [m.get("entity") for m in resource.get("member") or () if isinstance(m, dict)]
        )
    for value in elements:
        if not value:
            continue
        for ref in value if isinstance(value, list) else (value,):
            text = ref.get("reference") if isinstance(ref, dict) else None
            m = _PATIENT_REF.fullmatch(text) if isinstance(text, str) else None
            if m is not None and m.group(1) not in out:
                out.append(m.group(1))
    return tuple(out)


def attached_bodies(value: Sequence[bytes] | str | None) -> list[Any] | None:
    """The records :meth:`ReleaseGate.consent_sql` attached to a person, in rid order: raw
    bodies (PostgreSQL) or parsed ones (SQLite's JSON text); None when none came along."""
    if not isinstance(value, str):
        return None if value is None else list(value)
    return [body for _rid, body in sorted(orjson.loads(value), key=itemgetter(0))]


def _about(patient: str, bodies: Sequence[bytes | dict[str, Any]]) -> list[dict[str, Any]]:
    """The records among ``bodies`` that name ``patient``, as :meth:`ReleaseGate.consents` keeps them."""
    out: list[dict[str, Any]] = []
    for raw in bodies:
        body = raw if isinstance(raw, dict) else orjson.loads(raw)
        if patient in patients_of(body):
            out.append(body)
    return out


def _action(method: str, path: str) -> str:
    """The restful-interaction code of a FHIR REST request (for refusals)."""
    segments = [s for s in path.split("/") if s][1:]
    if len(segments) >= 3 and segments[0] == "providers":
        segments = segments[2:]
    if method == "POST" and segments and segments[-1] == "_search":
        return "search-type"
    if "_history" in segments:
        i = segments.index("_history")
        return (
            "vread" if len(segments) > i + 1 else ("history-instance" if i >= 2 else "history-type")
        )
    if any(s.startswith("$") for s in segments):
        return "operation"
    return "read" if len(segments) >= 2 else "search-type" if segments else "search-system"


def _patient_param(request: Request) -> str | None:
    """``Patient/{id}`` from a ``patient``/``subject`` search parameter, if it names one."""
    for name in (
        "patient",
        "subject",
        "_id" if request.path_params.get("type") == "Patient" else "",
    ):
        value = request.query_params.get(name) if name else None
        if value:
            if name == "_id":
                value = f"Patient/{value}"
            m = _PATIENT_REF.fullmatch(value)
            if m:
                return m.group(1)
            if re.fullmatch(r"[A-Za-z0-9\-.]{1,64}", value):
                return f"Patient/{value}"
    path_type = request.path_params.get("type")
    path_id = request.path_params.get("id")
    if path_type == "Patient" and isinstance(path_id, str):
        return f"Patient/{path_id}"
    return None


class ReleaseGate:
    """Opens a :class:`Release` per request: the caller's decisions and its audit record."""

    def __init__(
        self,
        policies: PolicySet,
        fhir: FhirService,
        audit: AuditWriter,
        *,
        policy_file: Path | None = None,
    ):
        self.policies = policies
        self.fhir = fhir
        self.audit = audit
        self.policy_file = policy_file
        self._stamp = _file_stamp(policy_file)
        record_policy_in_force(policies.version, policies.digest)

    # -- policy ----------------------------------------------------------------------------
    def reload(self) -> bool:
        """Read the policy file again; on a bad file keep the policy in force (logged, counted).

        Returns True when a new policy is now in force.
        """
        self._stamp = _file_stamp(self.policy_file)
        try:
            before = self.policies.digest
            policy = self.policies.reload()
        except PolicyError:
            return False  # PolicySet.reload logged why and counted the failure
        record_policy_in_force(policy.version, policy.digest)
        return policy.digest != before

    def reload_if_changed(self) -> bool:
        """Reload when the policy file's modification time or size changed since last read."""
        if self.policy_file is None or _file_stamp(self.policy_file) == self._stamp:
            return False
        return self.reload()

    @contextlib.asynccontextmanager
    async def watching(self, interval: float) -> AsyncIterator[None]:
        """While open: reload the policy on SIGHUP, and when its file changes (polled)."""
        loop = asyncio.get_running_loop()
        tasks: list[asyncio.Task[None]] = []
        hup = False
        if self.policy_file is not None and interval > 0:

            async def poll() -> None:
                while True:
                    await asyncio.sleep(interval)
                    self.reload_if_changed()

            tasks.append(asyncio.create_task(poll(), name="sharedcare-consent-policy-watch"))
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            if self.policy_file is not None:
                loop.add_signal_handler(signal.SIGHUP, self.reload)
                hup = True
        try:
            yield
        finally:
            if hup:
                with contextlib.suppress(Exception):
                    loop.remove_signal_handler(signal.SIGHUP)
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    # -- consent records -------------------------------------------------------------------
    async def consents(self, patients: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """The active Consent resources of each person (``Patient/{id}`` -> resources)."""
        from sharedcare.store.search import run_search

        wanted = sorted(set(patients))
        out: dict[str, list[dict[str, Any]]] = {p: [] for p in wanted}
        for start in range(0, len(wanted), 100):
            chunk = ",".join(wanted[start : start + 100])
            cursor: str | None = None
            while True:
                items = [
                    ("patient", chunk),
                    ("status", "active"),
                    ("_count", str(CONSENT_PAGE)),
                    ("_total", "none"),
                ]
                if cursor:
                    items.append(("_cursor", cursor))
                plan = self.fhir.plan("Consent", items)
                plan.count = min(plan.count, CONSENT_PAGE)
                page = await run_search(self.fhir.store.db, plan, self.fhir.base)
                for hit in page.matches:
                    body = orjson.loads(hit.body)
                    for ref in patients_of(body):
                        if ref in out:
                            out[ref].append(body)
                if not page.next_cursor or not page.matches:
                    break
                cursor = page.next_cursor
        return out

    # -- opening ---------------------------------------------------------------------------
    def consent_sql(self) -> str:
        """The SELECT the patient index attaches to a person: their consent records."""
        return CONSENT_BODIES if self.fhir.store.db.dialect == "postgresql" else CONSENT_BODIES_SQLITE

    def _context(self, request: Request) -> AccessContext:
        from sharedcare.iam.context import access

        return access(request)

    async def _refuse_no_end_user(
        self,
        request: Request,
        ctx: AccessContext,
        patient: str | None,
        nhs_number: str | None,
        action: str,
    ) -> None:
        if not ctx.has_end_user:
            await self.refused(
                request, reason=NO_END_USER, patient=patient, nhs_number=nhs_number, action=action
            )
            raise FHIRError.of(403, "forbidden", NO_END_USER)

    async def open(
        self,
        request: Request,
        *,
        patient: str | None,
        nhs_number: str | None = None,
        action: str = "search-type",
        consent_bodies: Sequence[bytes] | str | None = None,
    ) -> Release:
        """A release of one person's data (their consent records decide every resource).

        ``consent_bodies``: the person's records as :meth:`consent_sql` fetched them with
        the person; without them (or with more than a page) the gate looks them up.
        """
        ctx = self._context(request)
        await self._refuse_no_end_user(request, ctx, patient, nhs_number, action)
        consent_bodies = attached_bodies(consent_bodies)
        if not patient:
            consents: list[dict[str, Any]] = []
        elif consent_bodies is not None and len(consent_bodies) <= CONSENT_PAGE:
            consents = _about(patient, consent_bodies)
        else:
            consents = (await self.consents([patient]))[patient]
        decider = self.policies.decider(RequestContext.from_access(ctx), consents)
        return Release(
            self, request, ctx, action, patient=patient, nhs_number=nhs_number, decider=decider
        )

    async def open_for(
        self, request: Request, resources: Sequence[dict[str, Any]], *, action: str = "search-type"
    ) -> Release:
        """A release of store resources about any number of people: each resource is decided
        with the consent records of the person it is about (a resource naming nobody, and a
        Consent record itself, by the regional policy alone)."""
        ctx = self._context(request)
        wanted = {
            p for r in resources if r.get("resourceType") != "Consent" for p in patients_of(r)
        }
        named = _patient_param(request)
        await self._refuse_no_end_user(request, ctx, named, None, action)
        records = await self.consents(wanted) if wanted else {}
        rctx = RequestContext.from_access(ctx)
        policy_only = self.policies.decider(rctx, ())
        deciders = {
            p: self.policies.decider(rctx, c) if c else policy_only for p, c in records.items()
        }
        return Release(
            self, request, ctx, action, patient=named, decider=policy_only, by_patient=deciders
        )

    # -- refusals --------------------------------------------------------------------------
    async def refused(
        self,
        request: Request,
        *,
        reason: str,
        patient: str | None = None,
        nhs_number: str | None = None,
        action: str = "search-type",
        access: AccessContext | None = None,
    ) -> None:
        """Durably audit a refused patient-data request (outcome 4, minor failure)."""
        ctx = access or self._context(request)
        await self.audit.record(
            _record(
                request,
                ctx,
                action,
                outcome=MINOR_FAILURE,
                outcome_desc=reason,
                patient=patient,
                nhs_number=nhs_number,
            )
        )

    async def write_audited(
        self, request: Request, *, action: str, resource: str | None, patient: str | None
    ) -> None:
        """Durably audit a write the hub records on the trail (a Consent record created or changed)."""
        ctx = self._context(request)
        await self.audit.record(
            _record(request, ctx, action, outcome=SUCCESS, patient=patient, resource=resource)
        )


class Release:
    """One request's release: filters resources, counts, and writes the AuditEvent."""

    def __init__(
        self,
        gate: ReleaseGate,
        request: Request,
        access: AccessContext,
        action: str,
        *,
        patient: str | None,
        nhs_number: str | None = None,
        decider: Decider,
        by_patient: dict[str, Decider] | None = None,
    ):
        self.gate = gate
        self.request = request
        self.access = access
        self.action = action
        self.patient = patient
        self.nhs_number = nhs_number
        self.decider = decider
        self.by_patient = by_patient
        self.withheld = 0
        self.released = 0
        self.qualified = 0
        self.reviewed: list[str] = []
        self.patients: list[str] = []  # people whose data was released (store pathway)

    @property
    def consent_refs(self) -> tuple[str, ...]:
        refs = list(self.decider.consent_refs)
        for d in (self.by_patient or {}).values():
            refs.extend(r for r in d.consent_refs if r not in refs)
        return tuple(refs)

    def filter(
        self, resources: list[dict[str, Any]], provider: str | None = None
    ) -> list[dict[str, Any]]:
        """The resources that may leave (qualified ones as labelled copies), in order.

        Counts accumulate across calls; withheld resources are never returned.
        """
        if self.by_patient is None:
            got = self.decider.filter(resources, provider)
            self.withheld += got.withheld
            self.qualified += got.qualified
            self.released += len(got.released)
            self.reviewed.extend(ref for ref, _ in got.reviewed)
            return got.released
        return [r for r in self.filter_each(resources, provider) if r is not None]

    def filter_each(
        self, resources: Sequence[dict[str, Any]], provider: str | None = None
    ) -> list[dict[str, Any] | None]:
        """One answer per resource, aligned with ``resources``: the resource as it may leave
        (a labelled copy when qualified), or None when withheld. Counts accumulate."""
        tally: dict[tuple[str, str, Decision, bool], int] = {}
        out = [self._one(r, provider, tally) for r in resources]
        if tally:
            record_decisions(tally)
        return out

    def _one(
        self,
        resource: dict[str, Any],
        provider: str | None,
        tally: dict[tuple[str, str, Decision, bool], int],
    ) -> dict[str, Any] | None:
        """Decide with the records of every person the resource names; any withholding wins."""
        people = patients_of(resource) if isinstance(resource, dict) else ()
        if self.by_patient is None or resource.get("resourceType") == "Consent":
            deciders: list[Decider] = [self.decider]
        else:
            deciders = [self.by_patient.get(p, self.decider) for p in people] or [self.decider]
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        rtype = rtype if isinstance(rtype, str) else "<malformed>"
        current = resource
        labels: list[Any] = []
        for decider in deciders:
            outcome = decider.decide(resource, provider)
            key = (rtype, outcome.rule, outcome.decision, outcome.review)
            tally[key] = tally.get(key, 0) + 1
            if outcome.decision is Decision.WITHHOLD:
                self.withheld += 1
                return None
            labels.extend(outcome.labels)
            if outcome.review:
                self.reviewed.append(f"{rtype}/{resource.get('id')}")
        if labels:
            current = with_labels(resource, dict.fromkeys(labels))
            self.qualified += 1
        self.released += 1
        for p in people:
            if p not in self.patients:
                self.patients.append(p)
        return current

    def notice(self) -> dict[str, Any] | None:
        """The OperationOutcome.issue telling the consumer data was withheld, or None."""
        return withheld_notice(self.withheld) if self.withheld else None

    async def audited(
        self,
        *,
        providers: tuple[str, ...] = (),
        outcome: int = SUCCESS,
        outcome_desc: str | None = None,
        resource: str | None = None,
    ) -> None:
        """Write this release's AuditEvent; returns once it is durable (503 FHIRError if not)."""
        ticket = self.audit_soon(
            providers=providers, outcome=outcome, outcome_desc=outcome_desc, resource=resource
        )
        await ticket.committed()

    def audit_soon(
        self,
        *,
        providers: tuple[str, ...] = (),
        outcome: int = SUCCESS,
        outcome_desc: str | None = None,
        resource: str | None = None,
    ) -> Ticket:
        """Queue this release's AuditEvent once every ``filter`` call is done; the caller
        must ``await ticket.committed()`` before it responds (see :meth:`AuditWriter.submit`)."""
        desc = outcome_desc
        if desc is None and self.reviewed:
            desc = "released for review: " + ", ".join(self.reviewed[:20])
        patient = self.patient or (self.patients[0] if self.patients else None)
        others = tuple(p for p in self.patients if p != patient)
        record = _record(
            self.request,
            self.access,
            self.action,
            outcome=outcome,
            outcome_desc=desc,
            patient=patient,
            nhs_number=self.nhs_number,
            providers=providers,
            resource=resource,
            released=self.released,
            withheld=self.withheld,
            other_patients=others,
            consents=self.consent_refs,
            policy=self.decider.policy_version,
        )
        return self.gate.audit.submit(record)


def _record(
    request: Request,
    ctx: AccessContext,
    action: str,
    *,
    outcome: int,
    outcome_desc: str | None = None,
    patient: str | None = None,
    nhs_number: str | None = None,
    providers: tuple[str, ...] = (),
    resource: str | None = None,
    released: int = 0,
    withheld: int = 0,
    other_patients: tuple[str, ...] = (),
    consents: tuple[str, ...] = (),
    policy: str | None = None,
) -> AuditRecord:
    scope = request.scope
    query = scope.get("query_string", b"").decode("latin-1")
    path = scope.get("path", "")
    user = ctx.requesting_user
    client = scope.get("client")
    return AuditRecord(
        action=action,
        request_id=scope.get("state", {}).get("request_id") or os.urandom(16).hex(),
        client_id=ctx.client_id,
        query=f"{scope.get('method', 'GET')} {path}{'?' + query if query else ''}",
        outcome=outcome,
        outcome_desc=outcome_desc,
        user_id=user.id if user else None,
        user_name=user.name if user else None,
        user_role=user.role if user else None,
        purpose_of_use=ctx.reason_for_access,
        organization=ctx.requesting_organization,
        patient=patient if patient and _PATIENT_REF.fullmatch(patient) else None,
        nhs_number=nhs_number,
        resource=resource,
        providers=providers,
        released=released,
        withheld=withheld,
        client_address=client[0] if client else None,
        other_patients=other_patients,
        consents=consents,
        policy=policy,
    )


def _file_stamp(path: Path | None) -> tuple[int, int] | None:
    if path is None:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size)


async def audit_refusal(
    scope: Scope, access: AccessContext, reason: str, types: Iterable[str]
) -> None:
    """Audit a request the access middleware refused, if it asked for patient data.

    Called from :class:`sharedcare.iam.middleware.AuthMiddleware`; the refusal stands even
    when the audit cannot be written (nothing was released), which is logged.
    """
    if all(t in DIRECTORY_TYPES for t in types):
        return
    app = scope.get("app")
    gate = getattr(getattr(app, "state", None), "release", None)
    if not isinstance(gate, ReleaseGate):
        return
    request = Request(scope)
    try:
        await gate.refused(
            request,
            reason=reason,
            patient=None,
            action=_action(scope.get("method", "GET"), scope.get("path", "")),
            access=access,
        )
    except FHIRError as exc:
        log.error("refused request not audited", reason=reason, status=exc.status)


def withheld_read(count: int = 1) -> FHIRError:
    """The 403 a read of a withheld resource gets: the withheld notice, nothing about the resource."""
    notice = withheld_issue(count)
    return FHIRError(
        403, [Issue(notice.code, notice.diagnostics, "error", (), notice.details_code)]
    )
