"""Starlette routes of the regional FHIR store: thin adapters over :class:`FhirService`."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sharedcare.fhir.errors import FHIRError
from sharedcare.fhir.responses import check_json_media_type, fhir_json, parse_json_body
from sharedcare.store.service import FhirService, Result
from sharedcare.store.transaction import process_bundle


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
    return FHIRError.of(413, "too-costly", f"The request body is larger than the limit of {limit} bytes.")


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


async def search(request: Request) -> Response:
    rtype = request.path_params["type"]
    items = list(request.query_params.multi_items())
    if request.method == "POST":  # POST [type]/_search with a form body (search.html#Introduction)
        media = request.headers.get("content-type", "").split(";")[0].strip()
        if media != "application/x-www-form-urlencoded":
            raise FHIRError.of(415, "not-supported", "POST _search takes application/x-www-form-urlencoded.")
        raw = await read_body(request, request.app.state.settings.max_body_bytes)
        items += parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True)
    return respond(await _service(request).search(rtype, items, lenient=lenient(request)))


async def create(request: Request) -> Response:
    rtype = request.path_params["type"]
    _service(request).store.check_type(rtype)
    body = await json_body(request)
    return respond(
        await _service(request).create(
            rtype,
            body,
            if_none_exist=request.headers.get("if-none-exist"),
            prefer=request.headers.get("prefer"),
        )
    )


async def read(request: Request) -> Response:
    p = request.path_params
    return respond(await _service(request).read(p["type"], p["id"]))


async def vread(request: Request) -> Response:
    p = request.path_params
    return respond(await _service(request).vread(p["type"], p["id"], p["vid"]))


async def update(request: Request) -> Response:
    p = request.path_params
    _service(request).store.check_type(p["type"])
    body = await json_body(request)
    return respond(
        await _service(request).update(
            p["type"],
            p["id"],
            body,
            if_match=request.headers.get("if-match"),
            prefer=request.headers.get("prefer"),
        )
    )


async def delete(request: Request) -> Response:
    p = request.path_params
    return respond(await _service(request).delete(p["type"], p["id"]))


async def type_history(request: Request) -> Response:
    items = list(request.query_params.multi_items())
    return respond(await _service(request).history(request.path_params["type"], None, items))


async def instance_history(request: Request) -> Response:
    p = request.path_params
    items = list(request.query_params.multi_items())
    return respond(await _service(request).history(p["type"], p["id"], items))


async def bundle(request: Request) -> Response:
    body = await json_body(request)
    limit = request.app.state.settings.max_bundle_entries
    return respond(await process_bundle(_service(request), body, max_entries=limit))


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
