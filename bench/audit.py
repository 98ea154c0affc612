"""Benchmark of audit writing: latency ``record()`` adds to a request, open loop (not a test).

Issue 5.7's target: at most 2 ms p99 added to a request at 1,000 requests/s. Calls to
``AuditWriter.record()`` are started at a constant rate by the event loop's timer
(``loop.call_at`` at t0 + i/rate: open loop, so a slow database cannot slow the offered
load down and hide its own latency), in the same process and event loop as the writer,
exactly as in a hub worker. Each call's latency is from its start until its event is
committed. Variants, on a fresh database of each backend:

  baseline    the same schedule calling a no-op coroutine: the harness's own cost and the
              event loop's lateness, i.e. what any request sees without audit
  grouped     AuditWriter with group commit (the shipped configuration: one flush in flight)
  paired      the same with two flushes in flight (concurrency=2), on PostgreSQL
  unbatched   AuditWriter(max_batch=1): one transaction per record, for comparison

Prints a table and writes JSON to bench/results/audit-<ts>.json. ``--profile`` records the
grouped phase with py-spy and summarises where the time goes.

    python bench/audit.py                       # both backends, 1,000/s for 10 s each
    python bench/audit.py --backend postgresql --rate 2000 --seconds 20 --profile
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

if __package__:
    from . import common
    from .common import CpuMeter, PostgresDatabase, PySpy, log
else:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
    from common import CpuMeter, PostgresDatabase, PySpy, log

from sharedcare.app import settle_heap
from sharedcare.audit import AuditRecord, AuditWriter
from sharedcare.store import migrate
from sharedcare.store.db import Database

TARGET_P99_MS = 2.0
VARIANTS = ("baseline", "grouped", "paired", "unbatched")


def make_record(i: int) -> AuditRecord:
    """A typical released search: 40 resources from two providers about one of 10,000 people."""
    return AuditRecord(
        action="search-type",
        request_id=f"bench-{i}",
        client_id=f"portal-{i % 20}",
        query=f"GET /fhir/Observation?patient=Patient/p{i % 10_000}&_count=50",
        user_id=f"u-{i % 5000}",
        user_name=f"Clinician {i % 5000}",
        user_role="R8000",
        purpose_of_use="TREAT",
        organization=f"RX{i % 300}",
        patient=f"Patient/p{i % 10_000}",
        nhs_number=f"{9000000000 + i % 10_000}",
        providers=("gp-1", "acute-2"),
        released=40,
        withheld=i % 3,
        client_address="10.0.0.1",
    )


async def open_loop(
    call: Callable[[int], Awaitable[Any]], rate: float, seconds: float, warmup: float
) -> dict[str, Any]:
    """Start ``call(i)`` at t0 + i/rate; latencies (ms) of calls started after ``warmup``."""
    loop = asyncio.get_running_loop()
    total = int(rate * (seconds + warmup))
    skip = int(rate * warmup)
    durations: list[float] = []  # call start → call end: the latency the call adds
    lateness: list[float] = []  # scheduled start → call start: the event loop's lag
    errors = 0
    error_kinds: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()

    async def one(i: int, scheduled: float) -> None:
        nonlocal errors
        late = loop.time() - scheduled  # uvloop's clock has millisecond resolution
        started = time.perf_counter()
        try:
            await call(i)
        except Exception as exc:  # noqa: BLE001 - counted and reported
            errors += 1
            kind = str(exc)[:120]
            error_kinds[kind] = error_kinds.get(kind, 0) + 1
            return
        if i >= skip:
            durations.append((time.perf_counter() - started) * 1000)
            lateness.append(late * 1000)

    def spawn(i: int, scheduled: float) -> None:
        task = loop.create_task(one(i, scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    t0 = loop.time() + 0.05
    for i in range(total):
        loop.call_at(t0 + i / rate, spawn, i, t0 + i / rate)
    await asyncio.sleep(t0 + total / rate - loop.time() + 0.01)
    while tasks:
        await asyncio.gather(*list(tasks))
    measured = total - skip
    return {
        "offered": measured,
        "completed": len(durations),
        "errors": errors,
        "error_kinds": error_kinds,
        "latency_ms": common.latency_summary(durations),
        "lateness_ms": common.latency_summary(lateness),
    }


async def run_backend(
    backend: str, url: str, args: argparse.Namespace, out_dir: Path, pg_name: str | None = None
) -> list[dict[str, Any]]:
    db = Database(url, sqlite_synchronous=args.sqlite_synchronous)
    await migrate.upgrade(db)
    prio = None
    if args.nice:
        # On a shared machine: this process (its own session, see main) and our database's
        # PostgreSQL backends at a higher priority, as bench/store.py does for the hub.
        own = lambda: [os.getpid()] + (common.pids_with_cmdline(pg_name) if pg_name else [])
        prio = common.Prioritizer(args.nice, own, lambda: [os.getpid()]).start()
    results: list[dict[str, Any]] = []
    offset = 0
    try:
        for rate, variant in [(r, v) for r in args.rates for v in args.variants]:
            writer: AuditWriter | None = None
            if variant == "baseline":

                async def call(i: int) -> None:
                    await asyncio.sleep(0)

            else:
                if variant == "paired" and backend != "postgresql":
                    continue  # SQLite: one transaction at a time anyway
                writer = AuditWriter(
                    db,
                    max_batch=1 if variant == "unbatched" else args.max_batch,
                    concurrency=2 if variant == "paired" else None,
                )
                await writer.start()
                settle_heap()  # as the hub does once started (sharedcare.app)

                async def call(i: int, w: AuditWriter = writer, base: int = offset) -> None:
                    await w.record(make_record(base + i))

            if args.quiet_wait:
                common.wait_for_quiet(max_wait=args.quiet_wait)
            groups = {"bench": lambda: [os.getpid()]}
            if pg_name:  # the backends serving our database (their process title names it)
                groups["postgres"] = lambda: common.pids_with_cmdline(pg_name)
            meter = CpuMeter(groups)
            spy = None
            if args.profile and variant == "grouped":
                spy = PySpy(os.getpid(), out_dir / f"profile-{backend}-{variant}-{rate:.0f}.txt", subprocesses=False).start()
            meter.start()
            res = await open_loop(call, rate, args.seconds, args.warmup)
            cpu = meter.stop()
            if spy is not None:
                res["profile"] = common.summarise_profile(spy.stop())
            if writer is not None:
                await writer.stop()
                res["flushes"] = writer.flushes
                res["mean_batch"] = round(writer.written / writer.flushes, 1) if writer.flushes else None
                res["largest_batch"] = writer.largest_batch
                offset += int(rate * (args.seconds + args.warmup)) + 1
            res.update(backend=backend, variant=variant, rate=rate, cpu=cpu)
            results.append(res)
            lat = res["latency_ms"]
            log(
                f"{backend:10s} {variant:9s} {rate:6.0f}/s p50 {common.fmt(lat['p50'], 2)} ms  p99 {common.fmt(lat['p99'], 2)} ms"
                f"  max {common.fmt(lat['max'], 1)} ms  batch {res.get('mean_batch', '-')}  errors {res['errors']}"
                f"  other load {cpu.get('other_cores')} cores"
            )
    finally:
        if prio is not None:
            prio.stop()
        await db.close()
    return results


def report(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        lat, late = r["latency_ms"], r["lateness_ms"]
        target = ""
        if r["variant"] == "grouped" and lat["p99"] is not None:
            target = "met" if lat["p99"] <= TARGET_P99_MS else "MISSED"
        rows.append(
            [
                r["backend"], r["variant"], f"{r['rate']:,.0f}/s", lat["p50"], lat["p99"], lat["max"],
                late["p99"], r.get("mean_batch") or "–", r["errors"],
                r["cpu"].get("bench_cores"), r["cpu"].get("other_cores"), target,
            ]
        )
    common.print_table(
        f"Audit record() latency, open loop (target p99 ≤ {TARGET_P99_MS} ms added)",
        ["backend", "variant", "offered", "p50 ms", "p99 ms", "max ms", "loop lag p99 ms",
         "mean batch", "errors", "bench cores", "other load", "p99 target"],
        rows,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    p.add_argument("--rate", default="1000", help="records offered per second (a comma list sweeps)")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds per variant")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds run before measuring")
    p.add_argument("--max-batch", type=int, default=500)
    p.add_argument("--variants", default="baseline,grouped,unbatched", help=f"of {', '.join(VARIANTS)}")
    p.add_argument("--profile", action="store_true", help="py-spy the grouped phase")
    p.add_argument("--quiet-wait", type=float, default=0.0, help="wait up to N s for other load to settle")
    p.add_argument("--nice", type=int, default=0, help="run this process and its PostgreSQL backends at this nice value (e.g. -10, needs root) on a shared machine [0: off]")
    p.add_argument("--pg-admin-dsn", default=common.PG_ADMIN_DSN)
    p.add_argument("--sqlite-synchronous", default="NORMAL", choices=["NORMAL", "FULL"])
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    args.rates = [float(r) for r in str(args.rate).split(",") if r]
    unknown = set(args.variants) - set(VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ts = common.timestamp()
    json_path = args.json or common.RESULTS_DIR / f"audit-{ts}.json"
    out_dir = json_path.parent / json_path.stem
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    if args.nice:
        with contextlib.suppress(OSError):  # a session of our own: autogroup nice is per session
            os.setsid()
    doc: dict[str, Any] = {
        "benchmark": "audit",
        "started": ts,
        "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": common.machine_info(),
        "postgres": {
            "version": common.postgres_version(args.pg_admin_dsn),
            "settings": common.postgres_settings(args.pg_admin_dsn),
        } if "postgresql" in backends else None,
        "target_p99_ms": TARGET_P99_MS,
        "results": [],
    }
    try:
        import uvloop

        runner: Callable[[Any], Any] = lambda coro: uvloop.run(coro)
        doc["event_loop"] = "uvloop"
    except ImportError:
        runner = asyncio.run
        doc["event_loop"] = "asyncio"
    for backend in backends:
        if backend == "sqlite":
            with tempfile.TemporaryDirectory(prefix="sharedcare-audit-bench-") as tmp:
                url = f"sqlite+aiosqlite:///{tmp}/hub.db"
                doc["results"] += runner(run_backend(backend, url, args, out_dir))
        else:
            with PostgresDatabase(args.pg_admin_dsn, prefix="sharedcare_bench_audit") as pg:
                doc["results"] += runner(run_backend(backend, pg.url, args, out_dir, pg.name))
    report(doc["results"])
    common.write_json(json_path, doc)
    log(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
