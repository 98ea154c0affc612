"""The participant registry over the regional store, with a short-lived in-process cache.

Reads and writes go through the store's public functions (``FhirService.plan``,
``run_search``, ``Store.prepare``/``create_in``/``update_in``), so every change is a
versioned resource in the change log like any other write.

Cache bound: a process trusts a looked-up system for ``cache_seconds`` (setting
``registry_cache_seconds``, default 2 s). A suspension, a new key or a scope change made by
any process or through the FHIR API therefore takes effect in every process within that
time (plus one database read).

Refresh ahead: a lookup that finds an entry older than half of ``cache_seconds`` still
answers from it, and starts one background read to replace it. With steady traffic no
request waits for the registry (before, each system's entry expired every 2 s in every
process, and the request that found it expired paid a search with an include: on a busy
2-core machine, several milliseconds of the federated query's p99). Only an entry past
``cache_seconds`` is read while the caller waits, and concurrent callers share that one
read. The bound above is unchanged: an entry is stamped with the time its read *started*,
and never served once older than ``cache_seconds``.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson
import structlog

from sharedcare.fhir.errors import FHIRError, conflict, not_found
from sharedcare.registry.model import (
    CLIENT_ID_RE,
    CLIENT_ID_SYSTEM,
    HUB_CONNECTION_TYPES,
    ODS_SYSTEM,
    SYSTEM_CONNECTION,
    System,
    endpoint_resources,
    organization_resource,
    system_from_resources,
    with_status,
)
from sharedcare.store.search import SearchPage, run_search
from sharedcare.store.service import FhirService

PAGE = 500
REFRESH_AHEAD = 0.5  # fraction of cache_seconds after which a hit refreshes in the background
log = structlog.get_logger("sharedcare.registry")


class Registry:
    """Participant systems: register, look up (cached), list, suspend and activate."""

    def __init__(
        self,
        fhir: FhirService,
        *,
        cache_seconds: float = 2.0,
        max_cached: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.fhir = fhir
        self.store = fhir.store
        self.cache_seconds = cache_seconds
        self.max_cached = max_cached
        self.clock = clock
        self._cache: OrderedDict[str, tuple[float, System | None]] = OrderedDict()
        self._reading: dict[str, asyncio.Future[System | None]] = {}
        self._epoch = 0  # bumped by forget(): a read that started before it is not cached

    # -- reads ----------------------------------------------------------------------------
    async def _search(self, rtype: str, items: list[tuple[str, str]], conn: Any = None) -> SearchPage:
        plan = self.fhir.plan(rtype, items)
        return await run_search(self.store.db, plan, self.fhir.base, conn=conn)

    async def get(self, client_id: str) -> System | None:
        """The system registered as ``client_id``, read from the store now."""
        if not CLIENT_ID_RE.match(client_id):
            return None
        # Endpoint?identifier={CLIENT_ID_SYSTEM}|{client_id}&_include=Endpoint:organization,
        # as two index probes: this read runs about once a second per system in use.
        found = await self.store.by_token("Endpoint", "identifier", CLIENT_ID_SYSTEM, client_id, limit=20)
        endpoints = [orjson.loads(body) for body in found]
        refs = (str((e.get("managingOrganization") or {}).get("reference", "")) for e in endpoints)
        org_ids = [ref.removeprefix("Organization/") for ref in refs if ref.startswith("Organization/")]
        orgs = {oid: orjson.loads(body) for oid, body in (await self.store.bodies("Organization", org_ids)).items()}
        return system_from_resources(endpoints, orgs)

    async def lookup(self, client_id: str) -> System | None:
        """The system, from this process's cache when it is younger than ``cache_seconds``."""
        now = self.clock()
        hit = self._cache.get(client_id)
        if hit is not None:
            age = now - hit[0]
            if age < self.cache_seconds:
                if age >= self.cache_seconds * REFRESH_AHEAD and client_id not in self._reading:
                    self._read(client_id).add_done_callback(_log_failure)
                return hit[1]
        return await asyncio.shield(self._read(client_id))

    def _read(self, client_id: str) -> asyncio.Future[System | None]:
        """The read of ``client_id`` in flight, or a new one (one per system at a time)."""
        reading = self._reading.get(client_id)
        if reading is None:
            reading = asyncio.ensure_future(self._load(client_id, self.clock(), self._epoch))
            self._reading[client_id] = reading
            reading.add_done_callback(lambda _: self._reading.pop(client_id, None))
        return reading

    async def _load(self, client_id: str, started: float, epoch: int) -> System | None:
        system = await self.get(client_id)
        if epoch == self._epoch:  # not read across a forget(): that would undo it
            self._cache[client_id] = (started, system)
            self._cache.move_to_end(client_id)
            while len(self._cache) > self.max_cached:
                self._cache.popitem(last=False)
        return system

    def forget(self, client_id: str) -> None:
        """Drop a cached entry (this process only; others follow within ``cache_seconds``)."""
        self._cache.pop(client_id, None)
        self._reading.pop(client_id, None)
        self._epoch += 1

    async def systems(self) -> list[System]:
        """Every registered system, ordered by client id."""
        regs = await self._all(
            [("connection-type", f"{HUB_CONNECTION_TYPES}|{SYSTEM_CONNECTION}"), ("_include", "Endpoint:organization")]
        )
        others = await self._all([("identifier", f"{CLIENT_ID_SYSTEM}|")])
        by_client: dict[str, list[dict[str, Any]]] = {}
        for endpoint in others[0]:
            for ident in endpoint.get("identifier") or []:
                if ident.get("system") == CLIENT_ID_SYSTEM:
                    by_client.setdefault(ident.get("value"), []).append(endpoint)
        systems = []
        for reg in regs[0]:
            endpoints = [reg, *(e for e in by_client.get(reg["id"], []) if e["id"] != reg["id"])]
            system = system_from_resources(endpoints, regs[1])
            if system is not None:
                systems.append(system)
        return sorted(systems, key=lambda s: s.client_id)

    async def _all(self, items: list[tuple[str, str]]) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
        matches: list[dict[str, Any]] = []
        included: dict[str, dict[str, Any]] = {}
        cursor: str | None = None
        while True:
            page = await self._search(
                "Endpoint", [*items, ("_count", str(PAGE))] + ([("_cursor", cursor)] if cursor else [])
            )
            matches += [orjson.loads(h.body) for h in page.matches]
            included.update((h.id, orjson.loads(h.body)) for h in page.included)
            cursor = page.next_cursor
            if not cursor:
                return matches, included

    # -- writes ---------------------------------------------------------------------------
    async def add(self, system: System) -> System:
        """Register a validated system (see ``new_system``); 409 if its id is taken."""
        if await self.get(system.client_id) is not None:
            raise conflict(f"A system with id {system.client_id!r} is already registered.")
        org_id, org_name, new_org = system.client_id, system.name, True
        if system.organization:
            page = await self._search("Organization", [("identifier", f"{ODS_SYSTEM}|{system.organization}")])
            if page.matches:
                found = orjson.loads(page.matches[0].body)
                org_id, org_name, new_org = found["id"], found.get("name") or system.name, False
            else:
                org_id = system.organization
        system = replace(system, organization_id=org_id, organization_name=org_name)
        resources = ([organization_resource(system)] if new_org else []) + endpoint_resources(system)
        prepared = [(r["id"], self.store.prepare(r["resourceType"], r)) for r in resources]

        async def write(conn: Any) -> None:
            for rid, item in prepared:
                # create_in with our id: a concurrent registration of the same id hits the
                # unique (type, id) constraint and becomes a 409, never a silent overwrite.
                await self.store.create_in(conn, item, rid)

        await self.store.db.write(write)
        self.forget(system.client_id)
        return system

    async def set_status(self, client_id: str, status: str) -> System:
        """Suspend or re-activate a system and all its Endpoints, in one transaction."""
        page = await self._search(
            "Endpoint", [("identifier", f"{CLIENT_ID_SYSTEM}|{client_id}"), ("_include", "Endpoint:organization")]
        )
        endpoints = [(h, orjson.loads(h.body)) for h in page.matches]
        orgs = {h.id: orjson.loads(h.body) for h in page.included if h.type == "Organization"}
        current = system_from_resources([e for _h, e in endpoints], orgs)
        if current is None:
            raise not_found(f"No system is registered with id {client_id!r}.")
        updated = with_status(current, status)
        prepared = []
        for hit, endpoint in endpoints:
            endpoint = {**endpoint, "status": status}
            endpoint.pop("meta", None)
            prepared.append((hit.id, self.store.prepare("Endpoint", endpoint, url_id=hit.id)))
        versions = {hit.id: orjson.loads(hit.body)["meta"]["versionId"] for hit, _e in endpoints}

        async def write(conn: Any) -> None:
            for rid, item in prepared:
                # If-Match: an edit made meanwhile (CLI or FHIR API) is not overwritten.
                await self.store.update_in(conn, item, rid, f'W/"{versions[rid]}"')

        try:
            await self.store.db.write(write)
        except FHIRError as exc:
            if exc.status == 412:
                raise conflict(f"System {client_id!r} changed meanwhile; run the command again.") from None
            raise
        self.forget(client_id)
        return updated


def _log_failure(read: asyncio.Future[Any]) -> None:
    """A background refresh that failed: the entry stays until it expires, then is read again."""
    if not read.cancelled() and read.exception() is not None:
        log.warning("registry refresh failed", error=repr(read.exception())[:300])
