"""Observability: Prometheus metrics, request-id and metrics middleware, health endpoints."""

from __future__ import annotations

# None of these imports prometheus_client; it is imported on first metric use, so importing this
# package before setup_multiprocess_dir() is harmless.
from sharedcare.metrics.health import Readiness, health_routes
from sharedcare.metrics.middleware import MetricsMiddleware, RequestIdMiddleware
from sharedcare.metrics.registry import (
    get_metrics,
    is_multiprocess,
    record_store_read,
    record_store_write,
    render_metrics,
    setup_multiprocess_dir,
)

__all__ = [
    "MetricsMiddleware",
    "Readiness",
    "RequestIdMiddleware",
    "get_metrics",
    "health_routes",
    "is_multiprocess",
    "record_store_read",
    "record_store_write",
    "render_metrics",
    "setup_multiprocess_dir",
]
