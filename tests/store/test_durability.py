"""Acknowledged writes survive a kill -9 of the hub process (REQUIREMENTS: nothing lost)."""

from __future__ import annotations

import asyncio
import os
import signal

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


async def test_acknowledged_writes_survive_sigkill(settings: Settings) -> None:
    env = {"SHAREDCARE_DATABASE_URL": settings.database, "SHAREDCARE_DATA_DIR": str(settings.data_dir)}
    acknowledged: list[str] = []
    with RunningHub(env) as hub:
        stop = asyncio.Event()
        async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http:
            writers = [asyncio.create_task(_writer(http, acknowledged, stop, n)) for n in range(8)]
            while len(acknowledged) < 150:
                await asyncio.sleep(0.01)
            os.kill(hub.proc.pid, signal.SIGKILL)  # no shutdown, no flush: kill -9
            hub.proc.wait()
            stop.set()
            await asyncio.gather(*writers)
    assert len(acknowledged) >= 150
    with RunningHub(env) as hub:
        async with httpx.AsyncClient(base_url=hub.url, timeout=10) as http:
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
            await conn.execute(select(func.count()).where(idx_token.c.param == "identifier"))
        ).scalar_one()
    await db.close()
    # every resource has its version, its change-log row and its index rows: no partial write
    assert counts == [found, found, found]
    assert nhs_rows == found
