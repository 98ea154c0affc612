"""Run a :class:`SearchPlan` against the store and page through the matches.

Each clause becomes ``rid IN (SELECT rid FROM idx_<kind> WHERE type, param, value…)`` so
both SQLite and PostgreSQL drive the search from the narrow index table. Paging is by
keyset on (sort key, rid) carried in an opaque ``_cursor``: stable under concurrent
inserts, and as cheap on page 1,000 as on page 1 (search.html#paging).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    ColumnElement,
    Select,
    and_,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
    tuple_,
)

from sharedcare.fhir.errors import FHIRError
from sharedcare.store.db import Database
from sharedcare.store.schema import INDEX_TABLES, idx_reference, resources
from sharedcare.store.search_parse import Clause, SearchPlan, encode_cursor

MAX_INCLUDED = 1000


@dataclass(frozen=True, slots=True)
class Hit:
    rid: int
    type: str
    id: str
    last_updated: datetime
    body: bytes


@dataclass(slots=True)
class SearchPage:
    matches: list[Hit]
    included: list[Hit]
    total: int | None
    next_cursor: str | None
    prev_cursor: str | None


def _prefix_upper(value: str) -> str:
    """The smallest string greater than every string starting with ``value``."""
    return value + "\U0010ffff"


def _date_cond(lo: Any, hi: Any, prefix: str, low: datetime, high: datetime) -> ColumnElement[bool]:
    # hl7.org/fhir/R4/search.html#prefix: compare the resource's range [lo, hi) with the
    # search value's range [low, high).
    contained = and_(lo >= low, hi <= high)
    return {
        "eq": contained,
        "ne": not_(contained),
        "gt": hi > high,
        "lt": lo < low,
        "ge": or_(hi > high, contained),
        "le": or_(lo < low, contained),
    }[prefix]


def _instant_cond(ts: Any, prefix: str, low: datetime, high: datetime) -> ColumnElement[bool]:
    """A stored instant (``_lastUpdated``) against the search range ``[low, high)``.

    The store keeps microseconds, so the instant is the range ``[ts, ts + 1µs)``; with
    microsecond-aligned bounds the rules of :func:`_date_cond` reduce to these.
    """
    return {
        "eq": and_(ts >= low, ts < high),
        "ne": or_(ts < low, ts >= high),
        "gt": ts >= high,
        "lt": ts < low,
        "ge": ts >= low,
        "le": ts < high,
    }[prefix]


# Type/id, optionally versioned (the version is ignored: search.html#reference).
_LITERAL_REF = re.compile(
    r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?"
)


def _value_cond(clause: Clause, table: Any, value: Any, base_url: str) -> ColumnElement[bool]:
    assert clause.param is not None
    kind = clause.param.type
    if kind == "token":
        system, code = value
        conds = []
        if code is not None:
            conds.append(table.c.code == code)
        if system == "":
            conds.append(table.c.system.is_(None))
        elif system is not None:
            conds.append(table.c.system == system)
        return and_(*conds)
    if kind == "string":
        if clause.modifier == "exact":
            return table.c.exact == value
        if clause.modifier == "contains":
            escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            return table.c.norm.like(f"%{escaped}%", escape="\\")
        return and_(table.c.norm >= value, table.c.norm < _prefix_upper(value))
    if kind == "date":
        return _date_cond(table.c.low, table.c.high, *value)
    if kind == "reference":
        return _reference_cond(clause, table, value, base_url)
    return table.c.value == value


def _reference_cond(clause: Clause, table: Any, value: str, base_url: str) -> ColumnElement[bool]:
    """search.html#reference: ``id``, ``Type/id`` (also under this server's base, and with a
    ``/_history/n`` that is ignored), or any other absolute URL matched as written."""
    if value.startswith(base_url + "/"):
        value = value[len(base_url) + 1 :]
    if "://" in value or value.startswith("urn:"):
        return table.c.url == value
    if "/" in value:
        m = _LITERAL_REF.fullmatch(value)
        if m is None:
            return table.c.url == value
        return and_(table.c.target_type == m[1], table.c.target_id == m[2])
    if clause.modifier and clause.modifier != "missing":  # subject:Patient=123
        return and_(table.c.target_type == clause.modifier, table.c.target_id == value)
    return table.c.target_id == value


def clause_condition(plan: SearchPlan, clause: Clause, base_url: str) -> ColumnElement[bool]:
    """One AND-ed clause as a condition on ``resources``."""
    r = resources.c
    if clause.param is None:  # _id / _lastUpdated: every resource has both
        if clause.modifier == "missing":
            return false() if clause.values[0] else true()
        if clause.name == "_id":
            matched = r.id.in_(list(clause.values))
            return not_(matched) if clause.modifier == "not" else matched
        return or_(*(_instant_cond(r.last_updated, *value) for value in clause.values))
    table = INDEX_TABLES[clause.param.type]
    scoped = and_(table.c.type == plan.rtype, table.c.param == clause.name)
    if clause.modifier == "missing":
        present = r.rid.in_(select(table.c.rid).where(scoped))
        return not_(present) if clause.values[0] else present
    matches = or_(*(_value_cond(clause, table, v, base_url) for v in clause.values))
    subquery = select(table.c.rid).where(scoped, matches)
    if clause.modifier == "not":  # search.html#modifiers: resources without a matching token
        return r.rid.not_in(subquery)
    return r.rid.in_(subquery)


def _where(plan: SearchPlan, base_url: str) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = [resources.c.type == plan.rtype, resources.c.deleted == false()]
    conds.extend(clause_condition(plan, c, base_url) for c in plan.clauses)
    return conds


def _keyset(plan: SearchPlan, backwards: bool) -> tuple[list[Any], ColumnElement[bool] | None]:
    """ORDER BY columns and the cursor condition for this page."""
    r = resources.c
    descending = bool(plan.sort_desc) != backwards
    cols = [r.rid] if plan.sort_desc is None else [r.last_updated, r.rid]
    order = [c.desc() if descending else c.asc() for c in cols]
    if plan.cursor is None:
        return order, None
    _direction, ts, rid = plan.cursor
    if (plan.sort_desc is None) != (ts is None):
        raise FHIRError.of(
            400,
            "invalid",
            "The _cursor value belongs to a search with a different _sort (or to a history); "
            "follow the next/previous links of one search without changing its parameters.",
        )
    key = [rid] if plan.sort_desc is None else [ts, rid]
    left = tuple_(*cols) if len(cols) > 1 else cols[0]
    right = tuple_(*[literal(k) for k in key]) if len(key) > 1 else key[0]
    return order, (left < right) if descending else (left > right)


async def run_search(
    db: Database, plan: SearchPlan, base_url: str, *, conn: Any = None
) -> SearchPage:
    """One page of matches (and included resources); inside ``conn``'s transaction if given."""
    if conn is not None:
        return await _run(conn, plan, base_url)
    async with db.read() as read_conn:
        return await _run(read_conn, plan, base_url)


async def _run(conn: Any, plan: SearchPlan, base_url: str) -> SearchPage:
    backwards = plan.cursor is not None and plan.cursor[0] == "before"
    where = _where(plan, base_url)
    order, after = _keyset(plan, backwards)
    r = resources.c
    query: Select[Any] = (
        select(r.rid, r.type, r.id, r.last_updated, r.body)
        .where(*where, after if after is not None else true())
        .order_by(*order)
        .limit(plan.count + 1)
    )
    rows = (await conn.execute(query)).all() if plan.count else []
    more = len(rows) > plan.count
    hits = [Hit(*row) for row in rows[: plan.count]]
    if backwards:
        if not hits and plan.count:
            # Nothing is left before the cursor (those matches were deleted): the previous
            # page is the first page, so the client still gets a page with a next link.
            return await _run(conn, replace(plan, cursor=None), base_url)
        hits.reverse()
    total: int | None = None
    if plan.total == "accurate":
        if plan.cursor is None and not more and plan.count:
            total = len(hits)  # the whole result is on this page: no second query
        else:
            total = (await conn.execute(select(func.count()).where(*where))).scalar_one()
    included = await _included(conn, plan, hits) if hits else []

    def cursor(direction: str, hit: Hit) -> str:
        return encode_cursor(direction, hit.last_updated if plan.sort_desc is not None else None, hit.rid)

    next_cursor = prev_cursor = None
    if hits:
        # Going forward, more rows mean a next page; going backwards, they mean a previous one.
        has_next, has_prev = (True, more) if backwards else (more, plan.cursor is not None)
        next_cursor = cursor("after", hits[-1]) if has_next else None
        prev_cursor = cursor("before", hits[0]) if has_prev else None
    return SearchPage(hits, included, total, next_cursor, prev_cursor)


async def _included(conn: Any, plan: SearchPlan, hits: list[Hit]) -> list[Hit]:
    r = resources.c
    rids = [h.rid for h in hits]
    seen = {(h.type, h.id) for h in hits}
    out: list[Hit] = []
    for _source, pname, target in plan.includes:
        refs = select(idx_reference.c.target_type, idx_reference.c.target_id).where(
            idx_reference.c.rid.in_(rids),
            idx_reference.c.param == pname,
            idx_reference.c.target_id.is_not(None),
        )
        if target:
            refs = refs.where(idx_reference.c.target_type == target)
        pairs = {(t, i) for t, i in (await conn.execute(refs)).all()}
        if pairs:
            query = (
                select(r.rid, r.type, r.id, r.last_updated, r.body)
                .where(tuple_(r.type, r.id).in_(sorted(pairs)), r.deleted == false())
                .order_by(r.rid)
                .limit(MAX_INCLUDED)
            )
            out.extend(Hit(*row) for row in (await conn.execute(query)).all())
    for source, pname in plan.revincludes:
        referring = select(idx_reference.c.rid).where(
            idx_reference.c.type == source,
            idx_reference.c.param == pname,
            idx_reference.c.target_type == plan.rtype,
            idx_reference.c.target_id.in_([h.id for h in hits]),
        )
        query = (
            select(r.rid, r.type, r.id, r.last_updated, r.body)
            .where(r.rid.in_(referring), r.deleted == false())
            .order_by(r.rid)
            .limit(MAX_INCLUDED)
        )
        out.extend(Hit(*row) for row in (await conn.execute(query)).all())
    unique: list[Hit] = []
    for hit in out:
        if (hit.type, hit.id) not in seen:
            seen.add((hit.type, hit.id))
            unique.append(hit)
    return unique
