"""kill -9 under load: every release a client received a 200 for has its AuditEvent."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import httpx
import orjson
from helpers import free_port
from sqlalchemy import select

from sharedcare.audit import request_id_of
from sharedcare.store import migrate
from sharedcare.store.db import Database
from sharedcare.store.schema import resources

SERVER = Path(__file__).with_name("release_server.py")
WORKERS = 16  # concurrent requests: enough for batches of several; httpx slows past ~20
ACKNOWLEDGED_BEFORE_KILL = 200


async def _wait_ready(url: str, proc: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 20
    async with httpx.AsyncClient(timeout=1) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                err = await proc.stderr.read() if proc.stderr else b""
                raise RuntimeError(f"server exited: {err.decode()[-2000:]}")
            try:
                if (await http.get(f"{url}/ready")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("release server did not start in 20 s")


async def _client(http: httpx.AsyncClient, n: int, acknowledged: list[str], stop: asyncio.Event) -> None:
    i = n
    while not stop.is_set():
        i += WORKERS
        try:
            response = await http.get(f"/release/{i}")
        except httpx.TransportError:
            return  # the server died mid-request: nothing was released to us
        if response.status_code == 200:
            acknowledged.append(response.json()["request_id"])


async def test_every_acknowledged_release_is_audited_after_sigkill(database_url: str) -> None:
    db = Database(database_url)
    await migrate.upgrade(db)
    await db.close()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SERVER), database_url, str(port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    acknowledged: list[str] = []
    try:
        await _wait_ready(url, proc)
        stop = asyncio.Event()
        limits = httpx.Limits(max_connections=WORKERS, max_keepalive_connections=WORKERS)
        async with httpx.AsyncClient(base_url=url, timeout=10, limits=limits) as http:
            clients = [asyncio.create_task(_client(http, n, acknowledged, stop)) for n in range(WORKERS)]
            deadline = time.monotonic() + 15  # a busy machine is slower; the proof holds anyway
            while len(acknowledged) < ACKNOWLEDGED_BEFORE_KILL and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            os.kill(proc.pid, signal.SIGKILL)  # mid-load: flushes in flight, requests waiting
            await proc.wait()
            stop.set()
            await asyncio.gather(*clients)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(acknowledged) >= 50, "too few releases before the kill to prove anything"

    db = Database(database_url)  # reopen after the crash (SQLite recovers its WAL here)
    try:
        async with db.read() as conn:
            bodies = (await conn.execute(select(resources.c.body).where(resources.c.type == "AuditEvent"))).scalars()
            stored = {request_id_of(orjson.loads(body)) for body in bodies}
    finally:
        await db.close()
    missing = set(acknowledged) - stored
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged releases have no AuditEvent"
