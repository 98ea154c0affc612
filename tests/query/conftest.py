"""A hub with three real provider simulators and a real PDS simulator, for federated queries.

Providers and PDS are real HTTP servers on sockets (started once per session; faults are reset
after each test). Per test, on SQLite and PostgreSQL: the provider systems and a consumer are
registered in the hub's registry, the providers register their people through the PIXm feed,
the hub traces them against PDS, and the fixture waits until every link is verified.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
import pytest_asyncio
from query.federation import (
    BASE,
    CLEAR_FAULTS,
    CONSUMER,
    END_USER,
    NAMES,
    PEOPLE,
    PROVIDER_IDS,
    Federated,
    _token,
)

from sharedcare.app import create_app
from sharedcare.iam.client import generate_key
from sharedcare.settings import Settings
from sharedcare.simulators.pds import SimulatorServer, create_pds_app
from sharedcare.simulators.provider import (
    ProviderConfig,
    ProviderServer,
    provider_people,
    register_people,
)


@pytest.fixture(scope="session")
def pds_server() -> Iterator[SimulatorServer]:
    with SimulatorServer(create_pds_app(PEOPLE, 2026)) as server:
        yield server


@pytest.fixture(scope="session")
def provider_servers() -> Iterator[dict[str, ProviderServer]]:
    servers = {
        pid: ProviderServer(
            ProviderConfig(
                id=pid,
                people=PEOPLE,
                share=0.8,
                resources_per_search=4,
                resource_bytes=0,
                name=NAMES[pid],
            )
        )
        for pid in PROVIDER_IDS
    }
    for server in servers.values():
        server.start()
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def keys() -> dict[str, Any]:
    return {
        name: generate_key("ES384", kid=f"{name}-key")
        for name in (*PROVIDER_IDS, CONSUMER, "narrow")
    }


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def query_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def _empty_pg(url: str) -> None:
    from sqlalchemy import text

    from sharedcare.store.db import Database
    from sharedcare.store.schema import metadata

    db = Database(url)
    async with db.engine.begin() as conn:
        tables = ", ".join(t.name for t in metadata.sorted_tables)
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    await db.close()


@pytest_asyncio.fixture(scope="module")
async def hub(
    query_backend: str,
    pg_database: str | None,
    tmp_path_factory: pytest.TempPathFactory,
    pds_server: SimulatorServer,
    provider_servers: dict[str, ProviderServer],
    keys: dict[str, Any],
) -> AsyncIterator[Federated]:
    """One hub per test module and backend: registering and tracing everyone takes seconds."""
    tmp_path = tmp_path_factory.mktemp("query")
    if query_backend == "sqlite":
        database_url = f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}"
    elif pg_database is None:
        pytest.skip("PostgreSQL unreachable (CI would fail here)")
    else:
        database_url = pg_database
        await _empty_pg(pg_database)
    from sharedcare.iam.client import public_jwks
    from sharedcare.registry.model import new_system

    settings = Settings(
        database_url=database_url,
        data_dir=tmp_path / "data",
        base_url=BASE,
        hub_key_alg="ES384",
        pds_base_url=pds_server.url,
        query_provider_wait_ms=1500,
        query_breaker_failures=3,
        query_breaker_open_seconds=30,
        query_max_provider_wait_ms=2000,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        registry = app.state.iam.registry
        for pid, server in provider_servers.items():
            await registry.add(
                new_system(
                    client_id=pid, kind="provider", name=NAMES[pid], scopes="system/Patient.u system/*.rs",
                    fhir_base=server.base_url, identifier_systems=(server.config.identifier_system,),
                    jwks=public_jwks(keys[pid]),
                )
            )  # fmt: skip
        await registry.add(
            new_system(client_id=CONSUMER, kind="consumer", name="Care portal", scopes="system/*.rs system/AuditEvent.rs",
                       organization="RR8", jwks=public_jwks(keys[CONSUMER]))
        )  # fmt: skip
        await registry.add(
            new_system(client_id="narrow", kind="consumer", name="Narrow portal", scopes="system/Patient.rs",
                       jwks=public_jwks(keys["narrow"]))
        )  # fmt: skip
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=BASE, timeout=30) as http:
            for pid, server in provider_servers.items():
                token = await _token(http, pid, keys[pid], "system/Patient.u", None)

                async def provide(token: str = token) -> str:
                    return token

                await register_people(server.config, BASE, provide, http=http)
            await _wait_verified(app, provider_servers)
            yield Federated(app, http, provider_servers, pds_server)


@pytest_asyncio.fixture
async def federated(hub: Federated, keys: dict[str, Any]) -> AsyncIterator[Federated]:
    """The module's hub with a fresh consumer token; faults and breakers reset afterwards."""
    token = await _token(hub.http, CONSUMER, keys[CONSUMER], "system/*.rs", END_USER)
    hub.http.headers["Authorization"] = f"Bearer {token}"
    yield hub
    async with httpx.AsyncClient(timeout=5) as plain:
        for server in hub.providers.values():
            await plain.put(f"{server.base_url}/_admin/faults", json=CLEAR_FAULTS)
    hub.app.state.query.clients.reset()


async def _wait_verified(app: Any, servers: dict[str, ProviderServer], timeout: float = 30) -> None:
    expected: dict[str, int] = {}
    for server in servers.values():
        for person in provider_people(server.config):
            expected[person.nhs_number] = expected.get(person.nhs_number, 0) + 1
    deadline = time.monotonic() + timeout
    while True:
        pending = []
        for nhs, links in expected.items():
            person = await app.state.pix.find(nhs_number=nhs)
            if person is None or len(person.routable) < links:
                pending.append(nhs)
        if not pending:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(pending)} people not verified in {timeout} s")
        await asyncio.sleep(0.1)


@pytest_asyncio.fixture
async def consumer_token(federated: Federated, keys: dict[str, Any]) -> Any:
    async def token(
        client_id: str = CONSUMER, scope: str = "system/*.rs", end_user: Any = END_USER
    ) -> str:
        return await _token(federated.http, client_id, keys[client_id], scope, end_user)

    return token
