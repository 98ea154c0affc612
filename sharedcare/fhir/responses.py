"""FHIR JSON in and out: orjson bodies, ``application/fhir+json``, and the one error handler."""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sharedcare.fhir.errors import FHIRError, Issue, operation_outcome

FHIR_JSON = "application/fhir+json"
_ACCEPTED_BODY_TYPES = ("application/fhir+json", "application/json", "application/json+fhir")
log = structlog.get_logger("sharedcare.fhir")


class FHIRResponse(Response):
    """A FHIR JSON response; accepts a dict or pre-serialised bytes."""

    media_type = FHIR_JSON

    def render(self, content: Any) -> bytes:
        if isinstance(content, bytes):
            return content
        return orjson.dumps(content)


def fhir_json(content: Any, status: int = 200, headers: dict[str, str] | None = None) -> FHIRResponse:
    return FHIRResponse(content, status_code=status, headers=headers)


def check_json_media_type(content_type: str | None) -> None:
    """Raise a 415 unless ``content_type`` is a FHIR JSON media type (checked before reading)."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media not in _ACCEPTED_BODY_TYPES:
        raise FHIRError.of(
            415,
            "not-supported",
            f"Content-Type {media or '(none)'!r} is not supported; send application/fhir+json.",
        )


def parse_json_body(body: bytes, content_type: str | None) -> Any:
    """Decode a FHIR JSON request body or raise a 415/400 the client can act on."""
    check_json_media_type(content_type)
    if not body:
        raise FHIRError.of(400, "invalid", "The request body is empty; send a FHIR JSON resource.")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise FHIRError.of(400, "structure", f"The request body is not valid JSON: {exc}.") from None


async def fhir_error_handler(request: Request, exc: Exception) -> Response:
    """Render a :class:`FHIRError` as an OperationOutcome."""
    assert isinstance(exc, FHIRError)
    return fhir_json(exc.outcome(), exc.status, exc.headers)


async def http_error_handler(request: Request, exc: Exception) -> Response:
    """Starlette's own 404/405 become OperationOutcomes too, so every error has one shape."""
    assert isinstance(exc, HTTPException)
    code = {404: "not-found", 405: "not-supported"}.get(exc.status_code, "processing")
    message = {
        404: f"No route for {request.method} {request.url.path}.",
        405: f"{request.method} is not allowed on {request.url.path}.",
    }.get(exc.status_code, str(exc.detail))
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = _allowed_methods(request) or headers.get("Allow", "")
    return fhir_json(operation_outcome(Issue(code, message)), exc.status_code, headers)


def _allowed_methods(request: Request) -> str:
    """Every method some route serves at this path (Starlette names only the first route's)."""
    methods: set[str] = set()
    for route in getattr(request.app, "routes", ()):
        if isinstance(route, Route) and route.methods and route.path_regex.match(request.url.path):
            methods |= route.methods
    return ", ".join(sorted(methods))


async def server_error_handler(request: Request, exc: Exception) -> Response:
    """A 500 never shows internals: the client gets the request id to quote to an operator."""
    request_id = request.scope.get("state", {}).get("request_id", "")
    log.error("unhandled error", exc_info=exc, path=request.url.path)
    issue = Issue(
        "exception",
        f"The server could not complete the request. Quote request id {request_id} to the operator.",
        severity="fatal",
    )
    # Starlette's error middleware sits outside ours, so add the request id header here.
    return fhir_json(operation_outcome(issue), 500, {"X-Request-ID": request_id} if request_id else None)


EXCEPTION_HANDLERS = {
    FHIRError: fhir_error_handler,
    HTTPException: http_error_handler,
    Exception: server_error_handler,
}
