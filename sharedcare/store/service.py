"""FHIR REST interactions on the store, free of transport (STYLE §2).

Each method takes plain values and returns a :class:`Result`; the Starlette routes and
the batch/transaction processor are thin adapters over these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, urlencode

from sharedcare.fhir.bundles import BundleWriter
from sharedcare.fhir.errors import FHIRError, Issue, operation_outcome
from sharedcare.metrics.registry import record_store_read, record_store_write
from sharedcare.store.history import history, parse_since
from sharedcare.store.repository import Store, Stored, instant
from sharedcare.store.search import SearchPage, run_search
from sharedcare.store.search_parse import SearchPlan, parse_search


@dataclass(slots=True)
class Result:
    """What an interaction produced: status, body (bytes or dict) and headers."""

    status: int
    body: bytes | dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)


def version_headers(stored: Stored, base: str) -> dict[str, str]:
    return {
        "ETag": stored.etag,
        "Last-Modified": instant(stored.last_updated),
        "Location": f"{base}/{stored.location}",
    }


class FhirService:
    """The store's interactions, as plain async functions."""

    def __init__(self, store: Store, *, fhir_base: str, default_count: int, max_count: int):
        self.store = store
        self.base = fhir_base
        self.default_count = default_count
        self.max_count = max_count

    # -- instance level -------------------------------------------------------------------
    async def read(self, rtype: str, rid: str) -> Result:
        stored = await self.store.read(rtype, rid)
        record_store_read("read", rtype)
        return Result(200, stored.body, _cache_headers(stored))

    async def vread(self, rtype: str, rid: str, vid: str) -> Result:
        stored = await self.store.vread(rtype, rid, vid)
        record_store_read("vread", rtype)
        return Result(200, stored.body, _cache_headers(stored))

    async def create(
        self, rtype: str, body: Any, *, if_none_exist: str | None = None, prefer: str | None = None
    ) -> Result:
        prepared = self.store.prepare(rtype, body)
        if if_none_exist:
            plan = self.plan(rtype, parse_qsl(if_none_exist.lstrip("?"), keep_blank_values=True))
            if not plan.clauses:  # no criteria would match any resource of the type
                raise FHIRError.of(
                    400,
                    "invalid",
                    f"If-None-Exist {if_none_exist!r} holds no search criteria; "
                    "give some, e.g. identifier=system|value.",
                )

            async def conditional(conn: Any) -> tuple[Stored | None, Stored | None]:
                await self.store.advisory_lock(conn, f"{rtype}?{if_none_exist}")
                page = await run_search(self.store.db, _limit(plan, 2), self.base, conn=conn)
                if len(page.matches) > 1:
                    raise FHIRError.of(
                        412,
                        "multiple-matches",
                        f"If-None-Exist {if_none_exist!r} matches more than one {rtype}.",
                    )
                if page.matches:
                    hit = page.matches[0]
                    return None, await self.store.read(rtype, hit.id)
                return await self.store.create_in(conn, prepared), None

            created, existing = await self.store.db.write(conditional)
            if existing is not None:
                return _representation(200, existing, self.base, prefer)
            assert created is not None
        else:
            created = await self.store.create(prepared)
        record_store_write("create", rtype)
        return _representation(201, created, self.base, prefer)

    async def update(
        self,
        rtype: str,
        rid: str,
        body: Any,
        *,
        if_match: str | None = None,
        prefer: str | None = None,
    ) -> Result:
        prepared = self.store.prepare(rtype, body, url_id=rid)
        stored, created = await self.store.update(prepared, rid, if_match)
        record_store_write("create" if created else "update", rtype)
        return _representation(201 if created else 200, stored, self.base, prefer)

    async def delete(self, rtype: str, rid: str) -> Result:
        stored = await self.store.delete(rtype, rid)
        record_store_write("delete", rtype)
        headers = {"ETag": stored.etag} if stored else {}
        return Result(204, None, headers)

    # -- type level -----------------------------------------------------------------------
    def plan(self, rtype: str, items: list[tuple[str, str]], *, lenient: bool = False) -> SearchPlan:
        self.store.check_type(rtype)
        return parse_search(
            rtype,
            items,
            self.store.params[rtype],
            default_count=self.default_count,
            max_count=self.max_count,
            all_params=self.store.params,
            lenient=lenient,
        )

    async def search(self, rtype: str, items: list[tuple[str, str]], *, lenient: bool = False) -> Result:
        plan = self.plan(rtype, items, lenient=lenient)
        page = await run_search(self.store.db, plan, self.base)
        record_store_read("search", rtype)
        return Result(200, self._searchset(plan, page))

    def _searchset(self, plan: SearchPlan, page: SearchPage) -> bytes:
        out = BundleWriter("searchset")
        out.total = page.total
        url = f"{self.base}/{plan.rtype}"
        echo = urlencode(plan.echo)
        out.link("self", f"{url}?{echo}" if echo else url)
        sep = "&" if echo else ""
        if page.next_cursor:
            out.link("next", f"{url}?{echo}{sep}_cursor={page.next_cursor}")
        if page.prev_cursor:
            out.link("previous", f"{url}?{echo}{sep}_cursor={page.prev_cursor}")
        for hit in page.matches:
            out.add({"fullUrl": f"{self.base}/{hit.type}/{hit.id}", "search": {"mode": "match"}}, hit.body)
        for hit in page.included:
            out.add({"fullUrl": f"{self.base}/{hit.type}/{hit.id}", "search": {"mode": "include"}}, hit.body)
        if plan.warnings:
            out.add({"search": {"mode": "outcome"}, "resource": operation_outcome(*plan.warnings)})
        return out.render()

    async def history(
        self, rtype: str, rid: str | None, items: list[tuple[str, str]]
    ) -> Result:
        self.store.check_type(rtype)
        params = dict(items)
        unknown = set(params) - {"_count", "_since", "_cursor", "_format", "_pretty"}
        if unknown:
            raise FHIRError.of(
                400, "not-supported", f"History supports _count, _since and paging; not {sorted(unknown)}."
            )
        plan = self.plan(rtype, [(k, v) for k, v in items if k in ("_count", "_cursor")])
        page = await history(
            self.store.db,
            rtype,
            rid,
            count=plan.count,
            since=parse_since(params.get("_since")),
            cursor=plan.cursor,
        )
        record_store_read("history", rtype)
        out = BundleWriter("history")
        url = f"{self.base}/{rtype}" + (f"/{rid}" if rid else "") + "/_history"
        echo = urlencode([(k, v) for k, v in items if k in ("_count", "_since")])
        out.link("self", f"{url}?{echo}" if echo else url)
        if page.next_cursor:
            out.link("next", f"{url}?{echo}{'&' if echo else ''}_cursor={page.next_cursor}")
        for v in page.versions:
            full = f"{self.base}/{v.type}/{v.id}"
            method = {"create": "POST", "update": "PUT", "delete": "DELETE"}[v.method]
            entry = {
                "fullUrl": full,
                "request": {"method": method, "url": v.type if method == "POST" else f"{v.type}/{v.id}"},
                "response": {
                    "status": {"create": "201 Created", "update": "200 OK", "delete": "204 No Content"}[v.method],
                    "etag": f'W/"{v.version}"',
                    "lastModified": instant(v.last_updated),
                },
            }
            out.add(entry, v.body or None)
        return Result(200, out.render())


def _limit(plan: SearchPlan, count: int) -> SearchPlan:
    plan.count = count
    plan.total = "none"
    return plan


def _cache_headers(stored: Stored) -> dict[str, str]:
    return {"ETag": stored.etag, "Last-Modified": instant(stored.last_updated)}


def _representation(status: int, stored: Stored, base: str, prefer: str | None) -> Result:
    """Honour ``Prefer: return=`` (hl7.org/fhir/R4/http.html#ops)."""
    headers = version_headers(stored, base)
    wanted = (prefer or "").replace(" ", "")
    if "return=minimal" in wanted:
        return Result(status, None, headers)
    if "return=OperationOutcome" in wanted:
        verb = "created" if status == 201 else "stored"
        issue = Issue("informational", f"{stored.type}/{stored.id} {verb} as version {stored.version}.", "information")
        return Result(status, operation_outcome(issue), headers)
    return Result(status, stored.body, headers)
