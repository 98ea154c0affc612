"""Fixtures of the identity tests: keys (made once per session), a JWKS server, a shared hub."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

import httpx
import orjson
import pytest
import pytest_asyncio
from conftest import BACKENDS, PG_ADMIN, TEST_BASE, _truncate

from sharedcare.app import create_app
from sharedcare.iam.client import generate_key, public_jwks
from sharedcare.registry.model import new_system
from sharedcare.settings import Settings


@pytest.fixture(scope="session")
def es_key() -> Any:
    return generate_key("ES384", kid="client-es384-a")


@pytest.fixture(scope="session")
def es_key_b() -> Any:
    return generate_key("ES384", kid="client-es384-b")


@pytest.fixture(scope="session")
def rs_key() -> Any:
    return generate_key("RS384", kid="client-rs384-a")


class JwksServer:
    """A real HTTP server on 127.0.0.1 publishing a JWKS a test can change."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.cache_control: str | None = "max-age=600"
        self.requests = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests += 1
                body = orjson.dumps(server.jwks)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                if server.cache_control:
                    self.send_header("Cache-Control", server.cache_control)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/jwks.json"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> Self:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    with JwksServer() as server:
        yield server


@pytest.fixture
def jwks_servers() -> Iterator[list[JwksServer]]:
    """Three JWKS servers (for the cache-size test)."""
    servers = [JwksServer().__enter__() for _ in range(3)]
    yield servers
    for server in servers:
        server.__exit__()


# -- one hub per module and backend, for long tables of cases --------------------------
# A fresh database per test costs ~0.5 s of set-up; tables of cases that only need
# registered clients (each with its own id) share one app per backend instead. A module
# using these must not also use the function-scoped ``app`` (it would empty the database).
@pytest_asyncio.fixture(scope="module", params=BACKENDS)
async def shared_app(
    request: pytest.FixtureRequest, pg_database: str | None, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Any]:
    tmp = tmp_path_factory.mktemp("shared-hub")
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp / 'hub.db'}"
    else:
        if pg_database is None:
            pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN} (CI would fail here)")
        await _truncate(pg_database)
        url = pg_database
    settings = Settings(
        database_url=url, data_dir=tmp / "data", base_url=TEST_BASE, max_body_bytes=2 * 1024 * 1024,
        hub_key_alg="ES384",
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest_asyncio.fixture
async def shared_http(shared_app: Any) -> AsyncIterator[httpx.AsyncClient]:
    """An anonymous client of the module's shared app."""
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=shared_app), base_url=TEST_BASE) as http:
        yield http


@pytest.fixture
def shared_register(shared_app: Any) -> Any:
    """``await shared_register(client_id, key, scopes)``: a consumer on the shared app (once)."""

    async def register(client_id: str, key: Any, scopes: str) -> None:
        registry = shared_app.state.iam.registry
        if await registry.get(client_id) is None:
            system = new_system(client_id=client_id, kind="consumer", name=client_id, scopes=scopes, jwks=public_jwks(key))
            await registry.add(system)

    return register
