"""Pure ASGI middleware: per-route Prometheus metrics, request ids and one access log line per request."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
from starlette.routing import BaseRoute, Host, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sharedcare.logs import get_logger
from sharedcare.metrics.buffer import BufferedCounter, BufferedGauge, BufferedHistogram
from sharedcare.metrics.registry import get_metrics, lazy

__all__ = ["UNMATCHED_ROUTE", "MetricsMiddleware", "RequestIdMiddleware", "route_template"]

UNMATCHED_ROUTE: Final = "<unmatched>"

# Anything else collapses to OTHER: the method is client-chosen and would make labels unbounded.
_KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
_REQUEST_ID_RE: Final = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_QUIET_PATHS: Final = ("/livez", "/readyz", "/metrics")

_access_log = get_logger("sharedcare.access")


class MetricsMiddleware:
    """Count requests and time them, labelled by route template, method and status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        hot = _hot()
        # Routing mutates scope (root_path, path_params, route); keep what matching needs.
        original_root_path: str = scope.get("root_path", "")
        status = 500  # if the app never starts a response, the client sees a failure
        start = time.perf_counter()

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        hot.in_flight.add(amount=1)
        try:
            await self.app(scope, receive, send_with_status)
        except Exception:
            # Starlette's ServerErrorMiddleware (outside us) turns this into a 500; if the
            # response had already started, the client got a truncated one - still a failure.
            status = 500
            raise
        finally:
            elapsed = time.perf_counter() - start
            hot.in_flight.add(amount=-1)
            route = route_template(scope, original_root_path)
            method = scope.get("method", "GET")
            if method not in _KNOWN_METHODS:
                method = "OTHER"
            hot.requests.inc(route, method, str(status))
            hot.duration.observe(elapsed, route, method)


@dataclass(frozen=True, slots=True)
class _Hot:
    """The HTTP metrics, buffered in-process (sharedcare.metrics.buffer)."""

    requests: BufferedCounter
    duration: BufferedHistogram
    in_flight: BufferedGauge


def _create_hot() -> _Hot:
    m = get_metrics()
    return _Hot(
        BufferedCounter(m.http_requests_total),
        BufferedHistogram(m.http_request_duration_seconds),
        BufferedGauge(m.http_requests_in_flight),
    )


_hot = lazy(_create_hot)


def route_template(scope: Scope, original_root_path: str | None = None) -> str:
    """Return the matched route's path template (e.g. ``/fhir/{type}/{id}``) after routing ran."""
    # Starlette's Router stores the matched route in scope["route"] (a partial match, i.e. a
    # 405, included); no route means 404 or a trailing-slash redirect.
    route = scope.get("route")
    if route is None:
        return UNMATCHED_ROUTE
    if original_root_path is None or scope.get("root_path", "") == original_root_path:
        # No Mount was traversed (a Mount extends root_path), so the route's own path is complete.
        if isinstance(route, Mount):
            return _mount_leaf(route, "") or UNMATCHED_ROUTE
        path = getattr(route, "path", None)
        return path if isinstance(path, str) and path else UNMATCHED_ROUTE
    # Inside a Mount scope["route"] holds only the innermost route, whose path is relative to the
    # mount: rebuild the full template by matching again from the top-level router, as it did.
    router = scope.get("router")
    routes: Sequence[BaseRoute] = getattr(router, "routes", ())
    rematch = {**scope, "root_path": original_root_path, "path_params": {}}
    return _match_template(routes, rematch, "") or UNMATCHED_ROUTE


def _match_template(routes: Iterable[BaseRoute], scope: Scope, prefix: str) -> str | None:
    """Find the template of the route Starlette's Router would pick: first full match, else first partial."""
    partial: tuple[BaseRoute, Scope] | None = None
    for route in routes:
        match, child_scope = route.matches(scope)
        if match is Match.FULL:
            return _descend(route, {**scope, **child_scope}, prefix)
        if match is Match.PARTIAL and partial is None:
            partial = (route, child_scope)
    if partial is not None:
        return _descend(partial[0], {**scope, **partial[1]}, prefix)
    return None


def _descend(route: BaseRoute, scope: Scope, prefix: str) -> str | None:
    """Return the template for a matched *route*, recursing into mounts and hosts."""
    if isinstance(route, Mount):
        if route.routes:
            return _match_template(route.routes, scope, prefix + route.path)
        return _mount_leaf(route, prefix)
    if isinstance(route, Host):
        return _match_template(route.routes, scope, prefix)
    path = getattr(route, "path", None)
    return prefix + path if isinstance(path, str) else None


def _mount_leaf(mount: Mount, prefix: str) -> str | None:
    """Template for a Mount that ends routing: a plain ASGI app under it, or a router that found nothing."""
    if mount.routes:
        return None  # the mounted router had no match: a 404 inside the mount
    return f"{prefix}{mount.path}/{{path}}"


class RequestIdMiddleware:
    """Attach a request id (client-supplied if sane) to logs, request state and the response."""

    def __init__(
        self,
        app: ASGIApp,
        header: str = "X-Request-ID",
        *,
        quiet_paths: Iterable[str] = _QUIET_PATHS,
    ) -> None:
        self.app = app
        self.header = header
        self._header_key = header.lower().encode("latin-1")
        self._header_name = header.encode("latin-1")
        self.quiet_paths = frozenset(quiet_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        start = time.perf_counter()
        request_id = self._incoming_id(scope) or uuid.uuid4().hex
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        # When the hub had the request (deadlines that bound the caller's wait count from here).
        state["received_at"] = start
        # Decided up front: a Mount rewrites root_path while the request runs.
        quiet = _route_path(scope) in self.quiet_paths
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", ()))
                if not any(name.lower() == self._header_key for name, _ in headers):
                    headers.append((self._header_name, request_id.encode("ascii")))
                message = {**message, "headers": headers}
            await send(message)

        # bound_contextvars restores the previous values afterwards instead of clearing everything,
        # so ids bound by an outer layer survive and nothing leaks into the next request.
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except Exception:
                # Logged here, inside the context, so the traceback carries the request id (the
                # server's own "Exception in ASGI application" line is emitted without it).
                self._log_access(scope, 500, start, quiet=False, failed=True)
                raise
            self._log_access(scope, status, start, quiet=quiet, failed=False)

    def _incoming_id(self, scope: Scope) -> str | None:
        """Return the client's request id if present and a sane token, else None."""
        for name, value in scope.get("headers", ()):
            if name == self._header_key:
                # Echoed into logs and response headers: refuse anything that could inject or bloat.
                return value.decode("ascii") if _REQUEST_ID_RE.fullmatch(value) else None
        return None

    def _log_access(
        self, scope: Scope, status: int, start: float, *, quiet: bool, failed: bool
    ) -> None:
        """Emit the access line: debug for probe and scrape paths so they do not drown the log."""
        fields: dict[str, Any] = {
            "method": scope.get("method"),
            # The path only: query strings of FHIR searches can carry patient data.
            "path": scope.get("path"),
            "status": status,
            "duration_ms": round((time.perf_counter() - start) * 1000, 3),
        }
        if failed:
            _access_log.error("request failed", exc_info=True, **fields)
        elif quiet:
            _access_log.debug("request", **fields)
        else:
            _access_log.info("request", **fields)


def _route_path(scope: Scope) -> str:
    """Return the request path relative to the application's root_path."""
    path: str = scope.get("path", "")
    root_path: str = scope.get("root_path", "")
    if root_path and (path == root_path or path.startswith(root_path + "/")):
        return path[len(root_path) :] or "/"
    return path
