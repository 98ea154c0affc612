"""The regional FHIR store: create, read, vread, update, delete and history.

Every write runs in one transaction that also rewrites the resource's search-index rows
and appends to the change log (ARCHITECTURE, Store). CPU work (validation, index
extraction) happens before the transaction starts, so the SQLite writer is held only
for the SQL itself. Functions that take a ``conn`` run inside a caller's transaction
(used by Bundle transactions); the others open their own. On PostgreSQL a plain create and a
read go straight to the asyncpg connection (:meth:`Database.driver`), the create as one
statement that writes every row (``_PG_CREATE``).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import DateTime, and_, bindparam, delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.fhir.errors import FHIRError, bad_request, gone, not_found, precondition_failed
from sharedcare.store.db import Database
from sharedcare.store.indexing import Indexer, IndexRows
from sharedcare.store.schema import (
    INDEX_TABLES,
    change_log,
    resource_versions,
    resources,
)
from sharedcare.store.searchparams import HUB_TYPES, OWN_TABLE_PARAMS, load_search_params
from sharedcare.store.validation import ID_RE, validate_resource


def now_utc() -> datetime:
    """Naive UTC; the store keeps every instant in UTC."""
    return datetime.now(UTC).replace(tzinfo=None)


def instant(ts: datetime) -> str:
    """FHIR instant for a naive-UTC datetime."""
    return ts.isoformat(timespec="milliseconds") + "Z"


# Statements built once (building a SQLAlchemy expression per call was a third of a
# create's CPU in bench/store.py's profile).
_READ = select(
    resources.c.version, resources.c.last_updated, resources.c.deleted, resources.c.body
).where(resources.c.type == bindparam("t"), resources.c.id == bindparam("i"))
_INSERT_RESOURCE = insert(resources).returning(resources.c.rid)
_INSERT_VERSION = insert(resource_versions)
_INSERT_CHANGE = insert(change_log)
_INSERT_INDEX = {kind: insert(table) for kind, table in INDEX_TABLES.items()}
# IndexRows attribute per index table; each row tuple is in the table's column order after
# (rid, type), which _pg_create_sql relies on.
_ROWS_ATTR = {
    "token": "tokens",
    "string": "strings",
    "reference": "references",
    "date": "dates",
    "uri": "uris",
}

_PG_READ = "SELECT version, last_updated, deleted, body FROM resources WHERE type = $1 AND id = $2"
# Store.by_token and Store.bodies; the {} take SQLite's (?) or PostgreSQL's ($n) parameter markers.
_BY_TOKEN = (
    "SELECT body FROM resources WHERE type = {} AND NOT deleted AND rid IN ("
    "SELECT rid FROM idx_token WHERE type = {} AND param = {} AND code = {} AND system = {}) "
    "ORDER BY rid LIMIT {}"
)
_BY_TOKEN_SQLITE = _BY_TOKEN.format(*"??????")
_BY_TOKEN_PG = _BY_TOKEN.format(*(f"${n}" for n in range(1, 7)))
_BODIES = "SELECT id, body FROM resources WHERE type = {} AND NOT deleted AND {}"


def _pg_create_sql() -> str:
    """One PostgreSQL statement that writes a new resource: its row, version 1, the change
    log and every index row (a JSON array of rows per index table). A single statement is atomic on
    its own, so it runs without BEGIN/COMMIT: one round trip instead of eight."""
    ctes = [
        (
            "r AS (INSERT INTO resources (type, id, version, last_updated, deleted, body)"
            " VALUES ($1::varchar, $2::varchar, 1, $3::timestamp, false, $4::bytea) RETURNING rid)"
        ),
        (
            "v AS (INSERT INTO resource_versions"
            " (rid, version, type, id, last_updated, method, deleted, body)"
            " SELECT rid, 1, $1, $2, $3, 'create', false, $4 FROM r)"
        ),
        (
            "c AS (INSERT INTO change_log (ts, type, id, version, op, body)"
            " SELECT $3, $1, $2, 1, 'create', $4 FROM r)"
        ),
    ]
    for n, (kind, table) in enumerate(INDEX_TABLES.items(), start=5):
        cols = [c for c in table.columns if c.name not in ("rid", "type")]
        values = ", ".join(
            f"(e->>{i})::timestamp" if isinstance(c.type, DateTime) else f"e->>{i}"
            for i, c in enumerate(cols)
        )
        names = ", ".join(c.name for c in cols)
        ctes.append(
            f"i_{kind} AS (INSERT INTO {table.name} (rid, type, {names})"
            f" SELECT r.rid, $1, {values} FROM r, json_array_elements(${n}::json) AS e)"
        )
    return "WITH " + ",\n".join(ctes) + "\nSELECT rid FROM r"


_PG_CREATE = _pg_create_sql()


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored version of a resource, with its serialised body."""

    type: str
    id: str
    version: int
    last_updated: datetime
    deleted: bool
    body: bytes

    @property
    def etag(self) -> str:
        return f'W/"{self.version}"'

    @property
    def location(self) -> str:
        return f"{self.type}/{self.id}/_history/{self.version}"

    def resource(self) -> dict[str, Any]:
        return orjson.loads(self.body)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A validated resource with its index rows, ready to be written."""

    type: str
    resource: dict[str, Any]
    rows: IndexRows


class Store:
    """The hub's own FHIR store over a :class:`Database`."""

    def __init__(self, db: Database, types: tuple[str, ...] = HUB_TYPES):
        self.db = db
        self.types = types
        params = load_search_params(types)
        for rtype, served in OWN_TABLE_PARAMS.items():
            if rtype in params:
                params[rtype] = {k: v for k, v in params[rtype].items() if k in served}
        self.params = params
        self.indexer = Indexer(self.params)

    # -- checks shared by every interaction ---------------------------------------------
    def check_type(self, rtype: str) -> None:
        if rtype not in self.params:
            raise FHIRError.of(
                404,
                "not-supported",
                f"Resource type {rtype!r} is not supported here; "
                f"supported types: {', '.join(self.types)}.",
            )

    def prepare(self, rtype: str, resource: Any, *, url_id: str | None = None) -> Prepared:
        """Validate a resource body for a write at ``rtype`` (and ``url_id`` for PUT)."""
        self.check_type(rtype)
        if not isinstance(resource, dict):
            raise bad_request("The body must be a JSON object holding one FHIR resource.")
        body_type = resource.get("resourceType")
        if body_type != rtype:
            raise bad_request(
                f"The body's resourceType {body_type!r} does not match {rtype!r} in the URL.",
                expression="resourceType",
            )
        if url_id is not None:
            if not ID_RE.match(url_id):
                raise bad_request(f"{url_id!r} is not a valid FHIR id ([A-Za-z0-9-.], ≤ 64).")
            if resource.get("id") != url_id:
                raise bad_request(
                    f"The body's id {resource.get('id')!r} does not match {url_id!r} in the URL.",
                    expression=f"{rtype}.id",
                )
        validate_resource(rtype, resource)
        return Prepared(rtype, resource, self.indexer.extract(resource))

    # -- reads ----------------------------------------------------------------------------
    async def read(self, rtype: str, rid: str) -> Stored:
        self.check_type(rtype)
        row: Any
        if self.db.dialect == "postgresql":
            async with self.db.driver() as driver:
                row = await driver.fetchrow(_PG_READ, rtype, rid)
        else:
            async with self.db.read() as conn:
                row = (await conn.execute(_READ, {"t": rtype, "i": rid})).first()
        if row is None:
            raise not_found(f"{rtype}/{rid} is not known to this server.")
        version, last_updated, deleted, body = row
        stored = Stored(rtype, rid, version, last_updated, deleted, body)
        if stored.deleted:
            raise FHIRError.of(
                410, "deleted", f"{rtype}/{rid} was deleted.", headers={"ETag": stored.etag}
            )
        return stored

    async def vread(self, rtype: str, rid: str, version: str) -> Stored:
        self.check_type(rtype)
        if not version.isdigit():
            raise bad_request(f"Version {version!r} is not a version id of this server.")
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(resource_versions)
                    .join(resources, resources.c.rid == resource_versions.c.rid)
                    .where(
                        resources.c.type == rtype,
                        resources.c.id == rid,
                        resource_versions.c.version == int(version),
                    )
                )
            ).first()
        if row is None:
            raise not_found(f"{rtype}/{rid} has no version {version}.")
        if row.deleted:
            raise gone(f"Version {version} of {rtype}/{rid} is a deletion.")
        return Stored(rtype, rid, row.version, row.last_updated, False, row.body)

    # -- writes ---------------------------------------------------------------------------
    async def create(self, prepared: Prepared) -> Stored:
        if self.db.dialect == "postgresql":
            return await self._create_one_statement(prepared)
        return await self.db.write(lambda conn: self.create_in(conn, prepared))

    async def _create_one_statement(self, prepared: Prepared) -> Stored:
        """PostgreSQL: the same rows as :meth:`create_in`, in one statement (`_PG_CREATE`)."""
        rid = str(uuid.uuid4())
        ts = now_utc()
        body = _stamp(prepared.resource, rid, 1, ts)
        # Index rows go as one JSON array per table (orjson, in C): asyncpg's encoding of
        # text[] parameters checks every element against collections.abc in Python.
        args: list[Any] = [prepared.type, rid, ts, body]
        args.extend(
            orjson.dumps(getattr(prepared.rows, attr)).decode() for attr in _ROWS_ATTR.values()
        )
        async with self.db.driver() as driver:
            await driver.fetchval(_PG_CREATE, *args)
        return Stored(prepared.type, rid, 1, ts, False, body)

    async def update(
        self, prepared: Prepared, rid: str, if_match: str | None = None
    ) -> tuple[Stored, bool]:
        return await self.db.write(lambda conn: self.update_in(conn, prepared, rid, if_match))

    async def delete(self, rtype: str, rid: str) -> Stored | None:
        self.check_type(rtype)
        return await self.db.write(lambda conn: self.delete_in(conn, rtype, rid))

    async def create_in(
        self, conn: AsyncConnection, prepared: Prepared, rid: str | None = None
    ) -> Stored:
        """Insert version 1 of a new resource (server-assigned id unless ``rid`` given)."""
        rid = rid or str(uuid.uuid4())
        ts = now_utc()
        body = _stamp(prepared.resource, rid, 1, ts)
        values = {
            "type": prepared.type,
            "id": rid,
            "version": 1,
            "last_updated": ts,
            "deleted": False,
            "body": body,
        }
        key = (await conn.execute(_INSERT_RESOURCE, values)).scalar_one()
        await self._record(conn, key, prepared.type, rid, 1, ts, "create", body)
        await self._index(conn, key, prepared.type, prepared.rows, replace=False)
        return Stored(prepared.type, rid, 1, ts, False, body)

    async def create_many_in(
        self, conn: AsyncConnection, items: list[tuple[Prepared, str | None]]
    ) -> list[Stored]:
        """Insert many new resources with one statement per table (bulk loads, transactions)."""
        if not items:
            return []
        ts = now_utc()
        stored = []
        for prepared, rid in items:
            rid = rid or str(uuid.uuid4())
            body = _stamp(prepared.resource, rid, 1, ts)
            stored.append(Stored(prepared.type, rid, 1, ts, False, body))
        keys = (
            (
                await conn.execute(
                    insert(resources).returning(resources.c.rid, sort_by_parameter_order=True),
                    [
                        {
                            "type": s.type,
                            "id": s.id,
                            "version": 1,
                            "last_updated": ts,
                            "deleted": False,
                            "body": s.body,
                        }
                        for s in stored
                    ],
                )
            )
            .scalars()
            .all()
        )
        await conn.execute(
            insert(resource_versions),
            [
                {
                    "rid": k,
                    "version": 1,
                    "type": s.type,
                    "id": s.id,
                    "last_updated": ts,
                    "method": "create",
                    "deleted": False,
                    "body": s.body,
                }
                for k, s in zip(keys, stored, strict=True)
            ],
        )
        await conn.execute(
            insert(change_log),
            [
                {"ts": ts, "type": s.type, "id": s.id, "version": 1, "op": "create", "body": s.body}
                for s in stored
            ],
        )
        merged: dict[str, list[dict[str, Any]]] = {kind: [] for kind in INDEX_TABLES}
        for key, (prepared, _rid) in zip(keys, items, strict=True):
            for kind, values in index_values(key, prepared.type, prepared.rows).items():
                merged[kind].extend(values)
        for kind, values in merged.items():
            if values:
                await conn.execute(insert(INDEX_TABLES[kind]), values)
        return stored

    async def update_in(
        self, conn: AsyncConnection, prepared: Prepared, rid: str, if_match: str | None = None
    ) -> tuple[Stored, bool]:
        """Write a new version (or version 1: update-as-create). Returns (stored, created)."""
        current = await self._lock_current(conn, prepared.type, rid)
        if current is None:
            if if_match is not None:
                raise precondition_failed(
                    f"{prepared.type}/{rid} does not exist; If-Match cannot hold."
                )
            return await self.create_in(conn, prepared, rid), True
        key, version, _deleted = current
        if if_match is not None and parse_etag(if_match) != version:
            raise precondition_failed(
                f"{prepared.type}/{rid} is at version {version}, not {if_match}; "
                "read it again and reapply your change."
            )
        version += 1
        ts = now_utc()
        body = _stamp(prepared.resource, rid, version, ts)
        await conn.execute(
            update(resources)
            .where(resources.c.rid == key)
            .values(version=version, last_updated=ts, deleted=False, body=body)
        )
        await self._record(conn, key, prepared.type, rid, version, ts, "update", body)
        await self._index(conn, key, prepared.type, prepared.rows, replace=True)
        return Stored(prepared.type, rid, version, ts, False, body), False

    async def delete_in(self, conn: AsyncConnection, rtype: str, rid: str) -> Stored | None:
        """Write a tombstone version; None when it was already deleted."""
        current = await self._lock_current(conn, rtype, rid)
        if current is None:
            raise not_found(f"{rtype}/{rid} is not known to this server.")
        key, version, deleted = current
        if deleted:
            return None
        version += 1
        ts = now_utc()
        await conn.execute(
            update(resources)
            .where(resources.c.rid == key)
            .values(version=version, last_updated=ts, deleted=True, body=b"")
        )
        await self._record(conn, key, rtype, rid, version, ts, "delete", b"")
        for table in INDEX_TABLES.values():
            await conn.execute(delete(table).where(table.c.rid == key))
        return Stored(rtype, rid, version, ts, True, b"")

    async def _lock_current(
        self, conn: AsyncConnection, rtype: str, rid: str
    ) -> tuple[int, int, bool] | None:
        query = select(resources.c.rid, resources.c.version, resources.c.deleted).where(
            resources.c.type == rtype, resources.c.id == rid
        )
        if self.db.dialect == "postgresql":
            query = query.with_for_update()
        row = (await conn.execute(query)).first()
        return None if row is None else (row.rid, row.version, row.deleted)

    async def _record(
        self,
        conn: AsyncConnection,
        key: int,
        rtype: str,
        rid: str,
        version: int,
        ts: datetime,
        op: str,
        body: bytes,
    ) -> None:
        await conn.execute(
            _INSERT_VERSION,
            {
                "rid": key,
                "version": version,
                "type": rtype,
                "id": rid,
                "last_updated": ts,
                "method": op,
                "deleted": op == "delete",
                "body": body,
            },
        )
        await conn.execute(
            _INSERT_CHANGE,
            {
                "ts": ts,
                "type": rtype,
                "id": rid,
                "version": version,
                "op": op,
                "body": body or None,
            },
        )

    async def _index(
        self, conn: AsyncConnection, key: int, rtype: str, rows: IndexRows, *, replace: bool
    ) -> None:
        if replace:
            for table in INDEX_TABLES.values():
                await conn.execute(delete(table).where(table.c.rid == key))
        for kind, values in index_values(key, rtype, rows).items():
            if values:
                await conn.execute(_INSERT_INDEX[kind], values)

    async def advisory_lock(self, conn: AsyncConnection, key: str) -> None:
        """Serialise writers on ``key`` (conditional create); SQLite has one writer already."""
        if self.db.dialect == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": key})

    async def by_token(
        self, rtype: str, param: str, system: str, code: str, *, limit: int
    ) -> list[bytes]:
        """Bodies of live ``rtype`` resources whose ``param`` token is ``system|code``, in
        creation order: the search ``{rtype}?{param}={system}|{code}`` as one statement.

        For the hub's own hot lookups (the registry refreshes each system a client or a
        query uses about once a second, in every process). Through the search machinery on
        SQLite that was 1.7 ms of the event loop each; here it is an inline index probe
        (:class:`~sharedcare.store.db.InlineReader`), and one asyncpg statement on PostgreSQL.
        """
        params = (rtype, rtype, param, code, system, limit)
        if self.db.inline is not None:
            return [row[0] for row in self.db.inline.fetch(_BY_TOKEN_SQLITE, params)]
        async with self.db.driver() as driver:
            return [row[0] for row in await driver.fetch(_BY_TOKEN_PG, *params)]

    async def bodies(self, rtype: str, ids: Iterable[str]) -> dict[str, bytes]:
        """Bodies of the live ``rtype`` resources among ``ids``, by id (missing ones left out)."""
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        if self.db.inline is not None:
            marks = ", ".join("?" * len(wanted))
            rows = self.db.inline.fetch(_BODIES.format("?", f"id IN ({marks})"), (rtype, *wanted))
        else:
            async with self.db.driver() as driver:
                rows = await driver.fetch(_BODIES.format("$1", "id = ANY($2::text[])"), rtype, wanted)
        return {row[0]: row[1] for row in rows}

    async def count(self, rtype: str) -> int:
        async with self.db.read() as conn:
            return (
                await conn.execute(
                    select(func.count()).where(
                        and_(resources.c.type == rtype, resources.c.deleted.is_(False))
                    )
                )
            ).scalar_one()


def index_values(key: int, rtype: str, rows: IndexRows) -> dict[str, list[dict[str, Any]]]:
    """Index rows as parameter dicts for executemany, by index table kind."""
    return {
        "token": [
            {"rid": key, "type": rtype, "param": p, "system": s, "code": c}
            for p, s, c in rows.tokens
        ],
        "string": [
            {"rid": key, "type": rtype, "param": p, "norm": n, "exact": e}
            for p, n, e in rows.strings
        ],
        "reference": [
            {"rid": key, "type": rtype, "param": p, "target_type": tt, "target_id": ti, "url": u}
            for p, tt, ti, u in rows.references
        ],
        "date": [
            {"rid": key, "type": rtype, "param": p, "low": lo, "high": hi}
            for p, lo, hi in rows.dates
        ],
        "uri": [{"rid": key, "type": rtype, "param": p, "value": v} for p, v in rows.uris],
    }


def parse_etag(value: str) -> int | None:
    """The version in an ETag/If-Match value (``W/"3"``, ``"3"`` or ``3``)."""
    raw = value.strip()
    raw = raw.removeprefix("W/")
    raw = raw.strip('"')
    return int(raw) if raw.isdigit() else None


def _stamp(resource: dict[str, Any], rid: str, version: int, ts: datetime) -> bytes:
    """Serialise with the server-owned id and meta (hl7.org/fhir/R4/resource.html#Meta)."""
    meta = dict(resource.get("meta") or {})
    meta["versionId"] = str(version)
    meta["lastUpdated"] = instant(ts)
    out = {"resourceType": resource["resourceType"], "id": rid, "meta": meta}
    out.update((k, v) for k, v in resource.items() if k not in ("resourceType", "id", "meta"))
    return orjson.dumps(out)
