"""A tiny stand-in for the hub, for the kill -9 test: ``GET /release/{n}`` audits, then answers.

Each request records an AuditEvent through :class:`AuditWriter` on the real store and only
then answers 200 with the record's request id, as every pathway that releases patient data
must. Run as ``python release_server.py DATABASE_URL PORT`` (the database already migrated).
"""

from __future__ import annotations

import sys
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from sharedcare.audit import AuditRecord, AuditWriter
from sharedcare.store.db import Database
from sharedcare.store.repository import Store


def build(database_url: str) -> Starlette:
    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        db = Database(database_url)
        writer = AuditWriter(db, Store(db), hub_base="http://release-server/fhir")
        await writer.start()
        app.state.writer = writer
        try:
            yield
        finally:
            await writer.stop()
            await db.close()

    async def release(request: Request) -> JSONResponse:
        n = int(request.path_params["n"])
        request_id = uuid.uuid4().hex
        record = AuditRecord(
            action="search-type",
            request_id=request_id,
            client_id="kill-test",
            query=f"GET /fhir/Observation?patient=Patient/p{n % 50}",
            user_id=f"u-{n % 7}",
            user_name="Kill Test",
            user_role="R8000",
            purpose_of_use="TREAT",
            organization="RR8",
            patient=f"Patient/p{n % 50}",
            providers=("gp-1",),
            released=n % 40,
        )
        event_id = await request.app.state.writer.record(record)  # durable before we answer
        return JSONResponse({"request_id": request_id, "event": event_id})

    async def ready(_request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(
        routes=[Route("/release/{n:int}", release), Route("/ready", ready)], lifespan=lifespan
    )


if __name__ == "__main__":
    url, port = sys.argv[1], int(sys.argv[2])
    uvicorn.run(build(url), host="127.0.0.1", port=port, log_level="warning", access_log=False)
