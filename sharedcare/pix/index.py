"""The patient index: people, their linkages to provider records, merges and tracing results.

A *person* is a hub Patient resource (``Patient/{id}``, the golden record consent and audit
refer to) plus a ``pix_people`` row keyed by the same id with the NHS number. A *linkage* is
one provider's registration: (provider, local identifier system, value) → person, with a
status and a last-updated time. Status values (:data:`STATUSES`):

============  ===============================================================================
pending       has a valid NHS number; a PDS trace is queued or retrying
unverified    no NHS number given: kept, never routed, listed for review
verified      PDS confirmed the NHS number and demographics: the only status queries route to
mismatch      PDS knows the number but the demographics differ: flagged, not linked
not_found     PDS has no record of the number
error         PDS answered with a permanent error, or stayed unreachable for a day
unlinked      an operator detached the registration (kept for history)
============  ===============================================================================

Merges follow HL7 v2 A40: the replaced person's row points to the survivor
(``merged_into``), its linkages move to the survivor with a history row each, its Patient
is marked inactive with ``link`` ``replaced-by``; nothing is deleted. Unmerge is refused.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
from sqlalchemy import and_, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.fhir.errors import FHIRError
from sharedcare.pix.connections import (
    Leases,
    connection_failures_as_503,
)
from sharedcare.pix.lookup import (
    FIND_BY_ID,
    FIND_BY_NHS,
    FIND_LINK,
    PERSON_LINKS,
    find_with,
    follow_merges_pg,
    person_of_rows,
    person_of_sqlite,
)
from sharedcare.pix.model import (
    ERROR,
    MAX_MERGE_HOPS,
    MISMATCH,
    NOT_FOUND,
    PENDING,
    REVIEW,
    ROUTABLE,
    STATUSES,
    TRACE_STATUS,
    UNLINKED,
    UNVERIFIED,
    VERIFIED,
    Linkage,
    Person,
    RegisterResult,
    ReviewItem,
    _review_item,
    demographic_values,
    demographics_of_row,
    golden_patient,
    prepare_golden,
    registration_id,
)
from sharedcare.pix.registration import Refused, Registration, refuse
from sharedcare.pix.schema import pix_link_history, pix_links, pix_merges, pix_people
from sharedcare.pix.tracing import Demographics, TraceResult, enqueue_trace
from sharedcare.store.db import Database
from sharedcare.store.repository import Store, now_utc

__all__ = [
    "PENDING",
    "ROUTABLE",
    "STATUSES",
    "Linkage",
    "PatientIndex",
    "Person",
    "RegisterResult",
    "golden_patient",
]


class PatientIndex:
    """The index over one database and the hub's store (``app.state.pix``)."""

    def __init__(self, db: Database, store: Store, *, keep_connections: bool = False):
        self.db = db
        self.store = store
        self._leases = Leases(db, keep_connections=keep_connections)
        self._driver = self._leases.driver
        self._read = self._leases.read

    @property
    def lease_wait(self) -> float:
        """The longest a lookup waits for a connection before answering 503."""
        return self._leases.lease_wait

    @lease_wait.setter
    def lease_wait(self, seconds: float) -> None:
        self._leases.lease_wait = seconds

    async def close(self) -> None:
        """Give every kept connection back to the pool (before the engine is disposed)."""
        await self._leases.close()

    # -- lookups ----------------------------------------------------------------------------
    async def find(
        self, *, nhs_number: str | None = None, person_id: str | None = None
    ) -> Person | None:
        """The person by NHS number or hub Patient id, following merges; None when unknown."""
        if (nhs_number is None) == (person_id is None):
            raise ValueError("give exactly one of nhs_number and person_id")
        if self.db.dialect == "postgresql":
            async with self._driver() as driver:
                if nhs_number is not None:
                    rows = await driver.fetch(FIND_BY_NHS, nhs_number)
                else:
                    rows = await driver.fetch(FIND_BY_ID, person_id)
                return await follow_merges_pg(driver, rows)
        async with self._read() as conn:
            where = (
                pix_people.c.nhs_number == nhs_number
                if nhs_number is not None
                else pix_people.c.id == person_id
            )
            rows = (await conn.execute(PERSON_LINKS.where(where))).all()
            for _ in range(MAX_MERGE_HOPS):
                if not rows:
                    return None
                survivor = rows[0].merged_into
                if survivor is None:
                    break
                rows = (await conn.execute(PERSON_LINKS.where(pix_people.c.id == survivor))).all()
        return person_of_rows([r._mapping for r in rows])

    async def find_with(
        self, attached: str, *, nhs_number: str | None = None, person_id: str | None = None
    ) -> tuple[Person | None, Any]:
        """:meth:`find`, plus the value of ``attached`` (see :func:`lookup.find_with`) for the
        person found, in one round trip.

        ``attached`` is written for the database in use (PostgreSQL or SQLite). The value is
        None when it could not come with the person: when the number or id found was merged
        into another person (the caller then fetches it for the survivor itself).
        """
        if (nhs_number is None) == (person_id is None):
            raise ValueError("give exactly one of nhs_number and person_id")
        key, value = ("nhs_number", nhs_number) if nhs_number is not None else ("id", person_id)
        if self.db.dialect != "postgresql":
            # A few index probes: inline, not through the pool's thread (Database.inline).
            inline = self.db.inline
            if inline is None:  # pragma: no cover - Database refuses SQLite without a file
                raise RuntimeError("SQLite without a database file")
            found = inline.fetch(find_with(key, attached, "?"), (value,))
            if not found:
                return None, None
            if found[0]["merged_into"] is None:
                return person_of_sqlite(found), found[0]["attached"]
            return await self.find(person_id=found[0]["merged_into"]), None
        async with self._driver() as driver:
            rows = await driver.fetch(find_with(key, attached), value)
            if rows and rows[0]["merged_into"] is None:
                return person_of_rows(rows), rows[0]["attached"]
            return await follow_merges_pg(driver, rows), None

    async def find_link(self, system: str, value: str) -> tuple[ReviewItem, Person | None] | None:
        """The linkage registered under a local identifier and the person it claims."""
        if self.db.dialect == "postgresql":  # one statement for the link and its person
            async with self._driver() as driver:
                rows = await driver.fetch(FIND_LINK, system, value)
                if not rows:
                    return None
                first = rows[0]
                item = ReviewItem(
                    first["link_id"],
                    first["link_provider"],
                    first["link_system"],
                    first["link_value"],
                    first["link_status"],
                    first["link_person"],
                    first["link_nhs"],
                    first["link_reasons"],
                    first["link_updated"],
                )
                if first["link_person"] is None:
                    return item, None
                return item, await follow_merges_pg(driver, rows)
        async with self._read() as conn:
            row = (
                await conn.execute(
                    select(pix_links).where(
                        pix_links.c.system == system, pix_links.c.value == value
                    )
                )
            ).first()
        if row is None:
            return None
        person = await self.find(person_id=row.person_id) if row.person_id else None
        return _review_item(row), person

    async def counts(self) -> tuple[int, dict[str, int]]:
        """People (not merged away) and linkages by status."""
        async with self.db.read() as conn:
            people = (
                await conn.execute(
                    select(func.count())
                    .select_from(pix_people)
                    .where(pix_people.c.merged_into.is_(None))
                )
            ).scalar_one()
            rows = (
                await conn.execute(
                    select(pix_links.c.status, func.count()).group_by(pix_links.c.status)
                )
            ).all()
        return int(people), {str(status): int(n) for status, n in rows}

    async def review(
        self, *, statuses: Sequence[str] = REVIEW, provider: str | None = None, limit: int = 100
    ) -> list[ReviewItem]:
        """Registrations that are kept but not routed, oldest change first (the operator list)."""
        query = select(pix_links).where(pix_links.c.status.in_(list(statuses)))
        if provider:
            query = query.where(pix_links.c.provider == provider)
        query = query.order_by(pix_links.c.status, pix_links.c.updated, pix_links.c.id).limit(limit)
        async with self.db.read() as conn:
            return [_review_item(r) for r in (await conn.execute(query)).all()]

    async def history(self, system: str, value: str) -> list[dict[str, Any]]:
        """Every recorded change of one linkage, oldest first."""
        async with self.db.read() as conn:
            link = (
                await conn.execute(
                    select(pix_links.c.id).where(
                        pix_links.c.system == system, pix_links.c.value == value
                    )
                )
            ).scalar()
            if link is None:
                return []
            rows = (
                await conn.execute(
                    select(pix_link_history)
                    .where(pix_link_history.c.link_id == link)
                    .order_by(pix_link_history.c.id)
                )
            ).all()
        return [dict(r._mapping) for r in rows]

    # -- registration -----------------------------------------------------------------------
    async def register(self, reg: Registration) -> RegisterResult:
        """Record one registration (and queue its trace) in one transaction."""
        # CPU work (validation, index rows of a possible new golden Patient) before the write lock.
        prepared = prepare_golden(self.store, reg.nhs_number, reg.demographics)
        async with connection_failures_as_503():
            return await self.db.write(lambda conn: self.register_in(conn, reg, prepared))

    async def register_in(
        self, conn: AsyncConnection, reg: Registration, prepared: Any
    ) -> RegisterResult:
        if reg.nhs_number:
            await self.store.advisory_lock(conn, f"pix:nhs:{reg.nhs_number}")
        await self.store.advisory_lock(conn, f"pix:link:{reg.system}|{reg.value}")
        link = (
            await conn.execute(
                select(pix_links).where(
                    pix_links.c.system == reg.system, pix_links.c.value == reg.value
                )
            )
        ).first()
        now = now_utc()
        if link is None:
            person_id = await self._person_for(conn, reg, prepared, now) if reg.nhs_number else None
            status = PENDING if reg.nhs_number else UNVERIFIED
            link_id = (
                await conn.execute(
                    insert(pix_links)
                    .values(
                        person_id=person_id,
                        provider=reg.provider,
                        system=reg.system,
                        value=reg.value,
                        status=status,
                        nhs_number=reg.nhs_number,
                        revision=1,
                        created=now,
                        updated=now,
                        reasons=None if reg.nhs_number else "no NHS number given: cannot be traced",
                        **demographic_values(reg),
                    )
                    .returning(pix_links.c.id)
                )
            ).scalar_one()
            await self._history(conn, link_id, now, "registered", None, person_id, None, status)
            if reg.nhs_number:
                await enqueue_trace(
                    conn, registration_id(link_id, 1), reg.nhs_number, reg.demographics
                )
            return RegisterResult(link_id, person_id, status, created=True, changed=True)
        return await self._reregister(conn, reg, prepared, link, now)

    async def _reregister(
        self, conn: AsyncConnection, reg: Registration, prepared: Any, link: Any, now: datetime
    ) -> RegisterResult:
        if link.provider != reg.provider:
            raise refuse(
                "conflict",
                409,
                "conflict",
                f"The identifier {reg.system}|{reg.value} is registered by another provider ({link.provider}).",
            )
        same_demographics = demographics_of_row(link) == reg.demographics
        if link.status != UNLINKED and link.nhs_number and reg.nhs_number != link.nhs_number:
            claimed = reg.nhs_number or "no NHS number"
            raise refuse(
                "conflict",
                409,
                "conflict",
                f"{reg.system}|{reg.value} is already registered for NHS number {link.nhs_number}; this "
                f"registration claims {claimed}. One local record cannot be two people: if the NHS "
                "number was wrong, ask the hub operator to unlink the registration, then register again.",
                "Patient.identifier",
            )
        if link.status != UNLINKED and reg.nhs_number == link.nhs_number and same_demographics:
            return RegisterResult(
                link.id, link.person_id, link.status, created=False, changed=False
            )
        revision = link.revision + 1
        person_id = link.person_id
        if link.status == UNLINKED or link.nhs_number != reg.nhs_number:
            person_id = await self._person_for(conn, reg, prepared, now) if reg.nhs_number else None
        # A verified link keeps routing while changed demographics are re-traced: the claimed
        # NHS number did not change; the trace flags it if they no longer match.
        keep = link.status == VERIFIED and link.nhs_number == reg.nhs_number
        status = link.status if keep else (PENDING if reg.nhs_number else UNVERIFIED)
        await conn.execute(
            update(pix_links)
            .where(pix_links.c.id == link.id)
            .values(
                person_id=person_id,
                status=status,
                nhs_number=reg.nhs_number,
                revision=revision,
                updated=now,
                reasons=None if reg.nhs_number else "no NHS number given: cannot be traced",
                **demographic_values(reg),
            )
        )
        await self._history(
            conn, link.id, now, "updated", link.person_id, person_id, link.status, status
        )
        if reg.nhs_number:
            await enqueue_trace(
                conn, registration_id(link.id, revision), reg.nhs_number, reg.demographics
            )
        return RegisterResult(link.id, person_id, status, created=False, changed=True)

    async def _person_for(
        self, conn: AsyncConnection, reg: Registration, prepared: Any, now: datetime
    ) -> str:
        """The person holding ``reg``'s NHS number (the survivor if merged); created if new."""
        row = (
            await conn.execute(
                select(pix_people.c.id).where(pix_people.c.nhs_number == reg.nhs_number)
            )
        ).first()
        if row is not None:
            return await self._survivor(conn, row.id)
        person_id = str(uuid.uuid4())
        await self.store.create_in(conn, prepared, person_id)
        await conn.execute(
            insert(pix_people).values(
                id=person_id,
                nhs_number=reg.nhs_number,
                merged_into=None,
                verified=False,
                created=now,
                updated=now,
            )
        )
        return person_id

    async def _survivor(self, conn: AsyncConnection, person_id: str) -> str:
        current = person_id
        for _ in range(MAX_MERGE_HOPS):
            nxt = (
                await conn.execute(
                    select(pix_people.c.merged_into).where(pix_people.c.id == current)
                )
            ).scalar()
            if nxt is None:
                return current
            current = nxt
        raise FHIRError.of(
            500, "exception", f"Merge chain from {person_id} is longer than {MAX_MERGE_HOPS}."
        )

    async def _history(
        self,
        conn: AsyncConnection,
        link_id: int,
        at: datetime,
        event: str,
        person_before: str | None,
        person_after: str | None,
        status_before: str | None,
        status_after: str,
        detail: str | None = None,
    ) -> None:
        await conn.execute(
            insert(pix_link_history).values(
                link_id=link_id,
                at=at,
                event=event,
                person_before=person_before,
                person_after=person_after,
                status_before=status_before,
                status_after=status_after,
                detail=detail,
            )
        )

    # -- tracing results ----------------------------------------------------------------------
    async def apply_trace(self, registration_id: str, result: TraceResult) -> str | None:
        """Record a final trace result; idempotent, and stale results (older revisions) are ignored."""
        try:
            link_part, revision_part = registration_id.split(".", 1)
            link_id, revision = int(link_part), int(revision_part)
        except ValueError:
            return None
        status = TRACE_STATUS[result.outcome]
        reasons = "; ".join(result.reasons) or None

        async def write(conn: AsyncConnection) -> str | None:
            link = (await conn.execute(select(pix_links).where(pix_links.c.id == link_id))).first()
            if link is None or link.revision != revision or link.status == UNLINKED:
                return None
            if link.status == status and link.reasons == reasons:
                return status
            now = now_utc()
            await conn.execute(
                update(pix_links)
                .where(pix_links.c.id == link_id)
                .values(status=status, reasons=reasons, updated=now)
            )
            await self._history(
                conn,
                link_id,
                now,
                "traced",
                link.person_id,
                link.person_id,
                link.status,
                status,
                reasons,
            )
            if status == VERIFIED and link.person_id:
                await self._adopt_demographics(
                    conn, link.person_id, demographics_of_row(link), link.nhs_number, now
                )
            return status

        return await self.db.write(write)

    async def _adopt_demographics(
        self,
        conn: AsyncConnection,
        person_id: str,
        demographics: Demographics,
        nhs: str | None,
        now: datetime,
    ) -> None:
        """The first verified registration's demographics become the golden record's."""
        person = (
            await conn.execute(select(pix_people).where(pix_people.c.id == person_id))
        ).first()
        if person is None or person.verified:
            return
        stored = await self._current_patient(conn, person_id)
        body = golden_patient(nhs, demographics)
        if stored is not None:
            body = {**stored, **{k: v for k, v in body.items() if k != "active"}}
        await self.store.update_in(
            conn,
            self.store.prepare("Patient", {**body, "id": person_id}, url_id=person_id),
            person_id,
        )
        await conn.execute(
            update(pix_people)
            .where(pix_people.c.id == person_id)
            .values(verified=True, updated=now)
        )

    async def _current_patient(
        self, conn: AsyncConnection, person_id: str
    ) -> dict[str, Any] | None:
        from sharedcare.store.schema import resources

        body = (
            await conn.execute(
                select(resources.c.body).where(
                    resources.c.type == "Patient", resources.c.id == person_id
                )
            )
        ).scalar()
        if not body:
            return None
        patient: dict[str, Any] = orjson.loads(body)
        patient.pop("meta", None)
        return patient

    # -- operator actions ---------------------------------------------------------------------
    async def unlink(
        self, system: str, value: str, *, by: str, reason: str | None = None
    ) -> ReviewItem:
        """Detach a registration: it is kept (status ``unlinked``) but never routed again."""

        async def write(conn: AsyncConnection) -> ReviewItem:
            link = (
                await conn.execute(
                    select(pix_links).where(
                        pix_links.c.system == system, pix_links.c.value == value
                    )
                )
            ).first()
            if link is None:
                raise FHIRError.of(
                    404, "not-found", f"No registration has the identifier {system}|{value}."
                )
            if link.status == UNLINKED:
                return _review_item(link)
            now = now_utc()
            await conn.execute(
                update(pix_links)
                .where(pix_links.c.id == link.id)
                .values(
                    status=UNLINKED,
                    revision=link.revision + 1,
                    updated=now,
                    reasons=f"unlinked by {by}: {reason or 'no reason given'}",
                )
            )
            await self._history(
                conn,
                link.id,
                now,
                "unlinked",
                link.person_id,
                link.person_id,
                link.status,
                UNLINKED,
                f"by {by}: {reason or ''}",
            )
            row = (await conn.execute(select(pix_links).where(pix_links.c.id == link.id))).one()
            return _review_item(row)

        return await self.db.write(write)

    async def resolve_person(self, ref: str) -> str:
        """A person id from an NHS number or a hub Patient id (``Patient/`` prefix allowed)."""
        ref = ref.removeprefix("Patient/")
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(pix_people.c.id).where(
                        (pix_people.c.id == ref) | (pix_people.c.nhs_number == ref)
                    )
                )
            ).first()
        if row is None:
            raise FHIRError.of(
                404, "not-found", f"No person in the index has the id or NHS number {ref!r}."
            )
        return str(row.id)

    async def merge(
        self, replaced: str, survivor: str, *, by: str, reason: str | None = None
    ) -> int:
        """Merge ``replaced`` into ``survivor`` (A40); returns how many linkages moved."""
        if replaced == survivor:
            raise FHIRError.of(400, "invalid", "A person cannot be merged into itself.")

        async def write(conn: AsyncConnection) -> int:
            for pid in sorted((replaced, survivor)):
                await self.store.advisory_lock(conn, f"pix:person:{pid}")
            people = {
                r.id: r
                for r in (
                    await conn.execute(
                        select(pix_people).where(pix_people.c.id.in_([replaced, survivor]))
                    )
                ).all()
            }
            for pid in (replaced, survivor):
                if pid not in people:
                    raise FHIRError.of(404, "not-found", f"Person {pid} is not in the index.")
                if people[pid].merged_into is not None:
                    raise FHIRError.of(
                        409,
                        "conflict",
                        f"Person {pid} was already merged into {people[pid].merged_into}; merge its survivor instead.",
                    )
            now = now_utc()
            await conn.execute(
                update(pix_people)
                .where(pix_people.c.id == replaced)
                .values(merged_into=survivor, updated=now)
            )
            links = (
                await conn.execute(select(pix_links).where(pix_links.c.person_id == replaced))
            ).all()
            if links:
                await conn.execute(
                    update(pix_links)
                    .where(pix_links.c.person_id == replaced)
                    .values(person_id=survivor, updated=now)
                )
                await conn.execute(
                    insert(pix_link_history),
                    [
                        {
                            "link_id": link.id,
                            "at": now,
                            "event": "merged",
                            "person_before": replaced,
                            "person_after": survivor,
                            "status_before": link.status,
                            "status_after": link.status,
                            "detail": f"by {by}: {reason or ''}",
                        }
                        for link in links
                    ],
                )
            await conn.execute(
                insert(pix_merges).values(
                    replaced=replaced, survivor=survivor, at=now, by=by, reason=reason
                )
            )
            await self._link_patients(conn, replaced, survivor)
            return len(links)

        return await self.db.write(write)

    async def _link_patients(self, conn: AsyncConnection, replaced: str, survivor: str) -> None:
        # hl7.org/fhir/R4/patient.html#links: replaced-by on the old record, replaces on the survivor.
        for pid, other, kind, active in (
            (replaced, survivor, "replaced-by", False),
            (survivor, replaced, "replaces", None),
        ):
            body = await self._current_patient(conn, pid)
            if body is None:
                continue
            body["link"] = [
                *(body.get("link") or []),
                {"other": {"reference": f"Patient/{other}"}, "type": kind},
            ]
            if active is not None:
                body["active"] = active
            await self.store.update_in(conn, self.store.prepare("Patient", body, url_id=pid), pid)

    async def unmerge(self, replaced: str) -> None:
        """Always refused: linkages moved by a merge may already have routed queries."""
        async with self.db.read() as conn:
            merged = (
                await conn.execute(
                    select(pix_merges)
                    .where(pix_merges.c.replaced == replaced)
                    .order_by(pix_merges.c.id.desc())
                )
            ).first()
        what = (
            f"{replaced} was merged into {merged.survivor} on {merged.at:%Y-%m-%d %H:%M} UTC"
            if merged
            else f"{replaced} has no merge to undo"
        )
        raise FHIRError.of(
            409,
            "business-rule",
            f"Unmerge is not supported ({what}). A merge is kept for history; to correct a wrong "
            "merge, unlink the linkages that do not belong to the survivor and have their providers "
            "register them again, which creates or finds the right person.",
        )

    async def merges(self, person_id: str) -> list[dict[str, Any]]:
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(pix_merges).where(
                        and_(
                            (pix_merges.c.replaced == person_id)
                            | (pix_merges.c.survivor == person_id)
                        )
                    )
                )
            ).all()
        return [dict(r._mapping) for r in rows]


__all__ += [
    "ERROR",
    "MISMATCH",
    "NOT_FOUND",
    "REVIEW",
    "UNLINKED",
    "UNVERIFIED",
    "VERIFIED",
    "Refused",
    "ReviewItem",
]
