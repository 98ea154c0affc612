"""Run a :class:`SearchPlan` against the store and page through the matches.

Each clause becomes ``rid IN (SELECT rid FROM idx_<kind> WHERE type, param, value…)`` so
both SQLite and PostgreSQL drive the search from the narrow index table. Paging is by
keyset on (sort key, rid) carried in an opaque ``_cursor``: stable under concurrent
inserts, and as cheap on page 1,000 as on page 1 (search.html#paging).

Statements are built once per *shape* of a search (type, parameters, modifiers, the kind
and number of values, sort, cursor direction) with bind parameters for the values, and
kept in an LRU cache: building a SQLAlchemy expression tree per request was a third of an
identifier search's CPU in bench/store.py's profile. On PostgreSQL a search that runs
outside a caller's transaction goes straight to the asyncpg connection
(:meth:`Database.driver`) with the statement compiled once per shape.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Integer,
    Select,
    and_,
    bindparam,
    false,
    func,
    not_,
    or_,
    select,
    true,
    tuple_,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.sql.elements import BindParameter

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


# --------------------------------------------------------------------------- shapes
#
# A search's shape is everything that decides the SQL text; its values go into bind
# parameters v0, v1, ... in the order the shape lists them. `_shape` computes both from a
# plan (plain Python, cheap); `_statements` builds the SQL for a shape (cached).

# Type/id, optionally versioned (the version is ignored: search.html#reference).
_LITERAL_REF = re.compile(
    r"([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?"
)

ValueShape = tuple[str, int]  # (variant, number of bound values)
ClauseShape = tuple[str, str | None, str | None, Any]  # (name, kind, modifier, values' shapes)


def _value_shape(clause: Clause, value: Any, base_url: str) -> tuple[ValueShape, tuple[Any, ...]]:
    """The SQL variant one search value needs, and the values it binds."""
    assert clause.param is not None
    kind = clause.param.type
    if kind == "token":
        system, code = value
        bound = (() if code is None else (code,)) + (() if not system else (system,))
        variant = ("c" if code is not None else "") + (
            "n" if system == "" else "s" if system else ""
        )
        return ("token-" + variant, len(bound)), bound
    if kind == "string":
        if clause.modifier == "exact":
            return ("exact", 1), (value,)
        if clause.modifier == "contains":
            escaped = value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            return ("contains", 1), (f"%{escaped}%",)
        return ("prefix", 2), (value, _prefix_upper(value))
    if kind == "date":
        prefix, low, high = value
        return ("date-" + prefix, 2), (low, high)
    if kind == "reference":
        return _reference_shape(clause, value, base_url)
    return ("uri", 1), (value,)


def _reference_shape(
    clause: Clause, value: str, base_url: str
) -> tuple[ValueShape, tuple[Any, ...]]:
    """search.html#reference: ``id``, ``Type/id`` (also under this server's base, and with a
    ``/_history/n`` that is ignored), or any other absolute URL matched as written."""
    if value.startswith(base_url + "/"):
        value = value[len(base_url) + 1 :]
    if "://" in value or value.startswith("urn:"):
        return ("url", 1), (value,)
    if "/" in value:
        m = _LITERAL_REF.fullmatch(value)
        if m is None:
            return ("url", 1), (value,)
        return ("typed", 2), (m[1], m[2])
    if clause.modifier and clause.modifier != "missing":  # subject:Patient=123
        return ("typed", 2), (clause.modifier, value)
    return ("id", 1), (value,)


def _shape(
    plan: SearchPlan, base_url: str, backwards: bool
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """The plan's shape (hashable) and its bound values by parameter name."""
    values: list[Any] = []
    clauses: list[ClauseShape] = []
    for clause in plan.clauses:
        kind = clause.param.type if clause.param is not None else None
        if clause.modifier == "missing":
            clauses.append((clause.name, kind, "missing", bool(clause.values[0])))
            continue
        if clause.name == "_id" and kind is None:
            values.extend(clause.values)
            clauses.append((clause.name, None, clause.modifier, len(clause.values)))
            continue
        if kind is None:  # _lastUpdated
            shapes: list[ValueShape] = []
            for prefix, low, high in clause.values:
                shapes.append((prefix, 2))
                values.extend((low, high))
            clauses.append((clause.name, None, clause.modifier, tuple(shapes)))
            continue
        shapes = []
        for value in clause.values:
            shape, bound = _value_shape(clause, value, base_url)
            shapes.append(shape)
            values.extend(bound)
        clauses.append((clause.name, kind, clause.modifier, tuple(shapes)))
    cursor: str | None = None
    if plan.cursor is not None:
        _direction, ts, rid = plan.cursor
        if (plan.sort_desc is None) != (ts is None):
            raise FHIRError.of(
                400,
                "invalid",
                "The _cursor value belongs to a search with a different _sort (or to a history); "
                "follow the next/previous links of one search without changing its parameters.",
            )
        cursor = "keyset"
        values.extend((rid,) if ts is None else (ts, rid))
    named = {f"v{i}": v for i, v in enumerate(values)}
    named["limit"] = plan.count + 1
    return (plan.rtype, tuple(clauses), plan.sort_desc, backwards, cursor), named


class _Binds:
    """Hands out bind parameters v0, v1, ... in the order `_shape` listed their values."""

    def __init__(self) -> None:
        self.n = 0

    def take(self, count: int, type_: Any = None) -> list[BindParameter[Any]]:
        out = [bindparam(f"v{self.n + i}", type_=type_) for i in range(count)]
        self.n += count
        return out


def _date_cond(lo: Any, hi: Any, prefix: str, low: Any, high: Any) -> ColumnElement[bool]:
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


def instant_cond(ts: Any, prefix: str, low: Any, high: Any) -> ColumnElement[bool]:
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


def _value_sql(table: Any, shape: ValueShape, b: list[BindParameter[Any]]) -> ColumnElement[bool]:
    variant = shape[0]
    c = table.c
    if variant.startswith("token-"):
        flags = variant[6:]
        conds = []
        i = 0
        if "c" in flags:
            conds.append(c.code == b[i])
            i += 1
        if "n" in flags:
            conds.append(c.system.is_(None))
        elif "s" in flags:
            conds.append(c.system == b[i])
        return and_(*conds) if conds else true()
    if variant == "exact":
        return c.exact == b[0]
    if variant == "contains":
        return c.norm.like(b[0], escape="\\")
    if variant == "prefix":
        return and_(c.norm >= b[0], c.norm < b[1])
    if variant.startswith("date-"):
        return _date_cond(c.low, c.high, variant[5:], b[0], b[1])
    if variant == "url":
        return c.url == b[0]
    if variant == "typed":
        return and_(c.target_type == b[0], c.target_id == b[1])
    if variant == "id":
        return c.target_id == b[0]
    return c.value == b[0]


def _clause_sql(
    rtype: str, clause: ClauseShape, binds: _Binds
) -> ColumnElement[bool] | Select[Any]:
    """One AND-ed clause as a condition on ``resources``, or, for a plain match in an index
    table, the subquery of the matching ids (:func:`_statements` nests those)."""
    name, kind, modifier, shapes = clause
    r = resources.c
    if kind is None:  # _id / _lastUpdated: every resource has both
        if modifier == "missing":
            return false() if shapes else true()
        if name == "_id":
            matched = r.id.in_(binds.take(shapes))
            return not_(matched) if modifier == "not" else matched
        return or_(
            *(instant_cond(r.last_updated, p, *binds.take(2, DateTime())) for p, _n in shapes)
        )
    table = INDEX_TABLES[kind]
    scoped = and_(table.c.type == rtype, table.c.param == name)
    if modifier == "missing":
        present = r.rid.in_(select(table.c.rid).where(scoped))
        return not_(present) if shapes else present
    matches = or_(*(_value_sql(table, shape, binds.take(shape[1])) for shape in shapes))
    subquery = select(table.c.rid).where(scoped, matches)
    if modifier == "not":  # search.html#modifiers: resources without a matching token
        return r.rid.not_in(subquery)
    return subquery


def _nested(subqueries: list[Select[Any]]) -> Select[Any]:
    """``rid IN (a) AND rid IN (b)`` as ``rid IN (a WHERE rid IN (b))``.

    The same set, but PostgreSQL then joins the clauses' ids from the indexes alone (a hash
    semi-join of two index-only scans) and reads ``resources`` only for ids in both, where
    two separate INs made it read the table row of every match of the first clause: with
    200,000 Patients, ``family=lew&given=mo`` went from 31-41 to 5.5 ms, its count from
    42 to 5 ms.
    """
    inner = subqueries[-1]
    for outer in reversed(subqueries[:-1]):
        inner = outer.where(outer.selected_columns[0].in_(inner))
    return inner


@dataclass(slots=True)
class _Statements:
    page: Select[Any]
    count: Select[Any]
    compiled: dict[str, tuple[str, tuple[str, ...], dict[str, Any]]]


@lru_cache(maxsize=1024)
def _statements(shape: tuple[Any, ...], nest: bool = False) -> _Statements:
    """The page and count statements of a search shape; ``nest``: the index clauses as one
    nested subquery (PostgreSQL, :func:`_nested`) rather than one IN each (SQLite, whose
    planner measured 67 against 42 name searches/s the other way round)."""
    rtype, clauses, sort_desc, backwards, cursor = shape
    binds = _Binds()
    r = resources.c
    where: list[ColumnElement[bool]] = [r.type == rtype, r.deleted == false()]
    subqueries: list[Select[Any]] = []
    for clause in clauses:  # in order: each takes its bind parameters in turn
        sql = _clause_sql(rtype, clause, binds)
        if isinstance(sql, Select):
            subqueries.append(sql)
        else:
            where.append(sql)
    if nest and subqueries:
        where.append(r.rid.in_(_nested(subqueries)))
    else:
        where.extend(r.rid.in_(sub) for sub in subqueries)
    descending = bool(sort_desc) != backwards
    cols = [r.rid] if sort_desc is None else [r.last_updated, r.rid]
    order = [col.desc() if descending else col.asc() for col in cols]
    after: ColumnElement[bool] = true()
    if cursor is not None:
        if sort_desc is None:
            key: Any = binds.take(1, BigInteger())[0]
            left: Any = r.rid
        else:
            key = tuple_(*binds.take(1, DateTime()), *binds.take(1, BigInteger()))
            left = tuple_(*cols)
        after = (left < key) if descending else (left > key)
    page = (
        select(r.rid, r.type, r.id, r.last_updated, r.body)
        .where(*where, after)
        .order_by(*order)
        .limit(bindparam("limit", type_=Integer()))
    )
    return _Statements(page, select(func.count()).where(*where), {})


# --------------------------------------------------------------------------- execution


class _Rows:
    """Runs statements on a SQLAlchemy connection (SQLite, or inside a caller's transaction)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.postgresql = conn.dialect.name == "postgresql"

    async def rows(
        self, stmt: Any, values: dict[str, Any] | None = None
    ) -> Sequence[Sequence[Any]]:
        return (await self.conn.execute(stmt, values or {})).all()

    async def cached_rows(
        self, stmts: _Statements, which: str, values: dict[str, Any]
    ) -> Sequence[Sequence[Any]]:
        return await self.rows(getattr(stmts, which), values)


class _DriverRows(_Rows):
    """Runs statements on a bare asyncpg connection, compiled for PostgreSQL once per shape."""

    def __init__(self, conn: Any, dialect: Dialect) -> None:
        self.conn = conn
        self.postgresql = True
        self.dialect = dialect

    async def rows(
        self, stmt: Any, values: dict[str, Any] | None = None
    ) -> Sequence[Sequence[Any]]:
        sql, names, defaults = _pg_compile(stmt, self.dialect, values)
        return await self.conn.fetch(sql, *[defaults[n] for n in names])

    async def cached_rows(
        self, stmts: _Statements, which: str, values: dict[str, Any]
    ) -> Sequence[Sequence[Any]]:
        compiled = stmts.compiled.get(which)
        if compiled is None:
            compiled = stmts.compiled[which] = _pg_compile(
                getattr(stmts, which), self.dialect, None
            )
        sql, names, defaults = compiled
        return await self.conn.fetch(
            sql, *[values[n] if n in values else defaults[n] for n in names]
        )


def _pg_compile(
    stmt: Any, dialect: Dialect, values: dict[str, Any] | None
) -> tuple[str, tuple[str, ...], dict[str, Any]]:
    """PostgreSQL SQL with positional ($n) parameters, their names in order, and bound values."""
    compiled = stmt.compile(dialect=dialect, compile_kwargs={"render_postcompile": True})
    # Values go to asyncpg as they are: every type used here converts nothing on the way in.
    processors = getattr(compiled, "_bind_processors", {}).values()
    assert all(not p or (isinstance(p, tuple) and not any(p)) for p in processors), processors
    params = compiled.construct_params(values, _check=False) if values else dict(compiled.params)
    return compiled.string, tuple(compiled.positiontup or ()), params


async def run_search(
    db: Database, plan: SearchPlan, base_url: str, *, conn: Any = None
) -> SearchPage:
    """One page of matches (and included resources); inside ``conn``'s transaction if given."""
    if conn is not None:
        return await _run(_Rows(conn), plan, base_url)
    if db.dialect == "postgresql":
        async with db.driver() as driver_conn:
            return await _run(_DriverRows(driver_conn, db.engine.dialect), plan, base_url)
    async with db.read() as read_conn:
        return await _run(_Rows(read_conn), plan, base_url)


async def _run(ex: _Rows, plan: SearchPlan, base_url: str) -> SearchPage:
    backwards = plan.cursor is not None and plan.cursor[0] == "before"
    shape, values = _shape(plan, base_url, backwards)
    stmts = _statements(shape, ex.postgresql)
    rows = await ex.cached_rows(stmts, "page", values) if plan.count else []
    more = len(rows) > plan.count
    hits = [Hit(*row) for row in rows[: plan.count]]
    if backwards:
        if not hits and plan.count:
            # Nothing is left before the cursor (those matches were deleted): the previous
            # page is the first page, so the client still gets a page with a next link.
            return await _run(ex, replace(plan, cursor=None), base_url)
        hits.reverse()
    total: int | None = None
    if plan.total == "accurate":
        if plan.cursor is None and not more and plan.count:
            total = len(hits)  # the whole result is on this page: no second query
        else:
            total = (await ex.cached_rows(stmts, "count", values))[0][0]
    included = await _included(ex, plan, hits) if hits else []

    def cursor(direction: str, hit: Hit) -> str:
        return encode_cursor(
            direction, hit.last_updated if plan.sort_desc is not None else None, hit.rid
        )

    next_cursor = prev_cursor = None
    if hits:
        # Going forward, more rows mean a next page; going backwards, they mean a previous one.
        has_next, has_prev = (True, more) if backwards else (more, plan.cursor is not None)
        next_cursor = cursor("after", hits[-1]) if has_next else None
        prev_cursor = cursor("before", hits[0]) if has_prev else None
    return SearchPage(hits, included, total, next_cursor, prev_cursor)


@lru_cache(maxsize=256)
def _include_refs(pname: str, target: str | None, n: int) -> _Statements:
    """References held by ``n`` matches under ``pname`` (to ``target`` only, if given)."""
    ref = idx_reference.c
    query = select(ref.target_type, ref.target_id).where(
        ref.rid.in_(_Binds().take(n, BigInteger())), ref.param == pname, ref.target_id.is_not(None)
    )
    if target:
        query = query.where(ref.target_type == target)
    return _Statements(query, query, {})


@lru_cache(maxsize=256)
def _include_targets(n: int) -> _Statements:
    """Current resources with ``n`` (type, id) pairs (v0, v1 = type, id of the first, ...)."""
    r = resources.c
    binds = _Binds()
    pairs = [tuple_(*binds.take(2)) for _ in range(n)]
    query = (
        select(r.rid, r.type, r.id, r.last_updated, r.body)
        .where(tuple_(r.type, r.id).in_(pairs), r.deleted == false())
        .order_by(r.rid)
        .limit(MAX_INCLUDED)
    )
    return _Statements(query, query, {})


@lru_cache(maxsize=256)
def _revinclude_sources(source: str, pname: str, rtype: str, n: int) -> _Statements:
    """``source`` resources whose ``pname`` refers to one of ``n`` ids of type ``rtype``."""
    r = resources.c
    ref = idx_reference.c
    referring = select(ref.rid).where(
        ref.type == source,
        ref.param == pname,
        ref.target_type == rtype,
        ref.target_id.in_(_Binds().take(n)),
    )
    query = (
        select(r.rid, r.type, r.id, r.last_updated, r.body)
        .where(r.rid.in_(referring), r.deleted == false())
        .order_by(r.rid)
        .limit(MAX_INCLUDED)
    )
    return _Statements(query, query, {})


def _numbered(values: Sequence[Any]) -> dict[str, Any]:
    return {f"v{i}": v for i, v in enumerate(values)}


async def _included(ex: _Rows, plan: SearchPlan, hits: list[Hit]) -> list[Hit]:
    rids = _numbered([h.rid for h in hits])
    seen = {(h.type, h.id) for h in hits}
    out: list[Hit] = []
    for _source, pname, target in plan.includes:
        refs = await ex.cached_rows(_include_refs(pname, target, len(hits)), "page", rids)
        pairs = sorted({(t, i) for t, i in refs})
        if pairs:
            flat = _numbered([x for pair in pairs for x in pair])
            rows = await ex.cached_rows(_include_targets(len(pairs)), "page", flat)
            out.extend(Hit(*row) for row in rows)
    for source, pname in plan.revincludes:
        ids = _numbered([h.id for h in hits])
        rows = await ex.cached_rows(
            _revinclude_sources(source, pname, plan.rtype, len(hits)), "page", ids
        )
        out.extend(Hit(*row) for row in rows)
    unique: list[Hit] = []
    for hit in out:
        if (hit.type, hit.id) not in seen:
            seen.add((hit.type, hit.id))
            unique.append(hit)
    return unique
