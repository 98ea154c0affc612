"""Acknowledged writes survive a kill -9 of the hub process (REQUIREMENTS: nothing lost)."""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

import httpx
from helpers import FHIR_JSON, RunningHub, patient
from sqlalchemy import func, select

from sharedcare.settings import Settings
from sharedcare.store.db import Database
from sharedcare.store.schema import change_log, idx_token, resource_versions, resources


async def _writer(http: httpx.AsyncClient, acknowledged: list[str], stop: asyncio.Event, n: int) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        try:
            response = await http.post("/fhir/Patient", json=patient(family=f"Kill{n}", given=f"W{i}"), headers=FHIR_JSON)
        except httpx.TransportError:
            return  # the hub died mid-request: this write was never acknowledged
        if response.status_code == 201:
            acknowledged.append(response.json()["id"])
        else:
            raise AssertionError(f"write refused: {response.status_code} {response.text}")


async def test_acknowledged_writes_survive_sigkill(settings: Settings, hub_auth: Any) -> None:
    env = {"SHAREDCARE_DATABASE_URL": settings.database, "SHAREDCARE_DATA_DIR": str(settings.data_dir)}
    acknowledged: list[str] = []
    with RunningHub(env) as hub:
        stop = asyncio.Event()
        headers = await hub_auth(hub.url)
        async with httpx.AsyncClient(base_url=hub.url, timeout=10, headers=headers) as http:
            writers = [asyncio.create_task(_writer(http, acknowledged, stop, n)) for n in range(8)]
            deadline = asyncio.get_running_loop().time() + 60
            while len(acknowledged) < 150 and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.01)
            os.kill(hub.proc.pid, signal.SIGKILL)  # no shutdown, no flush: kill -9
            hub.proc.wait()
            stop.set()
            await asyncio.gather(*writers)
    assert len(acknowledged) >= 150
    with RunningHub(env) as hub:
        headers = await hub_auth(hub.url)
        async with httpx.AsyncClient(base_url=hub.url, timeout=10, headers=headers) as http:
            missing = []
            for pid in acknowledged:
                response = await http.get(f"/fhir/Patient/{pid}")
                if response.status_code != 200:
                    missing.append(pid)
            found = (await http.get("/fhir/Patient", params={"_count": 0})).json()["total"]
    assert missing == []
    # Nothing half-written either: every stored Patient is whole and searchable.
    assert found >= len(acknowledged)
    db = Database(settings.database)
    async with db.read() as conn:
        counts = [
            (await conn.execute(select(func.count()).select_from(t))).scalar_one()
            for t in (resources, resource_versions, change_log)
        ]
        nhs_rows = (
            await conn.execute(select(func.count()).where(idx_token.c.type == "Patient", idx_token.c.param == "identifier"))
        ).scalar_one()
    await db.close()
    # every resource has its version, its change-log row and its index rows: no partial write
    # Patients plus the test's own registry entries (Organization and Endpoint for the admin)
    assert counts[0] == counts[1] == counts[2] >= found
    assert nhs_rows == found
