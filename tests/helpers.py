"""Helpers shared by test modules: resource builders and constants."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Self

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def nhs_number(seed: int) -> str:
    """A valid NHS number (Modulus 11) derived from ``seed``."""
    n = seed
    while True:
        digits = [int(d) for d in f"{n % 10**9:09d}"]
        total = sum(d * w for d, w in zip(digits, range(10, 1, -1), strict=True))
        check = 11 - total % 11
        check = 0 if check == 11 else check
        if check != 10:
            return "".join(map(str, digits)) + str(check)
        n += 1


def patient(family: str = "Smith", given: str = "Jo", nhs: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs or nhs_number(1)}],
        "name": [{"family": family, "given": [given]}],
        "gender": "female",
        "birthDate": "1970-01-02",
        "address": [{"line": ["1 High St"], "city": "Leeds", "postalCode": "LS1 1AA"}],
    }
    body.update(extra)
    return body


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RunningHub:
    """A real ``sharedcare serve`` process on a free port (a real socket, real uvicorn)."""

    def __init__(self, env: dict[str, str], workers: int = 1):
        import os
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "SHAREDCARE_LOG_LEVEL": "warning",
            **env,
            "SHAREDCARE_PORT": str(self.port),
            "SHAREDCARE_WORKERS": str(workers),
        }
        self.argv = [sys.executable, "-m", "sharedcare.cli", "serve"]
        self.proc: Any = None

    def __enter__(self) -> Self:
        import time

        import httpx

        self.proc = subprocess.Popen(self.argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # Imports and migrations; on a 2-core machine shared with other work this has taken
        # more than 30 s (see SlowStartHub in tests/simulators/test_loadtest.py).
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hub exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("hub did not become ready in 120 s")

    def __exit__(self, *exc: object) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()


@asynccontextmanager
async def loop_ticks(every: float = 0.01) -> AsyncIterator[list[int]]:
    """Counts the event loop's turns of ``every`` seconds while open (in ``[0]``): a loop
    held up by blocking work counts few."""
    ticks = [0]

    async def tick() -> None:
        while True:
            await asyncio.sleep(every)
            ticks[0] += 1

    task = asyncio.create_task(tick())
    try:
        yield ticks
    finally:
        task.cancel()
