"""aiohttp or httpx for the hub's outbound calls to providers? Measured, not assumed.

The hub's hot path: per query, three GETs in parallel, each answered with a ~65 KB searchset
(13 resources of ~5 KB), body read in full. For each client library, a spawned process
(own interpreter, uvloop) keeps ``--concurrency`` such fan-outs in flight for ``--duration``
seconds against fixed responses (nginx when installed, else aiohttp in another process), over
one pooled keep-alive client per provider, as the hub does. Reported: fan-outs per second,
the client process's CPU per provider request (the figure that decides: CPU is what limits a
hub node) and p50/p99 fan-out latency.

    python bench/http_clients.py [--duration 8] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS_DIR,
    latency_summary,
    log,
    machine_info,
    print_table,
    timestamp,
    write_json,
)
from sync_query import FixedServer, Nginx, searchset

PROVIDERS = ("p1", "p2", "p3")


async def _aiohttp(bases: list[str], concurrency: int, duration: float) -> tuple[int, list[float]]:
    import aiohttp

    sessions = [
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30))
        for _ in bases
    ]

    async def get(session: Any, url: str) -> None:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
            await r.read()

    try:
        return await _drive(
            lambda i: [
                get(s, f"{b}/Observation?patient=Patient/{i}")
                for s, b in zip(sessions, bases, strict=True)
            ],
            concurrency,
            duration,
        )
    finally:
        for s in sessions:
            await s.close()


async def _httpx(bases: list[str], concurrency: int, duration: float) -> tuple[int, list[float]]:
    import httpx

    clients = [
        httpx.AsyncClient(limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        for _ in bases
    ]

    async def get(client: Any, url: str) -> None:
        r = await client.get(url, timeout=5)
        r.read()

    try:
        return await _drive(
            lambda i: [
                get(c, f"{b}/Observation?patient=Patient/{i}")
                for c, b in zip(clients, bases, strict=True)
            ],
            concurrency,
            duration,
        )
    finally:
        for c in clients:
            await c.aclose()


async def _drive(fanout: Any, concurrency: int, duration: float) -> tuple[int, list[float]]:
    latencies: list[float] = []
    end = time.perf_counter() + duration
    counter = 0

    async def worker() -> None:
        nonlocal counter
        while time.perf_counter() < end:
            counter += 1
            t0 = time.perf_counter()
            await asyncio.gather(*fanout(counter))
            latencies.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), latencies


def _run(kind: str, bases: list[str], concurrency: int, duration: float, conn: Any) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    fn = _aiohttp if kind == "aiohttp" else _httpx
    asyncio.run(fn(bases, concurrency, 1.0))  # warm-up: connections, imports
    cpu0, t0 = time.process_time(), time.perf_counter()
    count, latencies = asyncio.run(fn(bases, concurrency, duration))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    conn.send(
        {"fanouts": count, "wall_s": wall, "cpu_s": cpu, "latency_ms": latency_summary(latencies)}
    )


def measure(kind: str, bases: list[str], concurrency: int, duration: float) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_run, args=(kind, bases, concurrency, duration, child))
    proc.start()
    result = parent.recv()
    proc.join(30)
    requests = result["fanouts"] * len(bases)
    return {
        "client": kind,
        "fanouts_per_s": result["fanouts"] / result["wall_s"],
        "cpu_us_per_request": result["cpu_s"] / requests * 1e6,
        "client_cores": result["cpu_s"] / result["wall_s"],
        "latency_ms": result["latency_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--rounds", type=int, default=2, help="alternate the clients this many times"
    )
    args = parser.parse_args()
    files = {p: searchset(p) for p in PROVIDERS}
    server: Any = Nginx(files) if Nginx.available() else FixedServer(files)
    log(f"fixed responses of {len(files['p1']):,} bytes from {type(server).__name__}")
    rows: list[dict[str, Any]] = []
    with server:
        bases = [server.base(p) for p in PROVIDERS]
        for _ in range(args.rounds):
            for kind in ("aiohttp", "httpx"):
                rows.append(measure(kind, bases, args.concurrency, args.duration))
                log(
                    f"{kind}: {rows[-1]['fanouts_per_s']:.0f} fan-outs/s, {rows[-1]['cpu_us_per_request']:.0f} µs CPU/request"
                )
    print_table(
        f"3-provider fan-out, {len(files['p1']) // 1000} KB per answer, {args.concurrency} in flight",
        ["client", "fan-outs/s", "CPU µs/request", "client cores", "p50 ms", "p99 ms"],
        [
            [
                r["client"],
                r["fanouts_per_s"],
                r["cpu_us_per_request"],
                r["client_cores"],
                r["latency_ms"]["p50"],
                r["latency_ms"]["p99"],
            ]
            for r in rows
        ],
    )
    path = write_json(
        RESULTS_DIR / f"http-clients-{timestamp()}.json",
        {
            "machine": machine_info(),
            "server": type(server).__name__,
            "bytes": len(files["p1"]),
            "args": vars(args),
            "rows": rows,
        },
    )
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
