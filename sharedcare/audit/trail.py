"""The audit trail through the FHIR API: read, search and history of ``audit_events``.

Auditors see AuditEvents as ordinary FHIR resources (``GET /fhir/AuditEvent?...``); they
are served from the trail's own table (:mod:`sharedcare.audit.schema`), not the store's.
Search follows hl7.org/fhir/R4/search.html for the parameters an auditor asks by
(issue 5: patient, user, organisation, date):

=================  ========  =======================================================
parameter          type      matches
=================  ========  =======================================================
``patient``        ref       any Patient the event names (``Patient/{id}``, ``{id}``)
``altid``          token     the requesting user's id, or their organisation's ODS code
``date``           date      ``recorded``, with prefixes eq ne lt gt le ge
``_lastUpdated``   date      the same instant (an event never changes)
``subtype``        token     the restful interaction (read, search-type, operation...)
``action``         token     C R U D E
``outcome``        token     0 4 8 12
``agent-name``     string    the requesting user's name (starts with; ``:contains``;
                             ``:exact`` compares case- and accent-folded names)
``agent-role``     token     the requesting user's role code
``agent``          ref       a non-patient agent, e.g. ``Organization/{id}``
``entity``         ref       the resource released, or a Patient the event names
``_id``            token     the event's id
=================  ========  =======================================================

Only ``patient``, ``altid`` and ``date`` are indexed; the others filter what those (or the
time order) find, so give one of them on a large trail.

``_count``, ``_sort=_lastUpdated|-_lastUpdated``, ``_total`` and keyset paging (``next``
and ``previous`` links) behave as in the store; other parameters are a 400 naming these
(or ignored with a warning under ``Prefer: handling=lenient``). Nothing joins the trail into
other searches: ``_include``/``_revinclude`` through AuditEvent are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlencode

from sqlalchemy import and_, false, func, not_, or_, select, true
from sqlalchemy.sql.elements import ColumnElement

from sharedcare.audit.columns import event_row, new_id, patient_id
from sharedcare.audit.insert import insert_rows
from sharedcare.audit.record import JOB_ROLE_SYSTEM
from sharedcare.audit.schema import audit_event_patients, audit_events
from sharedcare.fhir.bundles import BundleWriter
from sharedcare.fhir.errors import FHIRError, bad_request, not_found, operation_outcome
from sharedcare.metrics.registry import record_store_read, record_store_write
from sharedcare.store.db import Database
from sharedcare.store.history import parse_since
from sharedcare.store.indexing import normalize_string
from sharedcare.store.search import instant_cond
from sharedcare.store.search_parse import Clause, SearchPlan, encode_cursor, parse_search
from sharedcare.store.searchparams import SearchParam

__all__ = ["AUDIT_TYPE", "AuditTrail", "Page"]

AUDIT_TYPE: Final = "AuditEvent"
_RESTFUL = "http://hl7.org/fhir/restful-interaction"
_E = audit_events.c
_Row = tuple[int, datetime, str, bytes]  # seq, recorded, id, body
Page = tuple[list[_Row], int | None, str | None, str | None]  # rows, total, next, previous


def _token(columns: Sequence[Any], clause: Clause, system: str | None = None) -> ColumnElement[bool]:
    """A token clause on one or more columns (any of them matching): codes, ``|code``, ``sys|``."""
    if clause.modifier == "missing":
        absent = and_(*(c.is_(None) for c in columns))
        return absent if clause.values[0] else not_(absent)
    codes: list[str] = []
    anything = False
    for value_system, code in clause.values:
        if value_system not in (None, "", system):
            continue  # a system these values are never in
        if code is None:
            anything = anything or value_system == system
        else:
            codes.append(code)
    present = or_(*(c.is_not(None) for c in columns)) if anything else false()
    cond = or_(present, *(c.in_(codes) for c in columns)) if codes else present
    if clause.modifier == "not":  # search.html#token: also the events without a value
        return not_(or_(*(func.coalesce(c.in_(codes), False) for c in columns))) if codes else true()
    return cond


def _patients(clause: Clause) -> ColumnElement[bool]:
    if clause.modifier == "missing":
        return _E.patient.is_(None) if clause.values[0] else _E.patient.is_not(None)
    ids = []
    for value in clause.values:
        pid = value if "/" not in value else patient_id(value)
        if pid:
            ids.append(pid)
    if not ids:
        return false()
    others = select(audit_event_patients.c.event_id).where(audit_event_patients.c.patient.in_(ids))
    return or_(_E.patient.in_(ids), _E.id.in_(others))


def _like(value: str) -> str:
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _names(clause: Clause) -> ColumnElement[bool]:
    column = _E.agent_name
    if clause.modifier == "missing":
        return column.is_(None) if clause.values[0] else column.is_not(None)
    if clause.modifier == "exact":
        return column.in_([normalize_string(v) for v in clause.values])
    pattern = "%{}%" if clause.modifier == "contains" else "{}%"
    return or_(*(column.like(pattern.format(_like(v)), escape="\\") for v in clause.values))


def _references(column: Any, clause: Clause, base: str) -> ColumnElement[bool]:
    """search.html#reference on a column holding a literal reference as written."""
    if clause.modifier == "missing":
        return column.is_(None) if clause.values[0] else column.is_not(None)
    conds = []
    for value in clause.values:
        if value.startswith(base + "/"):
            value = value[len(base) + 1 :]
        if "/" not in value and clause.modifier:  # agent:Organization=x
            value = f"{clause.modifier}/{value}"
        if "/" in value:  # Type/id, also under another path (providers/P/Type/id)
            conds.append(or_(column == value, column.like("%/" + _like(value), escape="\\")))
        else:  # a bare id, of any type
            conds.append(column.like("%/" + _like(value), escape="\\"))
    return or_(*conds)


def _entities(clause: Clause, base: str) -> ColumnElement[bool]:
    if clause.modifier == "missing":
        return _references(_E.entity, clause, base)
    # A Patient reference names a person (the patient columns); a bare id may be either.
    people = [v for v in clause.values if patient_id(v) is not None or "/" not in v]
    others = [v for v in clause.values if patient_id(v) is None]
    if clause.modifier == "Patient":
        people, others = list(clause.values), []
    elif clause.modifier:
        people = []
    conds = []
    if people:
        conds.append(_patients(replace(clause, values=tuple(people))))
    if others:
        conds.append(_references(_E.entity, replace(clause, values=tuple(others)), base))
    return or_(*conds)


def _dates(clause: Clause) -> ColumnElement[bool]:
    if clause.modifier == "missing":  # every event has its instant
        return false() if clause.values[0] else true()
    return or_(*(instant_cond(_E.recorded, prefix, low, high) for prefix, low, high in clause.values))


def _ids(clause: Clause) -> ColumnElement[bool]:
    if clause.modifier == "missing":
        return false() if clause.values[0] else true()
    cond = _E.id.in_(list(clause.values))
    return not_(cond) if clause.modifier == "not" else cond


def _condition(clause: Clause, base: str) -> ColumnElement[bool]:
    name = clause.name
    if name == "_id":
        return _ids(clause)
    if name in ("date", "_lastUpdated"):
        return _dates(clause)
    if name == "patient":
        return _patients(clause)
    if name == "altid":
        return _token((_E.user_id, _E.organization), clause)
    if name == "subtype":
        return _token((_E.subtype,), clause, _RESTFUL)
    if name == "action":
        return _token((_E.action,), clause)
    if name == "outcome":
        return _token((_E.outcome,), clause)
    if name == "agent-name":
        return _names(clause)
    if name == "agent-role":
        return _token((_E.agent_role,), clause, JOB_ROLE_SYSTEM)
    if name == "agent":
        return _references(_E.agent, clause, base)
    if name == "entity":
        return _entities(clause, base)
    raise bad_request(f"AuditEvent search does not support {name!r}.")  # parse_search refused it


class AuditTrail:
    """Read, search, history and import of the trail; plain values in, FHIR JSON bytes out."""

    def __init__(
        self,
        db: Database,
        params: dict[str, SearchParam],
        *,
        fhir_base: str,
        default_count: int = 50,
        max_count: int = 1000,
    ):
        self.db = db
        self.params = params
        self.base = fhir_base
        self.default_count = default_count
        self.max_count = max_count

    # -- instance level -------------------------------------------------------------------
    async def read(self, event_id: str) -> bytes:
        async with self.db.read() as conn:
            body = (await conn.execute(select(_E.body).where(_E.id == event_id))).scalar()
        record_store_read("read", AUDIT_TYPE)
        if body is None:
            raise not_found(f"AuditEvent/{event_id} is not on the audit trail.")
        return bytes(body)

    async def vread(self, event_id: str, version: str) -> bytes:
        body = await self.read(event_id)
        if version != "1":  # written once, never changed
            raise not_found(f"AuditEvent/{event_id} has no version {version}; events have only version 1.")
        return body

    async def create(self, event: dict[str, Any]) -> tuple[bytes, str]:
        """Import one (already validated) AuditEvent from an earlier system: (body, new id)."""
        try:
            row = event_row(event, new_id())
        except ValueError as exc:
            raise FHIRError.of(422, "invalid", f"AuditEvent.recorded: {exc}.", expression="AuditEvent.recorded") from None
        await self.db.write(lambda conn: insert_rows(conn, [row]))
        record_store_write("create", AUDIT_TYPE)
        return row.body, row.id

    # -- search ---------------------------------------------------------------------------
    def plan(self, items: list[tuple[str, str]], *, lenient: bool = False) -> SearchPlan:
        for key, _ in items:
            if key.partition(":")[0] in ("_include", "_revinclude"):
                raise FHIRError.of(
                    400,
                    "not-supported",
                    f"{key} is not supported on AuditEvent: the audit trail is searched on its "
                    "own (by patient, altid, date and the other parameters it declares).",
                )
        return parse_search(
            AUDIT_TYPE,
            items,
            self.params,
            default_count=self.default_count,
            max_count=self.max_count,
            all_params={AUDIT_TYPE: self.params},
            lenient=lenient,
        )

    async def search(self, items: list[tuple[str, str]], *, lenient: bool = False) -> bytes:
        plan = self.plan(items, lenient=lenient)
        rows, total, next_cursor, prev_cursor = await self.page(plan)
        record_store_read("search", AUDIT_TYPE)
        out = BundleWriter("searchset")
        out.total = total
        url = f"{self.base}/{AUDIT_TYPE}"
        echo = urlencode(plan.echo)
        out.link("self", f"{url}?{echo}" if echo else url)
        sep = "&" if echo else ""
        if next_cursor:
            out.link("next", f"{url}?{echo}{sep}_cursor={next_cursor}")
        if prev_cursor:
            out.link("previous", f"{url}?{echo}{sep}_cursor={prev_cursor}")
        for _, _, eid, body in rows:
            out.add({"fullUrl": f"{url}/{eid}", "search": {"mode": "match"}}, bytes(body))
        if plan.warnings:
            out.add({"search": {"mode": "outcome"}, "resource": operation_outcome(*plan.warnings)})
        return out.render()

    async def page(self, plan: SearchPlan) -> Page:
        """One page of ``plan``'s matches, keyset-paged like the store's searches."""
        where = [_condition(c, self.base) for c in plan.clauses]
        backwards = plan.cursor is not None and plan.cursor[0] == "before"
        by_time = plan.sort_desc is not None
        desc = bool(plan.sort_desc) != backwards  # the direction rows are read in
        keys: list[Any] = [_E.recorded, _E.seq] if by_time else [_E.seq]
        if plan.cursor is not None:
            _, ts, seq = plan.cursor
            if by_time and ts is None:
                raise bad_request("The _cursor value belongs to a search with another _sort; start again.")
            # Spelt out rather than a row-value comparison so that the instant is bound as the
            # column's type (SQLite compares the stored text form).
            beyond = (lambda c, v: c < v) if desc else (lambda c, v: c > v)
            if by_time:
                where.append(or_(beyond(_E.recorded, ts), and_(_E.recorded == ts, beyond(_E.seq, seq))))
            else:
                where.append(beyond(_E.seq, seq))
        order = [k.desc() if desc else k.asc() for k in keys]
        query = select(_E.seq, _E.recorded, _E.id, _E.body).where(*where).order_by(*order)
        rows: list[_Row] = []
        async with self.db.read() as conn:
            if plan.count:
                rows = [tuple(r) for r in (await conn.execute(query.limit(plan.count + 1))).all()]  # type: ignore[misc]
            more = len(rows) > plan.count
            rows = rows[: plan.count]
            if backwards:
                if not rows and plan.count:  # nothing before the cursor: the first page
                    return await self.page(replace(plan, cursor=None))
                rows.reverse()
            total: int | None = None
            if plan.total == "accurate":
                if plan.cursor is None and not more and plan.count:
                    total = len(rows)
                else:
                    counted = select(func.count()).select_from(audit_events).where(
                        *[_condition(c, self.base) for c in plan.clauses]
                    )
                    total = int((await conn.execute(counted)).scalar_one())

        def cursor(direction: str, row: _Row) -> str:
            return encode_cursor(direction, row[1] if by_time else None, row[0])

        next_cursor = prev_cursor = None
        if rows:
            has_next, has_prev = (True, more) if backwards else (more, plan.cursor is not None)
            next_cursor = cursor("after", rows[-1]) if has_next else None
            prev_cursor = cursor("before", rows[0]) if has_prev else None
        return rows, total, next_cursor, prev_cursor

    # -- history --------------------------------------------------------------------------
    async def history(self, event_id: str | None, items: list[tuple[str, str]]) -> bytes:
        """Instance history (the one version) or type history (newest first, ``_since``)."""
        params = dict(items)
        unknown = set(params) - {"_count", "_since", "_cursor", "_format", "_pretty"}
        if unknown:
            raise FHIRError.of(
                400, "not-supported", f"History supports _count, _since and paging; not {sorted(unknown)}."
            )
        plan = self.plan([(k, v) for k, v in items if k in ("_count", "_cursor")])
        plan.sort_desc = True
        plan.total = "none"
        since = parse_since(params.get("_since"))
        if since is not None:
            plan.clauses.append(Clause(None, "_lastUpdated", None, (("ge", since, since),)))
        if event_id is not None:
            plan.clauses.append(Clause(None, "_id", None, (event_id,)))
            await self.read(event_id)  # 404 for an unknown event
        rows, _, next_cursor, _ = await self.page(plan)
        record_store_read("history", AUDIT_TYPE)
        out = BundleWriter("history")
        url = f"{self.base}/{AUDIT_TYPE}" + (f"/{event_id}" if event_id else "") + "/_history"
        echo = urlencode([(k, v) for k, v in items if k in ("_count", "_since")])
        out.link("self", f"{url}?{echo}" if echo else url)
        if next_cursor:
            out.link("next", f"{url}?{echo}{'&' if echo else ''}_cursor={next_cursor}")
        for _, recorded, eid, body in rows:
            entry = {
                "fullUrl": f"{self.base}/{AUDIT_TYPE}/{eid}",
                "request": {"method": "POST", "url": AUDIT_TYPE},
                "response": {
                    "status": "201 Created",
                    "etag": 'W/"1"',
                    "lastModified": recorded.isoformat(timespec="milliseconds") + "Z",
                },
            }
            out.add(entry, bytes(body))
        return out.render()
