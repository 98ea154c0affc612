"""Starlette routes of the regional FHIR store: thin adapters over :class:`FhirService`.

Patient data (every type but the directory types Organization, Practitioner,
PractitionerRole and Endpoint) leaves through the release gate (:mod:`sharedcare.consent.gate`):
reads, vreads, searches (``_include``/``_revinclude`` results too), history and the GET
entries of batch/transaction Bundles are consent-filtered, and their AuditEvent is durable
before the response is sent.

- A search or history that withheld anything carries an OperationOutcome entry
  (``search.mode = outcome`` in a searchset) saying so, never what.
- A read of a withheld resource is **403** with the same notice (issue ``suppressed``,
  details ``consent-withheld``): the consumer learns that something exists it may not see,
  which it must know to tell the person or escalate (an emergency override), and nothing
  about its content.
- Consent writes go through :func:`check_consent_record` (422 with the reason) and are
  audited (BALP Create/Update).
- AuditEvent: read and search only, for auditors (a token with an explicit
  ``system/AuditEvent.*`` scope; ``system/*.*`` alone is not enough) and operators
  (``sharedcare/admin``). Update and delete are 405 for everyone; create is 405 except for
  operators importing a previous system's trail. They are served from the trail's own table
  (:class:`~sharedcare.audit.trail.AuditTrail` on ``app.state.trail``), not the store's, and
  are not handled inside Bundles.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlsplit

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sharedcare.audit.record import MINOR_FAILURE
from sharedcare.audit.trail import AuditTrail
from sharedcare.consent.gate import DIRECTORY_TYPES, ReleaseGate, patients_of, withheld_read
from sharedcare.consent.notice import withheld_issue, withheld_outcome
from sharedcare.consent.validation import check_consent_record
from sharedcare.fhir.errors import FHIRError
from sharedcare.fhir.responses import check_json_media_type, fhir_json, parse_json_body
from sharedcare.iam.context import access
from sharedcare.iam.scopes import parse_scope
from sharedcare.store.service import FhirService, Result
from sharedcare.store.transaction import at_entry, process_bundle

AUDIT_TYPE = "AuditEvent"
AUDITOR_SCOPE = "system/AuditEvent.rs"
WITHHELD_DESC = "withheld under the person's consent or the regional policy"


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes before reading it all."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> FHIRError:
    return FHIRError.of(
        413, "too-costly", f"The request body is larger than the limit of {limit} bytes."
    )


async def json_body(request: Request) -> Any:
    """The FHIR JSON body: 415 before reading a wrong media type, 413 over the limit, 400 if not JSON."""
    content_type = request.headers.get("content-type")
    check_json_media_type(content_type)
    limit = request.app.state.settings.max_body_bytes
    return parse_json_body(await read_body(request, limit), content_type)


def lenient(request: Request) -> bool:
    """``Prefer: handling=lenient`` (hl7.org/fhir/R4/search.html#errors); strict by default."""
    prefer = request.headers.get("prefer", "").replace(" ", "").lower()
    return "handling=lenient" in prefer


def respond(result: Result) -> Response:
    if result.body is None:
        return Response(status_code=result.status, headers=result.headers)
    return fhir_json(result.body, result.status, result.headers)


def _service(request: Request) -> FhirService:
    return request.app.state.fhir


def _gate(request: Request) -> ReleaseGate:
    return request.app.state.release


def _trail(request: Request) -> AuditTrail:
    """AuditEvents live on the audit trail's own table, not in the store (sharedcare.audit.trail)."""
    return request.app.state.trail


_EVENT_HEADERS = {"ETag": 'W/"1"'}  # an event is written once: always version 1


def is_patient_data(rtype: str) -> bool:
    return rtype not in DIRECTORY_TYPES


def _load(body: bytes | dict[str, Any] | None) -> Any:
    return orjson.loads(body) if isinstance(body, bytes | bytearray | memoryview) else body


# -- the audit trail through the FHIR API ------------------------------------------------------
def _may_read_audit(request: Request, permission: str) -> bool:
    ctx = access(request)
    if ctx.grants.admin:
        return True
    for text in ctx.scopes:
        scope = parse_scope(text)
        if scope is not None and scope.resource == AUDIT_TYPE and permission in scope.permissions:
            return True
    return False


async def _require_auditor(request: Request, permission: str, action: str) -> None:
    if _may_read_audit(request, permission):
        return
    message = (
        f"Reading the audit trail needs an auditor token: the scope {AUDITOR_SCOPE} named "
        "explicitly (a wildcard such as system/*.rs does not include it)."
    )
    await _gate(request).refused(request, reason=message, action=action)
    raise FHIRError.of(
        403,
        "forbidden",
        message,
        headers={
            "WWW-Authenticate": f'Bearer realm="sharedcare", error="insufficient_scope", scope="{AUDITOR_SCOPE}"'
        },
    )


def _audit_write_refused(method: str) -> FHIRError:
    return FHIRError.of(
        405,
        "not-supported",
        f"AuditEvents are written by the hub only and never changed; {method} is not allowed "
        "(search them with GET /fhir/AuditEvent; retention: `sharedcare audit export|prune`).",
        headers={"Allow": "GET"},
    )


# -- consent-filtered releases ------------------------------------------------------------------
async def _release_read(
    request: Request, result: Result, rtype: str, action: str, ref: str
) -> Response:
    """A read of one resource through the gate: 403 with the notice when withheld."""
    if not is_patient_data(rtype) or result.body is None:
        return respond(result)
    resource = _load(result.body)
    release = await _gate(request).open_for(request, [resource], action=action)
    if rtype == AUDIT_TYPE:  # the trail itself: for auditors, not filtered by anyone's consent
        release.released += 1
        kept: dict[str, Any] | None = resource
    else:
        kept = release.filter_each([resource])[0]
    if kept is None:
        await release.audited(outcome=MINOR_FAILURE, outcome_desc=WITHHELD_DESC, resource=ref)
        raise withheld_read()
    await release.audited(resource=ref)
    return respond(Result(result.status, result.body if kept is resource else kept, result.headers))


def _filter_entries(release: Any, entries: list[Any], trail: bool) -> tuple[list[Any], bool]:
    """The entries that may leave (withheld ones dropped, qualified ones relabelled)."""
    index = [
        i
        for i, e in enumerate(entries)
        if isinstance(e, dict)
        and isinstance(e.get("resource"), dict)
        and (e.get("search") or {}).get("mode") != "outcome"
        and e["resource"].get("resourceType") not in DIRECTORY_TYPES
    ]
    if not index:
        return entries, False
    resources = [entries[i]["resource"] for i in index]
    if trail:
        release.released += len(resources)
        return entries, False
    decided = release.filter_each(resources)
    changed = False
    out = list(entries)
    for i, resource, kept in zip(index, resources, decided, strict=True):
        if kept is None:
            out[i] = None
            changed = True
        elif kept is not resource:
            out[i] = {**entries[i], "resource": kept}
            changed = True
    return [e for e in out if e is not None], changed


def _add_notice(bundle: dict[str, Any], entries: list[Any], withheld: int, url: str) -> None:
    """Tell the consumer (without saying what) that the Bundle is incomplete."""
    if bundle.get("type") == "searchset":
        for e in entries:
            if (e.get("search") or {}).get("mode") == "outcome" and isinstance(
                e.get("resource"), dict
            ):
                e["resource"].setdefault("issue", []).append(withheld_issue(withheld).to_fhir())
                return
        entries.append({"search": {"mode": "outcome"}, "resource": withheld_outcome(withheld)})
    else:  # history: entries carry request and response (R4 bdl-... rules)
        entries.append(
            {
                "resource": withheld_outcome(withheld),
                "request": {"method": "GET", "url": url},
                "response": {"status": "200 OK"},
            }
        )


async def _release_bundle(request: Request, result: Result, rtype: str, action: str) -> Response:
    """A searchset or history Bundle through the gate (every entry, includes too)."""
    if not is_patient_data(rtype) or result.body is None:
        return respond(result)
    bundle = _load(result.body)
    entries = bundle.get("entry") or []
    people = [
        e["resource"]
        for e in entries
        if isinstance(e, dict) and isinstance(e.get("resource"), dict)
    ]
    release = await _gate(request).open_for(request, people, action=action)
    kept, changed = _filter_entries(release, entries, rtype == AUDIT_TYPE)
    if release.withheld:
        _add_notice(bundle, kept, release.withheld, request.url.path.removeprefix("/fhir/"))
        changed = True
    if (
        rtype != AUDIT_TYPE or release.released
    ):  # an auditor's empty search or count releases nothing
        await release.audited()
    if not changed:
        return respond(result)
    if kept:
        bundle["entry"] = kept
    else:
        bundle.pop("entry", None)
    return respond(Result(result.status, orjson.dumps(bundle), result.headers))


async def _import_event(request: Request, body: Any) -> Result:
    """An operator's POST of an earlier system's AuditEvent: validated, then onto the trail."""
    if request.headers.get("if-none-exist"):
        raise FHIRError.of(
            400, "not-supported", "Conditional create (If-None-Exist) is not supported for AuditEvent."
        )
    event = _service(request).store.prepare(AUDIT_TYPE, body).resource  # R4 checks: 400/422
    stored, event_id = await _trail(request).create(event)
    headers = {**_EVENT_HEADERS, "Location": f"{_service(request).base}/{AUDIT_TYPE}/{event_id}/_history/1"}
    return Result(201, stored, headers)


# -- routes --------------------------------------------------------------------------------------
async def search(request: Request) -> Response:
    rtype = request.path_params["type"]
    if rtype == AUDIT_TYPE:
        await _require_auditor(request, "s", "search-type")
    items = list(request.query_params.multi_items())
    if request.method == "POST":  # POST [type]/_search with a form body (search.html#Introduction)
        media = request.headers.get("content-type", "").split(";")[0].strip()
        if media != "application/x-www-form-urlencoded":
            raise FHIRError.of(
                415, "not-supported", "POST _search takes application/x-www-form-urlencoded."
            )
        raw = await read_body(request, request.app.state.settings.max_body_bytes)
        items += parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
    if rtype == AUDIT_TYPE:
        result = Result(200, await _trail(request).search(items, lenient=lenient(request)))
    else:
        result = await _service(request).search(rtype, items, lenient=lenient(request))
    return await _release_bundle(request, result, rtype, "search-type")


async def _checked_write(request: Request, rtype: str, method: str) -> Any:
    if rtype == AUDIT_TYPE and (method != "POST" or not access(request).grants.admin):
        raise _audit_write_refused(method)
    body = await json_body(request)
    if rtype == "Consent":
        # R4 validity first (the store's usual 422), then what this hub can honour as written.
        _service(request).store.prepare(rtype, body, url_id=request.path_params.get("id"))
        check_consent_record(body)
    return body


async def _consent_written(request: Request, result: Result, action: str) -> None:
    """A Consent record created or changed: on the trail before the client hears of it."""
    location = result.headers.get("Location", "")
    ref = "/".join(location.split("/_history/")[0].split("/")[-2:]) if location else None
    body = _load(result.body) if result.body is not None else None
    people = patients_of(body) if isinstance(body, dict) else ()
    await _gate(request).write_audited(
        request, action=action, resource=ref, patient=people[0] if people else None
    )


async def create(request: Request) -> Response:
    rtype = request.path_params["type"]
    _service(request).store.check_type(rtype)
    body = await _checked_write(request, rtype, "POST")
    if rtype == AUDIT_TYPE:
        return respond(await _import_event(request, body))
    result = await _service(request).create(
        rtype,
        body,
        if_none_exist=request.headers.get("if-none-exist"),
        prefer=request.headers.get("prefer"),
    )
    if result.status == 200:  # If-None-Exist matched an existing resource: that is a read
        location = result.headers.get("Location", "").split("/_history/")[0].split("/")[-2:]
        return await _release_read(request, result, rtype, "read", "/".join(location))
    if rtype == "Consent":
        await _consent_written(request, result, "create")
    return respond(result)


async def read(request: Request) -> Response:
    p = request.path_params
    if p["type"] == AUDIT_TYPE:
        await _require_auditor(request, "r", "read")
        result = Result(200, await _trail(request).read(p["id"]), dict(_EVENT_HEADERS))
    else:
        result = await _service(request).read(p["type"], p["id"])
    return await _release_read(request, result, p["type"], "read", f"{p['type']}/{p['id']}")


async def vread(request: Request) -> Response:
    p = request.path_params
    if p["type"] == AUDIT_TYPE:
        await _require_auditor(request, "r", "vread")
        result = Result(200, await _trail(request).vread(p["id"], p["vid"]), dict(_EVENT_HEADERS))
    else:
        result = await _service(request).vread(p["type"], p["id"], p["vid"])
    return await _release_read(
        request, result, p["type"], "vread", f"{p['type']}/{p['id']}/_history/{p['vid']}"
    )


async def update(request: Request) -> Response:
    p = request.path_params
    _service(request).store.check_type(p["type"])
    body = await _checked_write(request, p["type"], "PUT")
    result = await _service(request).update(
        p["type"],
        p["id"],
        body,
        if_match=request.headers.get("if-match"),
        prefer=request.headers.get("prefer"),
    )
    if p["type"] == "Consent":
        await _consent_written(request, result, "create" if result.status == 201 else "update")
    return respond(result)


async def delete(request: Request) -> Response:
    p = request.path_params
    if p["type"] == AUDIT_TYPE:
        raise _audit_write_refused("DELETE")
    return respond(await _service(request).delete(p["type"], p["id"]))


async def type_history(request: Request) -> Response:
    rtype = request.path_params["type"]
    items = list(request.query_params.multi_items())
    if rtype == AUDIT_TYPE:
        await _require_auditor(request, "s", "history-type")
        result = Result(200, await _trail(request).history(None, items))
    else:
        result = await _service(request).history(rtype, None, items)
    return await _release_bundle(request, result, rtype, "history-type")


async def instance_history(request: Request) -> Response:
    p = request.path_params
    items = list(request.query_params.multi_items())
    if p["type"] == AUDIT_TYPE:
        await _require_auditor(request, "r", "history-instance")
        result = Result(200, await _trail(request).history(p["id"], items))
    else:
        result = await _service(request).history(p["type"], p["id"], items)
    return await _release_bundle(request, result, p["type"], "history-instance")


# -- batch and transaction ------------------------------------------------------------------------
def _entry_request(raw: Any, base: str) -> tuple[str, str, str | None]:
    """(method, resource type, id) of a Bundle entry's request, as far as it can be read."""
    request = raw.get("request") if isinstance(raw, dict) else None
    if not isinstance(request, dict):
        return "", "", None
    method = str(request.get("method", "")).upper()
    url = str(request.get("url", ""))
    if url.startswith(base + "/"):
        url = url[len(base) + 1 :]
    parts = [s for s in urlsplit(url).path.split("/") if s]
    return method, parts[0] if parts else "", parts[1] if len(parts) > 1 else None


async def _check_bundle(request: Request, entries: list[Any], base: str) -> None:
    """Refuse up front what no entry may do: change the trail, store an unusable Consent."""
    for i, raw in enumerate(entries):
        method, rtype, rid = _entry_request(raw, base)
        if rtype == AUDIT_TYPE:
            if method not in ("GET", "POST") or (method == "POST" and not access(request).grants.admin):
                raise at_entry(i, _audit_write_refused(method or "this method"))
            raise at_entry(
                i,
                FHIRError.of(
                    400,
                    "not-supported",
                    "AuditEvents are not handled inside a Bundle: search the trail with "
                    "GET /fhir/AuditEvent, and import an earlier system's events one by one "
                    "with POST /fhir/AuditEvent.",
                ),
            )
        if rtype == "Consent" and method in ("POST", "PUT") and isinstance(raw, dict):
            try:
                _service(request).store.prepare(
                    "Consent", raw.get("resource"), url_id=rid if method == "PUT" else None
                )
                check_consent_record(raw.get("resource"))
            except FHIRError as exc:
                raise at_entry(i, exc, "Consent") from None


async def bundle(request: Request) -> Response:
    body = await json_body(request)
    base = _service(request).base
    entries = body.get("entry") if isinstance(body, dict) else None
    entries = entries if isinstance(entries, list) else []
    await _check_bundle(request, entries, base)
    limit = request.app.state.settings.max_bundle_entries
    result = await process_bundle(_service(request), body, max_entries=limit)
    reads = [
        (i, rtype)
        for i, raw in enumerate(entries)
        for method, rtype, _rid in [_entry_request(raw, base)]
        if method == "GET" and is_patient_data(rtype)
    ]
    consents = [
        i
        for i, raw in enumerate(entries)
        if _entry_request(raw, base)[1] == "Consent"
        and _entry_request(raw, base)[0] in ("POST", "PUT")
    ]
    if not reads and not consents:
        return respond(result)
    out = _load(result.body)
    responses = out.get("entry") or []
    # Every resource a GET entry returns (a read's resource, a search's matches and includes).
    found: list[dict[str, Any]] = []
    for i, _rtype in reads:
        res = responses[i].get("resource") if i < len(responses) else None
        if not isinstance(res, dict):
            continue
        if res.get("resourceType") == "Bundle":
            found.extend(
                e["resource"] for e in res.get("entry") or () if isinstance(e.get("resource"), dict)
            )
        else:
            found.append(res)
    action = "transaction" if body.get("type") == "transaction" else "batch"
    release = await _gate(request).open_for(request, found, action=action)
    for i, rtype in reads:
        res = responses[i].get("resource") if i < len(responses) else None
        if not isinstance(res, dict):
            continue
        trail = rtype == AUDIT_TYPE
        if res.get("resourceType") == "Bundle":
            before = release.withheld
            kept, _changed = _filter_entries(release, res.get("entry") or [], trail)
            if release.withheld > before:
                _add_notice(res, kept, release.withheld - before, rtype)
            if kept:
                res["entry"] = kept
            else:
                res.pop("entry", None)
        elif trail:
            release.released += 1
        else:
            got = release.filter_each([res])[0]
            if got is None:
                responses[i] = {
                    "response": {"status": "403 Forbidden", "outcome": withheld_read().outcome()}
                }
            else:
                responses[i]["resource"] = got
    for i in consents:  # Consent writes in the Bundle: their people are named on the event
        res = responses[i].get("resource") if i < len(responses) else None
        raw_resource = entries[i].get("resource") if isinstance(entries[i], dict) else None
        for p in patients_of(res if isinstance(res, dict) else raw_resource or {}):
            if p not in release.patients:
                release.patients.append(p)
    await release.audited()
    return respond(Result(result.status, orjson.dumps(out), result.headers))


def store_routes() -> list[Route]:
    """The FHIR REST routes of the store, in matching order."""
    return [
        Route("/fhir", bundle, methods=["POST"]),
        Route("/fhir/{type}/_search", search, methods=["POST"]),
        Route("/fhir/{type}/_history", type_history, methods=["GET"]),
        Route("/fhir/{type}", search, methods=["GET"]),
        Route("/fhir/{type}", create, methods=["POST"]),
        Route("/fhir/{type}/{id}/_history/{vid}", vread, methods=["GET"]),
        Route("/fhir/{type}/{id}/_history", instance_history, methods=["GET"]),
        Route("/fhir/{type}/{id}", read, methods=["GET"]),
        Route("/fhir/{type}/{id}", update, methods=["PUT"]),
        Route("/fhir/{type}/{id}", delete, methods=["DELETE"]),
    ]
