"""Fixtures for the audit tests: a migrated database of each backend, a writer, the trail."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_asyncio

from sharedcare.audit import AuditRecord, AuditWriter
from sharedcare.audit.trail import AUDIT_TYPE, AuditTrail
from sharedcare.store import migrate
from sharedcare.store.db import Database
from sharedcare.store.repository import Store

FHIR_BASE = "http://testserver/fhir"


@pytest_asyncio.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await migrate.upgrade(database)  # PostgreSQL is migrated once per session; SQLite is new
    yield database
    await database.close()


@pytest_asyncio.fixture
async def store(db: Database) -> Store:
    return Store(db)


@pytest_asyncio.fixture
async def trail(db: Database, store: Store) -> AuditTrail:
    return AuditTrail(db, store.params[AUDIT_TYPE], fhir_base=FHIR_BASE, default_count=100, max_count=1000)


@pytest_asyncio.fixture
async def writer(db: Database) -> AsyncIterator[AuditWriter]:
    w = AuditWriter(db, hub_base=FHIR_BASE)
    await w.start()
    yield w
    await w.stop()


def record_factory(**overrides: Any) -> AuditRecord:
    """A typical released search: a clinician at RR8 asked two providers about one patient."""
    values: dict[str, Any] = {
        "action": "search-type",
        "request_id": f"req-{uuid.uuid4().hex[:12]}",
        "client_id": "portal-a",
        "query": "GET /fhir/Observation?patient=Patient/p1&_count=10",
        "user_id": "u-100",
        "user_name": "Dr Jo Bloggs",
        "user_role": "R8000",
        "purpose_of_use": "TREAT",
        "organization": "RR8",
        "patient": "Patient/p1",
        "nhs_number": "9434765919",
        "providers": ("gp-1", "acute-2"),
        "released": 40,
        "withheld": 2,
        "client_address": "10.0.0.1",
    }
    values.update(overrides)
    return AuditRecord(**values)


@pytest.fixture
def make_record() -> Callable[..., AuditRecord]:
    return record_factory
