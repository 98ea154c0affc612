"""FHIR JSON in and out: orjson bodies, ``application/fhir+json``, and the one error handler."""

from __future__ import annotations

from typing import Any

import orjson
import structlog
from asyncpg.exceptions import InterfaceError as PGInterfaceError
from asyncpg.exceptions import InternalClientError as PGInternalError
from asyncpg.exceptions import PostgresError as PGError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
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


def _database_unavailable(exc: BaseException) -> bool:
    """The database had no connection for the request: the pool exhausted, the server out of
    connections or restarting, a connection lost (any other OSError is not the database's)."""
    from sharedcare.store.db import is_connection_failure

    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError):
        return False
    return is_connection_failure(exc)


def _unavailable(request: Request, exc: BaseException) -> Response:
    request_id = request.scope.get("state", {}).get("request_id", "")
    log.warning("database unavailable", error=type(exc).__name__, path=request.url.path)
    issue = Issue(
        "transient",
        "The hub's database has no connection for this request (the hub is at capacity, "
        "or the database is restarting). Retry shortly.",
    )
    headers = {"Retry-After": "1", **({"X-Request-ID": request_id} if request_id else {})}
    return fhir_json(operation_outcome(issue), 503, headers)


async def database_error_handler(request: Request, exc: Exception) -> Response:
    """A database with no connection for the request is a 503 with Retry-After, wherever it
    happens: the request can be repeated, and no data was released (a release waits for its
    audit record, which needs the database too). Any other database error stays a 500."""
    if _database_unavailable(exc):
        return _unavailable(request, exc)
    raise exc


async def server_error_handler(request: Request, exc: Exception) -> Response:
    """A 500 never shows internals: the client gets the request id to quote to an operator.

    The database being unavailable is a 503 here too, for failures raised outside the
    routes (in the access middleware) that :func:`database_error_handler` does not see.
    """
    if _database_unavailable(exc):
        return _unavailable(request, exc)
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
    # The database without a connection for the request (see database_error_handler).
    DBAPIError: database_error_handler,
    PoolTimeout: database_error_handler,
    ConnectionError: database_error_handler,
    PGInterfaceError: database_error_handler,
    PGInternalError: database_error_handler,
    PGError: database_error_handler,
    Exception: server_error_handler,
}
