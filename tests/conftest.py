"""Shared fixtures: every database test runs on SQLite and on PostgreSQL.

PostgreSQL is found at ``SHAREDCARE_TEST_PG`` (default postgresql://postgres@127.0.0.1:5432/test).
Each test session creates its own database there and drops it at the end; each test starts
from empty tables. Under CI (``CI`` set) an unreachable PostgreSQL fails the run; on a
developer machine it skips the PostgreSQL half with a message saying why.

Identity: ``client`` carries a real admin token (a registered system, a signed assertion,
POST /oauth2/token); ``anon_client`` carries none; ``hub_auth`` gets admin headers for a
``sharedcare serve`` subprocess.
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
from hypothesis import settings as hypothesis_settings
from sqlalchemy import text

from sharedcare.app import create_app
from sharedcare.iam.client import generate_key, public_jwks, sign_assertion, token_form
from sharedcare.registry.model import System, new_system
from sharedcare.settings import Settings
from sharedcare.store import migrate
from sharedcare.store.db import Database
from sharedcare.store.schema import metadata

PG_ADMIN = os.environ.get("SHAREDCARE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]

# Hypothesis fails an example that takes over 200 ms by default; one stall of a shared
# 2-core machine (70-100 ms measured) during a fast example must not fail a property.
hypothesis_settings.register_profile("sharedcare", deadline=None)
hypothesis_settings.load_profile("sharedcare")
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
    except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
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
        hub_key_alg="ES384",  # an RSA hub key per test would cost ~50 ms of key generation
    )


@pytest_asyncio.fixture
async def app(settings: Settings) -> AsyncIterator[Any]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest_asyncio.fixture
async def anon_client(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client over the ASGI app (real HTTP semantics, no socket), with no token."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=TEST_BASE) as http:
        yield http


# -- identity: a registered admin system and real tokens from the real token endpoint -----
ADMIN_CLIENT_ID = "test-admin"
ADMIN_SCOPES = "system/*.* sharedcare/admin"
TOKEN_URL = f"{TEST_BASE}/oauth2/token"
END_USER = {
    "requesting_user": {"id": "U0001", "name": "Dr Test User", "role": "R8000"},
    "requesting_organization": "X26",
    "reason_for_access": "TREAT",
}


@pytest.fixture(scope="session")
def admin_key() -> Any:
    """The admin system's private key: generated once per session (ES384 is fast to make)."""
    return generate_key("ES384", kid="test-admin-es384")


@pytest.fixture
def register_system(app: Any) -> Any:
    """``await register_system(client_id, key, scopes, **fields)``: add a system to the registry."""

    async def register(client_id: str, key: Any, scopes: str, **fields: Any) -> System:
        fields.setdefault("kind", "consumer")
        fields.setdefault("name", f"{client_id} system")
        if "jwks_url" not in fields:
            fields.setdefault("jwks", public_jwks(key))
        return await app.state.iam.registry.add(new_system(client_id=client_id, scopes=scopes, **fields))

    return register


@pytest.fixture
def get_token() -> Any:
    """``await get_token(http, client_id, key, scope, end_user=END_USER)``: POST /oauth2/token."""

    async def fetch(
        http: httpx.AsyncClient, client_id: str, key: Any, scope: str, end_user: dict[str, Any] | None = END_USER
    ) -> str:
        assertion = sign_assertion(key, client_id, TOKEN_URL, end_user=end_user)
        response = await http.post("/oauth2/token", data=token_form(assertion, scope))
        assert response.status_code == 200, response.text
        return str(response.json()["access_token"])

    return fetch


@pytest.fixture
def hub_auth(settings: Settings, admin_key: Any) -> Any:
    """``await hub_auth(hub.url)``: admin ``Authorization`` headers for a running ``sharedcare serve``.

    Registers the admin system in the hub's database (once) and gets a real token from the
    hub's token endpoint; call it again for each hub process with its own base URL.
    """
    from sharedcare.registry.service import Registry
    from sharedcare.store.repository import Store
    from sharedcare.store.service import FhirService

    registered: list[bool] = []

    async def headers(url: str, scope: str = ADMIN_SCOPES) -> dict[str, str]:
        if not registered:
            db = Database(settings.database)
            try:
                await migrate.upgrade(db)
                fhir = FhirService(Store(db), fhir_base=f"{url}/fhir", default_count=50, max_count=1000)
                system = new_system(
                    client_id=ADMIN_CLIENT_ID, kind="consumer", name="Test admin", scopes=ADMIN_SCOPES,
                    jwks=public_jwks(admin_key),
                )
                await Registry(fhir).add(system)
            finally:
                await db.close()
            registered.append(True)
        assertion = sign_assertion(admin_key, ADMIN_CLIENT_ID, f"{url}/oauth2/token", end_user=END_USER)
        async with httpx.AsyncClient(timeout=30) as http:
            response = await http.post(f"{url}/oauth2/token", data=token_form(assertion, scope))
        assert response.status_code == 200, response.text
        return {"Authorization": f"Bearer {response.json()['access_token']}"}

    return headers


@pytest_asyncio.fixture
async def client(app: Any, admin_key: Any, register_system: Any, get_token: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client over the ASGI app carrying an admin token with end-user context.

    The token is real: an admin system is registered with a generated key, signs a client
    assertion, and gets its token from POST /oauth2/token.
    """
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=TEST_BASE) as http:
        await register_system(ADMIN_CLIENT_ID, admin_key, ADMIN_SCOPES)
        token = await get_token(http, ADMIN_CLIENT_ID, admin_key, ADMIN_SCOPES)
        http.headers["Authorization"] = f"Bearer {token}"
        yield http
