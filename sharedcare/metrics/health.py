"""Liveness, readiness and metrics endpoints for orchestrators and Prometheus."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias

import anyio
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sharedcare.logs import get_logger
from sharedcare.metrics.registry import render_metrics

__all__ = ["Readiness", "health_routes"]

Readiness: TypeAlias = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]

# Probes must never be served from a cache: a stale "ok" hides an outage.
_NO_STORE = {"Cache-Control": "no-store"}

_log = get_logger("sharedcare.health")


def health_routes(readiness: Readiness, *, timeout: float | None = 5.0) -> list[Route]:
    """Return routes for GET /livez, /readyz (backed by *readiness*) and /metrics."""

    async def livez(request: Request) -> Response:
        """Report that the process is up; deliberately does no I/O."""
        return _json(200, {"status": "ok"})

    async def readyz(request: Request) -> Response:
        """Report whether dependencies are usable: 200 or 503 with the readiness details."""
        try:
            # A hung dependency must turn into "not ready", not into a hung probe.
            with anyio.fail_after(timeout):
                ready, details = await readiness()
        except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
            # Only the class name goes out: messages can hold hosts, DSNs or SQL.
            _log.warning("readiness check raised", exc_info=True)
            return _json(503, {"status": "error", "error": type(exc).__name__})
        return _json(200 if ready else 503, details)

    def metrics(request: Request) -> Response:
        """Expose Prometheus metrics."""
        # A sync endpoint, so Starlette runs it in the thread pool: in multiprocess mode rendering
        # reads every worker's files and should not stall the event loop.
        body, content_type = render_metrics()
        return Response(body, media_type=content_type, headers=_NO_STORE)

    return [
        Route("/livez", livez, methods=["GET"], name="livez"),
        Route("/readyz", readyz, methods=["GET"], name="readyz"),
        Route("/metrics", metrics, methods=["GET"], name="metrics"),
    ]


def _json(status: int, content: Any) -> Response:
    """Build an uncached JSON response with orjson."""
    return Response(
        orjson.dumps(content, default=str),
        status_code=status,
        media_type="application/json",
        headers=_NO_STORE,
    )
