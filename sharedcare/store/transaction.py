"""Batch and transaction Bundles (hl7.org/fhir/R4/http.html#transaction).

A transaction is all or nothing. Every entry is parsed and validated before anything is
written, and every problem found is reported at once, each issue naming its
``Bundle.entry[i]``. Then all entries run in one database transaction, in the order the
specification gives (DELETE, POST, PUT, then GET, the GETs seeing the writes); a failure
there (an ``ifMatch`` that does not hold, a DELETE of an unknown resource) rolls
everything back and names the entry too. ``fullUrl``s of POSTed resources (``urn:uuid:``
or any other) are resolved to the ids the server assigns — or, for a conditional create
(``ifNoneExist``) that matches, to the existing resource — and references to them in other
entries are rewritten; a ``urn:uuid:`` reference that no entry resolves is an error.

A batch runs each entry on its own, in request order, and reports each outcome in place.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from sqlalchemy import select

from sharedcare.fhir.bundles import BundleWriter
from sharedcare.fhir.errors import FHIRError, Issue, bad_request
from sharedcare.metrics.registry import record_store_read, record_store_write
from sharedcare.store.repository import Prepared, Stored, instant
from sharedcare.store.schema import resources
from sharedcare.store.search import Hit, run_search
from sharedcare.store.search_parse import SearchPlan
from sharedcare.store.service import FhirService, Result

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}
_WRITE_OPS = {"POST": "create", "PUT": "update", "DELETE": "delete"}


@dataclass(slots=True)
class Entry:
    index: int
    method: str
    rtype: str
    rid: str | None
    query: list[tuple[str, str]]
    resource: Any
    if_match: str | None
    if_none_exist: str | None
    full_url: str | None
    prepared: Prepared | None = None
    plan: SearchPlan | None = None  # GET searches and ifNoneExist conditions
    existing: Hit | None = None  # the match of an ifNoneExist condition, found before writing


def _status_text(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return str(status)


def at_entry(index: int, exc: FHIRError, resource_type: str | None = None) -> FHIRError:
    """``exc`` with every issue naming ``Bundle.entry[index]`` (diagnostics and expression)."""
    where = f"Bundle.entry[{index}]"
    issues = []
    for issue in exc.issues:
        expression: list[str] = []
        for e in issue.expression:
            if e.startswith("Bundle."):
                expression.append(e)
            elif resource_type and (e == resource_type or e.startswith((f"{resource_type}.", f"{resource_type}["))):
                expression.append(f"{where}.resource{e[len(resource_type):]}")
            else:
                expression.append(f"{where}.resource.{e}")
        diagnostics = issue.diagnostics if issue.diagnostics.startswith(where) else f"{where}: {issue.diagnostics}"
        issues.append(
            Issue(issue.code, diagnostics, issue.severity, tuple(expression) or (where,), issue.details_code)
        )
    return FHIRError(exc.status, issues)


def _combine(errors: list[FHIRError]) -> FHIRError:
    """One error for several entries: their common status, else 400."""
    statuses = {e.status for e in errors}
    status = statuses.pop() if len(statuses) == 1 else 400
    return FHIRError(status, [issue for e in errors for issue in e.issues])


def _parse_entry(index: int, raw: Any, base: str) -> Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("request"), dict):
        raise bad_request(f"{where} needs a request with method and url.", expression=f"{where}.request")
    request = raw["request"]
    method = str(request.get("method", "")).upper()
    url = request.get("url")
    if method not in ORDER or not isinstance(url, str) or not url:
        raise bad_request(
            f"{where}.request: method must be GET, POST, PUT or DELETE and url must be set.",
            expression=f"{where}.request",
        )
    if url.startswith(base + "/"):
        url = url[len(base) + 1 :]
    parts = urlsplit(url)
    if parts.scheme or parts.netloc:
        raise bad_request(
            f"{where}.request.url {url!r} must be relative to this server ({base}), e.g. Patient/123.",
            expression=f"{where}.request.url",
        )
    segments = [s for s in parts.path.split("/") if s]
    if not segments or len(segments) > 2:
        raise bad_request(
            f"{where}.request.url {url!r} must be Type, Type?search or Type/id.",
            expression=f"{where}.request.url",
        )
    rid = segments[1] if len(segments) == 2 else None
    if method in ("PUT", "DELETE") and rid is None:
        raise bad_request(
            f"{where}: conditional {method} is not supported in Bundles; give Type/id.",
            expression=f"{where}.request.url",
        )
    if method == "POST" and rid is not None:
        raise bad_request(
            f"{where}: POST creates at Type (the server assigns the id); use PUT for Type/id.",
            expression=f"{where}.request.url",
        )
    for name in ("ifMatch", "ifNoneExist"):
        if request.get(name) is not None and not isinstance(request[name], str):
            raise bad_request(f"{where}.request.{name} must be a string.", expression=f"{where}.request.{name}")
    full_url = raw.get("fullUrl")
    return Entry(
        index=index,
        method=method,
        rtype=segments[0],
        rid=rid,
        query=parse_qsl(parts.query, keep_blank_values=True),
        resource=raw.get("resource"),
        if_match=request.get("ifMatch"),
        if_none_exist=request.get("ifNoneExist"),
        full_url=full_url if isinstance(full_url, str) and full_url else None,
    )


def _rewrite(value: Any, mapping: dict[str, str], unresolved: list[str]) -> Any:
    """Replace references to other entries' fullUrls with the server's ``Type/id``."""
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if k == "reference" and isinstance(v, str):
                if v in mapping:
                    v = mapping[v]
                elif v.startswith("urn:uuid:"):
                    unresolved.append(v)
                out[k] = v
            else:
                out[k] = _rewrite(v, mapping, unresolved)
        return out
    if isinstance(value, list):
        return [_rewrite(v, mapping, unresolved) for v in value]
    return value


def _response_entry(result: Result, full_url: str | None = None) -> dict[str, Any]:
    response: dict[str, Any] = {"status": _status_text(result.status)}
    if "Location" in result.headers:
        response["location"] = result.headers["Location"]
    if "ETag" in result.headers:
        response["etag"] = result.headers["ETag"]
    if "Last-Modified" in result.headers:
        response["lastModified"] = result.headers["Last-Modified"]
    entry: dict[str, Any] = {"fullUrl": full_url} if full_url else {}
    entry["response"] = response
    return entry


def _add(out: BundleWriter, result: Result, full_url: str | None = None) -> None:
    entry = _response_entry(result, full_url)
    if isinstance(result.body, dict):
        out.add({**entry, "resource": result.body})
    else:
        out.add(entry, result.body)


async def process_bundle(service: FhirService, body: Any, *, max_entries: int) -> Result:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        given = body.get("resourceType") if isinstance(body, dict) else None
        raise bad_request(
            "POST to the base URL takes a Bundle of type batch or transaction, "
            f"not {'a ' + given if isinstance(given, str) else 'this body'}.",
            expression="resourceType",
        )
    kind = body.get("type")
    if kind not in ("batch", "transaction"):
        raise bad_request(
            f"Bundle.type must be batch or transaction to be processed here, not {kind!r}.",
            expression="Bundle.type",
        )
    raw_entries = body.get("entry", [])
    if not isinstance(raw_entries, list):
        raise bad_request("Bundle.entry must be an array.", expression="Bundle.entry")
    if len(raw_entries) > max_entries:
        raise FHIRError.of(
            413,
            "too-costly",
            f"The Bundle has {len(raw_entries)} entries; the limit is {max_entries}. Split it into smaller Bundles.",
            expression="Bundle.entry",
        )
    if kind == "batch":
        return await _batch(service, raw_entries)
    return await _transaction(service, raw_entries)


# -- batch ----------------------------------------------------------------------------------
async def _dispatch(service: FhirService, e: Entry) -> Result:
    if e.method == "GET":
        if e.rid is None:
            return await service.search(e.rtype, e.query)
        return await service.read(e.rtype, e.rid)
    if e.method == "POST":
        return await service.create(e.rtype, e.resource, if_none_exist=e.if_none_exist)
    if e.method == "PUT":
        assert e.rid is not None
        return await service.update(e.rtype, e.rid, e.resource, if_match=e.if_match)
    assert e.rid is not None
    return await service.delete(e.rtype, e.rid)


def _full_url(result: Result) -> str | None:
    """``base/Type/id`` of a write, from its Location."""
    location = result.headers.get("Location")
    if not location:
        return None
    return location.split("/_history/", 1)[0]


async def _batch(service: FhirService, raw_entries: list[Any]) -> Result:
    out = BundleWriter("batch-response")
    for i, raw in enumerate(raw_entries):
        rtype = None
        try:
            e = _parse_entry(i, raw, service.base)
            rtype = e.rtype
            result = await _dispatch(service, e)
        except FHIRError as exc:
            failed = at_entry(i, exc, rtype)
            out.add({"response": {"status": _status_text(exc.status), "outcome": failed.outcome()}})
            continue
        _add(out, result, _full_url(result))
    return Result(200, out.render())


# -- transaction ----------------------------------------------------------------------------
async def _transaction(service: FhirService, raw_entries: list[Any]) -> Result:
    store = service.store
    errors: list[FHIRError] = []
    entries: list[Entry] = []
    for i, raw in enumerate(raw_entries):
        try:
            e = _parse_entry(i, raw, service.base)
            store.check_type(e.rtype)
            entries.append(e)
        except FHIRError as exc:
            errors.append(at_entry(i, exc))
    if errors:
        raise _combine(errors)

    seen: dict[tuple[str, str], int] = {}
    for e in entries:
        if e.method in ("PUT", "DELETE"):
            assert e.rid is not None
            first = seen.setdefault((e.rtype, e.rid), e.index)
            if first != e.index:
                errors.append(
                    at_entry(
                        e.index,
                        bad_request(
                            f"{e.rtype}/{e.rid} is also changed by Bundle.entry[{first}]; "
                            "a transaction may change each resource only once."
                        ),
                    )
                )
    if errors:
        raise _combine(errors)

    results = await _resolve_and_write(service, entries)
    for e in entries:
        if e.method == "GET":
            record_store_read("search" if e.rid is None else "read", e.rtype)
        elif not (e.method == "POST" and results[e.index].status == 200):
            record_store_write(_WRITE_OPS[e.method], e.rtype)  # type: ignore[arg-type]
    out = BundleWriter("transaction-response")
    for e in entries:
        result = results[e.index]
        full_url = f"{service.base}/{e.rtype}/{e.rid}" if e.rid and e.method != "DELETE" else None
        _add(out, result, full_url)
    return Result(200, out.render())


class _StaleCondition(Exception):
    """An ifNoneExist condition matched differently under the write lock than when checked."""


_ATTEMPTS = 3


async def _resolve_and_write(service: FhirService, entries: list[Entry]) -> dict[int, Result]:
    """Resolve identities, prepare resources, write; again if a conditional create raced another."""
    for _attempt in range(_ATTEMPTS):
        for e in entries:
            if e.method == "POST":
                e.rid, e.prepared, e.existing = None, None, None
        await _resolve(service, entries)
        try:
            return await service.store.db.write(lambda conn: _write_all(service, conn, entries))
        except _StaleCondition:
            continue
    raise FHIRError.of(
        409, "conflict", "Concurrent writes kept changing what ifNoneExist matches; send the transaction again."
    )


async def _resolve(service: FhirService, entries: list[Entry]) -> None:
    """Resolve identities (new ids for POSTs, existing ones for matching conditional creates),
    rewrite references and validate every resource; raise one error for every bad entry."""
    store = service.store
    errors: list[FHIRError] = []
    mapping: dict[str, str] = {}
    for e in entries:
        try:
            if e.method == "GET" and e.rid is None:
                e.plan = service.plan(e.rtype, e.query)
            if e.method == "POST" and e.if_none_exist:
                e.plan = _condition(service, e)
                page = await run_search(store.db, e.plan, service.base)
                _check_single(e, page.matches)
                e.existing = page.matches[0] if page.matches else None
        except FHIRError as exc:
            errors.append(at_entry(e.index, exc))
            continue
        if e.method == "POST":
            e.rid = e.existing.id if e.existing else str(uuid.uuid4())
            if e.full_url:
                mapping[e.full_url] = f"{e.rtype}/{e.rid}"
        elif e.method == "PUT" and e.full_url and e.full_url.startswith("urn:uuid:"):
            mapping[e.full_url] = f"{e.rtype}/{e.rid}"
    if errors:
        raise _combine(errors)

    for e in entries:
        if e.method not in ("POST", "PUT"):
            continue
        unresolved: list[str] = []
        try:
            resource = _rewrite(e.resource, mapping, unresolved)
            if unresolved:
                raise bad_request(
                    f"the reference {unresolved[0]!r} matches the fullUrl of no entry in this transaction."
                )
            e.prepared = store.prepare(e.rtype, resource, url_id=e.rid if e.method == "PUT" else None)
        except FHIRError as exc:
            errors.append(at_entry(e.index, exc, e.rtype))
    if errors:
        raise _combine(errors)


def _condition(service: FhirService, e: Entry) -> SearchPlan:
    assert e.if_none_exist is not None
    plan = service.plan(e.rtype, parse_qsl(e.if_none_exist.lstrip("?"), keep_blank_values=True))
    if not plan.clauses:
        raise bad_request("ifNoneExist must hold search criteria, e.g. identifier=system|value.")
    plan.count, plan.total = 2, "none"
    return plan


def _check_single(e: Entry, matches: list[Hit]) -> None:
    if len(matches) > 1:
        raise FHIRError.of(
            412,
            "multiple-matches",
            f"ifNoneExist {e.if_none_exist!r} matches more than one {e.rtype}; make the criteria more selective.",
        )


async def _write_all(service: FhirService, conn: Any, entries: list[Entry]) -> dict[int, Result]:
    """Every entry of a transaction, inside ``conn``'s database transaction."""
    store = service.store
    results: dict[int, Result] = {}
    ordered = sorted(entries, key=lambda e: (ORDER[e.method], e.index))
    current: Entry | None = None
    try:
        for e in ordered:
            current = e
            if e.method == "DELETE":
                assert e.rid is not None
                stored = await store.delete_in(conn, e.rtype, e.rid)
                results[e.index] = Result(204, None, {"ETag": stored.etag} if stored else {})
        for e in ordered:
            current = e
            if e.method == "POST" and e.if_none_exist:
                results[e.index] = await _conditional_create(service, conn, e)
        current = None
        plain = [e for e in ordered if e.method == "POST" and not e.if_none_exist]
        created = await store.create_many_in(conn, [(e.prepared, e.rid) for e in plain])  # type: ignore[misc]
        for e, stored in zip(plain, created, strict=True):
            results[e.index] = _written(201, stored, service.base)
        for e in ordered:
            current = e
            if e.method == "PUT":
                assert e.prepared is not None and e.rid is not None
                stored, was_created = await store.update_in(conn, e.prepared, e.rid, e.if_match)
                results[e.index] = _written(201 if was_created else 200, stored, service.base)
            elif e.method == "GET":
                results[e.index] = await _get_in(service, conn, e)
    except FHIRError as exc:
        if current is None:
            raise
        raise at_entry(current.index, exc, current.rtype) from None
    return results


async def _conditional_create(service: FhirService, conn: Any, e: Entry) -> Result:
    """Re-run the ifNoneExist search under the write lock; it must agree with the pre-check."""
    assert e.plan is not None and e.rid is not None
    await service.store.advisory_lock(conn, f"{e.rtype}?{e.if_none_exist}")
    page = await run_search(service.store.db, e.plan, service.base, conn=conn)
    _check_single(e, page.matches)
    now = page.matches[0] if page.matches else None
    if (now.id if now else None) != (e.existing.id if e.existing else None):
        raise _StaleCondition(e.index)  # references were resolved against the old answer
    if now is not None:
        version = _version_of(now.body)
        headers = {"Location": f"{service.base}/{now.type}/{now.id}" + (f"/_history/{version}" if version else "")}
        if version:
            headers["ETag"] = f'W/"{version}"'
        headers["Last-Modified"] = instant(now.last_updated)
        return Result(200, now.body, headers)
    assert e.prepared is not None
    stored = await service.store.create_in(conn, e.prepared, e.rid)
    return _written(201, stored, service.base)


def _version_of(body: bytes) -> str | None:
    meta = orjson.loads(body).get("meta") or {}
    version = meta.get("versionId")
    return str(version) if version else None


async def _get_in(service: FhirService, conn: Any, e: Entry) -> Result:
    """A GET entry inside the transaction, so that it sees the transaction's writes."""
    if e.rid is None:
        assert e.plan is not None
        page = await run_search(service.store.db, e.plan, service.base, conn=conn)
        return Result(200, service._searchset(e.plan, page))
    row = (
        await conn.execute(
            select(resources.c.version, resources.c.last_updated, resources.c.deleted, resources.c.body).where(
                resources.c.type == e.rtype, resources.c.id == e.rid
            )
        )
    ).first()
    if row is None:
        raise FHIRError.of(404, "not-found", f"{e.rtype}/{e.rid} is not known to this server.")
    if row.deleted:
        raise FHIRError.of(410, "deleted", f"{e.rtype}/{e.rid} was deleted.")
    return Result(200, row.body, {"ETag": f'W/"{row.version}"', "Last-Modified": instant(row.last_updated)})


def _written(status: int, stored: Stored, base: str) -> Result:
    return Result(
        status,
        stored.body,
        {
            "Location": f"{base}/{stored.location}",
            "ETag": stored.etag,
            "Last-Modified": instant(stored.last_updated),
        },
    )
