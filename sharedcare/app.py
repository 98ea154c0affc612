"""Assemble the ASGI app: settings → database → store → routes (STYLE §7: explicit dependencies)."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.routing import BaseRoute, Route

from sharedcare import __version__
from sharedcare.audit import AuditWriter
from sharedcare.audit.trail import AUDIT_TYPE, AuditTrail
from sharedcare.consent import hub as consent_hub
from sharedcare.fhir.responses import EXCEPTION_HANDLERS
from sharedcare.iam.middleware import AuthMiddleware
from sharedcare.iam.routes import iam_routes
from sharedcare.iam.service import Iam
from sharedcare.logs import configure_logging
from sharedcare.messaging import hub as messaging_hub
from sharedcare.metrics.health import health_routes
from sharedcare.metrics.middleware import MetricsMiddleware, RequestIdMiddleware
from sharedcare.pix import hub as pix_hub
from sharedcare.query import hub as query_hub
from sharedcare.settings import Settings, load_settings
from sharedcare.store import migrate
from sharedcare.store.capability import metadata
from sharedcare.store.db import Database
from sharedcare.store.repository import Store
from sharedcare.store.routes import store_routes
from sharedcare.store.service import FhirService

log = structlog.get_logger("sharedcare.app")
GEN0_THRESHOLD = 50_000  # see settle_heap


def settle_heap() -> None:
    """Move everything built at start-up out of the cyclic garbage collector's sight.

    The start-up heap (R4 models and definitions, SQLAlchemy, compiled search plans) is a few
    hundred thousand long-lived objects. Every full collection walked all of them: 50-100 ms
    with the event loop stopped, which was the whole p99 of an audited request (bench/audit.py
    measured loop stalls of 70-100 ms, nearly all in generation-2 collections). Frozen
    objects are never collected, which is right for what lives as long as the process.

    Then the youngest generation is collected after ``GEN0_THRESHOLD`` net new container
    objects instead of CPython's 700. A federated query parses three provider pages into
    about 2,000 dicts and lists, so at 700 the collector ran several times per query over
    the pages still in flight, only to find them alive: ``perf`` put the collector at 9-10 %
    of a hub worker's CPU at saturation, and under 0.1 % at 50,000. Cyclic garbage waits
    longer to be freed: at most that many objects, a few MB.
    """
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, older, oldest)


# Capabilities that plug into the hub: routes before the store's generic ones, lifespans in order.
CAPABILITIES = (pix_hub, consent_hub, query_hub, messaging_hub)


def create_app(settings: Settings | None = None) -> Starlette:
    """The hub's ASGI app; collaborators are built in the lifespan and kept on ``app.state``."""
    settings = settings or load_settings()
    # Each uvicorn worker is a fresh process: configure its logging here, not only in the CLI.
    configure_logging(settings.log_level, json=settings.log_json)
    iam = Iam(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = Database(
            settings.database,
            pool_size=settings.db_pool_size,
            sqlite_synchronous=settings.sqlite_synchronous,
            pool_timeout=settings.db_pool_timeout_seconds,
        )
        if settings.auto_migrate:
            await migrate.upgrade(db)
        settings.objects_dir.mkdir(parents=True, exist_ok=True)
        store = Store(db)
        app.state.db = db
        app.state.fhir = FhirService(
            store,
            fhir_base=settings.fhir_base,
            default_count=settings.default_page_size,
            max_count=settings.max_page_size,
        )
        await iam.start(db, app.state.fhir)
        app.state.iam = iam
        # Pathways that release patient data record through this writer before they respond;
        # auditors read the same trail through the FHIR API.
        audit = AuditWriter(db, hub_base=settings.fhir_base)
        await audit.start()
        app.state.audit = audit
        app.state.trail = AuditTrail(
            db,
            store.params[AUDIT_TYPE],
            fhir_base=settings.fhir_base,
            default_count=settings.default_page_size,
            max_count=settings.max_page_size,
        )
        log.info("hub started", version=__version__, database=db.dialect, base_url=settings.public_base_url)
        try:
            async with AsyncExitStack() as capabilities:
                for capability in CAPABILITIES:
                    await capabilities.enter_async_context(capability.lifespan(app))
                settle_heap()
                yield
        finally:
            await audit.stop()  # drains: every pending record is written before the db closes
            await iam.close()
            await db.close()

    async def readiness() -> tuple[bool, dict[str, Any]]:
        db: Database = app.state.db
        await db.ping()
        current = await migrate.is_current(db)
        audit: AuditWriter = app.state.audit
        return current and audit.running, {
            "database": "ok",
            "migrations": "current" if current else "pending",
            "audit": "running" if audit.running else "stopped",
        }

    routes: list[BaseRoute] = [
        *health_routes(readiness),
        Route("/fhir/metadata", metadata, methods=["GET"]),
        *iam_routes(),
        *(route for capability in CAPABILITIES for route in capability.routes()),
        *store_routes(),
    ]
    app = Starlette(
        routes=routes,
        middleware=[
            Middleware(RequestIdMiddleware),
            Middleware(MetricsMiddleware),
            Middleware(AuthMiddleware, iam=iam, max_body_bytes=settings.max_body_bytes),
        ],
        exception_handlers=EXCEPTION_HANDLERS,  # type: ignore[arg-type]
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.capability = None
    return app
