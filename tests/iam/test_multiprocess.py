"""Two `sharedcare serve` processes on one database: one replay guard, one key, one registry."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import httpx
from helpers import RunningHub

from sharedcare.iam.client import public_jwks, sign_assertion, token_form
from sharedcare.registry.model import new_system
from sharedcare.registry.service import Registry
from sharedcare.settings import Settings
from sharedcare.store import migrate
from sharedcare.store.db import Database
from sharedcare.store.repository import Store
from sharedcare.store.service import FhirService

PUBLIC = "http://hub.test"  # both processes sit behind one public URL, as behind a load balancer


async def with_registry(settings: Settings, action: Any) -> Any:
    """Act on the registry as a third process would (an operator's CLI, say)."""
    db = Database(settings.database)
    try:
        await migrate.upgrade(db)
        fhir = FhirService(Store(db), fhir_base=f"{PUBLIC}/fhir", default_count=50, max_count=1000)
        return await action(Registry(fhir, cache_seconds=0))
    finally:
        await db.close()


async def test_same_assertion_is_accepted_once_across_processes(settings: Settings, es_key: Any) -> None:
    system = new_system(client_id="twin", kind="consumer", name="Twin", scopes="system/*.read", jwks=public_jwks(es_key))
    await with_registry(settings, lambda registry: registry.add(system))
    env = {
        "SHAREDCARE_DATABASE_URL": settings.database,
        "SHAREDCARE_DATA_DIR": str(settings.data_dir),
        "SHAREDCARE_BASE_URL": PUBLIC,
        "SHAREDCARE_REGISTRY_CACHE_SECONDS": "0.5",
    }
    with ExitStack() as stack:
        # Start both at once (the database is already migrated, so neither migrates).
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(lambda hub: stack.enter_context(hub), [RunningHub(env), RunningHub(env)])
        async with httpx.AsyncClient(timeout=30) as http:
            for _ in range(4):
                form = token_form(sign_assertion(es_key, "twin", f"{PUBLIC}/oauth2/token"), "system/*.read")
                # The same assertion to both processes at once: exactly one token.
                first, second = await asyncio.gather(
                    http.post(f"{a.url}/oauth2/token", data=form), http.post(f"{b.url}/oauth2/token", data=form)
                )
                assert sorted([first.status_code, second.status_code]) == [200, 400], (first.text, second.text)
                loser = first if first.status_code == 400 else second
                assert loser.json()["error"] == "invalid_client" and "jti" in loser.json()["error_description"]
            # A token from one process is good at the other: both sign with the shared key.
            token = (first if first.status_code == 200 else second).json()["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            assert (await http.get(f"{a.url}/fhir/Organization", headers=auth)).status_code == 200
            assert (await http.get(f"{b.url}/fhir/Organization", headers=auth)).status_code == 200
            # Suspended by a third process: both refuse within the registry cache time.
            await with_registry(settings, lambda registry: registry.set_status("twin", "suspended"))
            deadline = time.monotonic() + 5
            statuses: list[int] = []
            while time.monotonic() < deadline:
                statuses = [(await http.get(f"{h.url}/fhir/Organization", headers=auth)).status_code for h in (a, b)]
                if statuses == [401, 401]:
                    break
                await asyncio.sleep(0.1)
            assert statuses == [401, 401]
