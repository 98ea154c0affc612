"""Batch and transaction Bundles (hl7.org/fhir/R4/http.html#transaction).

A transaction is all or nothing: every entry is validated before anything is written,
then all writes run in one database transaction, in the order the specification gives
(DELETE, POST, PUT, then GET). ``urn:uuid:`` fullUrls of created resources are resolved to
the ids the server assigns, and references to them are rewritten. A batch runs each
entry on its own and reports each outcome in place.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from sharedcare.fhir.bundles import BundleWriter
from sharedcare.fhir.errors import FHIRError, Issue, bad_request
from sharedcare.metrics.registry import record_store_write
from sharedcare.store.repository import Prepared, Stored, instant
from sharedcare.store.search import run_search
from sharedcare.store.service import FhirService, Result

ORDER = {"DELETE": 0, "POST": 1, "PUT": 2, "GET": 3}


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


def _parse_entry(index: int, raw: Any, base: str) -> Entry:
    where = f"Bundle.entry[{index}]"
    if not isinstance(raw, dict) or not isinstance(raw.get("request"), dict):
        raise bad_request(f"{where} needs a request with method and url.", expression=f"{where}.request")
    request = raw["request"]
    method = str(request.get("method", "")).upper()
    url = str(request.get("url", ""))
    if method not in ORDER or not url:
        raise bad_request(
            f"{where}.request: method must be GET, POST, PUT or DELETE and url must be set.",
            expression=f"{where}.request",
        )
    if url.startswith(base + "/"):
        url = url[len(base) + 1 :]
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    if not segments or len(segments) > 2:
        raise bad_request(f"{where}.request.url {url!r} must be Type or Type/id.", expression=f"{where}.request.url")
    rid = segments[1] if len(segments) == 2 else None
    if method in ("PUT", "DELETE") and rid is None:
        raise bad_request(
            f"{where}: conditional {method} is not supported in Bundles; give Type/id.",
            expression=f"{where}.request.url",
        )
    return Entry(
        index=index,
        method=method,
        rtype=segments[0],
        rid=rid,
        query=parse_qsl(parts.query, keep_blank_values=True),
        resource=raw.get("resource"),
        if_match=request.get("ifMatch"),
        if_none_exist=request.get("ifNoneExist"),
        full_url=raw.get("fullUrl"),
    )


def _rewrite(value: Any, mapping: dict[str, str]) -> Any:
    """Replace ``urn:uuid:`` references with the server's ``Type/id``."""
    if isinstance(value, dict):
        return {
            k: (mapping.get(v, v) if k == "reference" and isinstance(v, str) else _rewrite(v, mapping))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_rewrite(v, mapping) for v in value]
    return value


def _response_entry(result: Result) -> tuple[dict[str, Any], Any]:
    reason = {200: "200 OK", 201: "201 Created", 204: "204 No Content"}.get(result.status, str(result.status))
    response: dict[str, Any] = {"status": reason}
    if "Location" in result.headers:
        response["location"] = result.headers["Location"]
    if "ETag" in result.headers:
        response["etag"] = result.headers["ETag"]
    if "Last-Modified" in result.headers:
        response["lastModified"] = result.headers["Last-Modified"]
    return {"response": response}, result.body


async def process_bundle(service: FhirService, body: Any, *, max_entries: int) -> Result:
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise bad_request("POST to the base URL takes a Bundle of type batch or transaction.")
    kind = body.get("type")
    if kind not in ("batch", "transaction"):
        raise bad_request(f"Bundle.type must be batch or transaction, not {kind!r}.", expression="Bundle.type")
    raw_entries = body.get("entry") or []
    if not isinstance(raw_entries, list):
        raise bad_request("Bundle.entry must be a list.", expression="Bundle.entry")
    if len(raw_entries) > max_entries:
        raise FHIRError.of(
            413, "too-costly", f"The Bundle has {len(raw_entries)} entries; the limit is {max_entries}."
        )
    if kind == "batch":
        return await _batch(service, raw_entries)
    return await _transaction(service, [_parse_entry(i, e, service.base) for i, e in enumerate(raw_entries)])


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


async def _batch(service: FhirService, raw_entries: list[Any]) -> Result:
    out = BundleWriter("batch-response")
    for i, raw in enumerate(raw_entries):
        try:
            result = await _dispatch(service, _parse_entry(i, raw, service.base))
        except FHIRError as exc:
            out.add({"response": {"status": str(exc.status), "outcome": exc.outcome()}})
            continue
        entry, resource = _response_entry(result)
        if isinstance(resource, dict):
            entry["resource"] = resource
            resource = None
        out.add(entry, resource)
    return Result(200, out.render())


async def _transaction(service: FhirService, entries: list[Entry]) -> Result:
    store = service.store
    targets = [(e.rtype, e.rid) for e in entries if e.rid is not None and e.method != "GET"]
    if len(targets) != len(set(targets)):
        raise bad_request("A transaction may change each resource only once.")
    mapping: dict[str, str] = {}
    for e in entries:
        if e.method == "POST":
            e.rid = str(uuid.uuid4())
            if e.full_url and e.full_url.startswith("urn:uuid:"):
                mapping[e.full_url] = f"{e.rtype}/{e.rid}"
    issues: list[Issue] = []
    for e in entries:
        if e.method in ("POST", "PUT"):
            try:
                e.prepared = store.prepare(
                    e.rtype, _rewrite(e.resource, mapping), url_id=e.rid if e.method == "PUT" else None
                )
            except FHIRError as exc:
                issues.extend(
                    Issue(i.code, f"Bundle.entry[{e.index}]: {i.diagnostics}", i.severity, i.expression)
                    for i in exc.issues
                )
        elif e.method != "GET":
            store.check_type(e.rtype)
    if issues:
        raise FHIRError(422 if all(i.code != "invalid" for i in issues) else 400, issues)
    ordered = sorted((e for e in entries if e.method != "GET"), key=lambda e: ORDER[e.method])

    async def work(conn: Any) -> dict[int, Result]:
        results: dict[int, Result] = {}
        plain = [e for e in ordered if e.method == "POST" and not e.if_none_exist]
        for e in ordered:
            if e.method == "DELETE":
                assert e.rid is not None
                stored = await store.delete_in(conn, e.rtype, e.rid)
                results[e.index] = Result(204, None, {"ETag": stored.etag} if stored else {})
        created = await store.create_many_in(conn, [(e.prepared, e.rid) for e in plain])  # type: ignore[misc]
        for e, stored in zip(plain, created, strict=True):
            results[e.index] = _written(201, stored, service.base)
        for e in ordered:
            if e.method == "POST" and e.if_none_exist:
                results[e.index] = await _conditional_create(service, conn, e)
            elif e.method == "PUT":
                assert e.prepared is not None and e.rid is not None
                stored, was_created = await store.update_in(conn, e.prepared, e.rid, e.if_match)
                results[e.index] = _written(201 if was_created else 200, stored, service.base)
        return results

    results = await store.db.write(work)
    for e in entries:
        if e.method == "GET":
            results[e.index] = await _dispatch(service, e)
        else:
            record_store_write({"POST": "create", "PUT": "update", "DELETE": "delete"}[e.method], e.rtype)
    out = BundleWriter("transaction-response")
    for e in entries:
        entry, resource = _response_entry(results[e.index])
        out.add(entry, resource if isinstance(resource, bytes) else None)
    return Result(200, out.render())


async def _conditional_create(service: FhirService, conn: Any, e: Entry) -> Result:
    assert e.prepared is not None and e.if_none_exist
    plan = service.plan(e.rtype, parse_qsl(e.if_none_exist, keep_blank_values=True))
    plan.count, plan.total = 2, "none"
    page = await run_search(service.store.db, plan, service.base, conn=conn)
    if len(page.matches) > 1:
        raise FHIRError.of(412, "multiple-matches", f"Bundle.entry[{e.index}]: ifNoneExist matches several.")
    if page.matches:
        hit = page.matches[0]
        return Result(200, hit.body, {"Location": f"{service.base}/{hit.type}/{hit.id}"})
    stored = await service.store.create_in(conn, e.prepared, e.rid)
    return _written(201, stored, service.base)


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
