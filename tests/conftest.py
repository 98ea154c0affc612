"""Shared fixtures: every database test runs on SQLite and on PostgreSQL.

PostgreSQL is found at ``SHAREDCARE_TEST_PG`` (default postgresql://postgres@127.0.0.1:5432/test).
Each test session creates its own database there and drops it at the end; each test starts
from empty tables. Under CI (``CI`` set) an unreachable PostgreSQL fails the run; on a
developer machine it skips the PostgreSQL half with a message saying why.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text

from sharedcare.app import create_app
from sharedcare.settings import Settings
from sharedcare.store import migrate
from sharedcare.store.db import Database
from sharedcare.store.schema import metadata

PG_ADMIN = os.environ.get("SHAREDCARE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]
TEST_BASE = "http://testserver"


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str | None]:
    """A throwaway PostgreSQL database for this session, migrated once; None if unreachable."""
    name = f"sharedcare_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        if _in_ci():
            pytest.fail(f"PostgreSQL at {PG_ADMIN} is required under CI and unreachable: {exc}")
        yield None
        return
    base, _, _db = PG_ADMIN.rpartition("/")
    url = f"{base}/{name}".replace("postgresql://", "postgresql+asyncpg://", 1)

    async def prepare() -> None:
        db = Database(url)
        await migrate.upgrade(db)
        await db.close()

    asyncio.run(prepare())
    yield url
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _truncate(url: str) -> None:
    db = Database(url)
    tables = ", ".join(t.name for t in metadata.sorted_tables)
    async with db.engine.begin() as conn:
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    await db.close()


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest_asyncio.fixture
async def database_url(backend: str, pg_database: str | None, tmp_path: Path) -> str:
    """An empty, migrated database of the requested backend."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}"
    if pg_database is None:
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN} (CI would fail here)")
    await _truncate(pg_database)
    return pg_database


@pytest.fixture
def settings(database_url: str, tmp_path: Path) -> Settings:
    return Settings(
        database_url=database_url,
        data_dir=tmp_path / "data",
        base_url=TEST_BASE,
        default_page_size=50,
        max_page_size=1000,
        max_body_bytes=2 * 1024 * 1024,
    )


@pytest_asyncio.fixture
async def app(settings: Settings) -> AsyncIterator[Any]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest_asyncio.fixture
async def client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client over the ASGI app (real HTTP semantics, no socket)."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=TEST_BASE) as http:
        yield http
