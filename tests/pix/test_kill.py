"""A bulk load killed with SIGKILL keeps every chunk it committed whole, and a rerun completes it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import func, select

from sharedcare.pix.schema import pix_links, pix_people
from sharedcare.simulators.pds import generated_patients

from .conftest import Caller

CHUNK = 50
PEOPLE = 1500


async def _links(app: Any) -> tuple[int, int]:
    # One statement, one snapshot: chunks commit side by side (pix.bulk.MAX_INFLIGHT).
    links = select(func.count()).select_from(pix_links).scalar_subquery()
    people = select(func.count()).select_from(pix_people).scalar_subquery()
    async with app.state.db.read() as conn:
        row = (await conn.execute(select(links, people))).one()
    return int(row[0]), int(row[1])


async def _settled(app: Any) -> tuple[int, int]:
    """The counts once the killed loader's server sessions have finished (a COMMIT already
    sent when the client died still completes)."""
    last = await _links(app)
    while True:
        await asyncio.sleep(0.5)
        now = await _links(app)
        if now == last:
            return now
        last = now


async def test_a_killed_load_keeps_whole_chunks_and_resumes(
    app: Any, settings: Any, make_system: Any, tmp_path: Path
) -> None:
    gp: Caller = await make_system("kill-gp")
    people = list(generated_patients(PEOPLE, 77).values())
    path = tmp_path / "load.ndjson"
    path.write_bytes(
        b"\n".join(orjson.dumps(gp.registration(p, f"K{i}")) for i, p in enumerate(people)) + b"\n"
    )
    env = {
        **os.environ,
        "SHAREDCARE_DATABASE_URL": settings.database,
        "SHAREDCARE_DATA_DIR": str(tmp_path / "cli"),
        "SHAREDCARE_LOG_LEVEL": "warning",
    }
    argv = [
        sys.executable,
        "-m",
        "sharedcare.cli",
        "pix",
        "load",
        str(path),
        "--provider",
        "kill-gp",
        "--chunk",
        str(CHUNK),
    ]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # noqa: ASYNC220
    try:
        deadline = time.monotonic() + 60
        while (
            (await _links(app))[0] < 2 * CHUNK
            and time.monotonic() < deadline
            and proc.poll() is None
        ):
            await asyncio.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    links, persons = await _settled(app)
    # Only whole chunks, each with its people.
    assert 0 < links and links % CHUNK == 0 and persons == links, (links, persons)
    # Running the same load again finishes it; what was committed is unchanged, nothing doubled.
    rerun = await asyncio.to_thread(
        subprocess.run, argv, env=env, capture_output=True, text=True, timeout=300
    )
    assert rerun.returncode == 0, rerun.stderr
    summary = " ".join(rerun.stderr.split())
    assert f"{PEOPLE - links} created" in summary and f"{links} unchanged" in summary, summary
    assert await _links(app) == (PEOPLE, PEOPLE)
