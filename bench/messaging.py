"""Reliable messaging benchmark: sustained rate and accepted→delivered latency.

A real ``sharedcare serve`` (PostgreSQL: 2 workers; SQLite: 1) pushes ~15 KB message Bundles
to real recipient simulators (``sharedcare simulate recipient`` subprocesses). Senders post
to ``$process-message`` open-loop at ``--rate`` messages/s for ``--duration`` seconds (after
``--warmup``); each message's latency is its arrival time at the recipient minus the time
its 202 came back. The run then waits for the backlog to drain.

    python bench/messaging.py --backend postgresql --rate 500 --duration 600
    python bench/messaging.py --backend sqlite --rate 200 --duration 60

Prints a table and writes bench/results/messaging-<backend>-<ts>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    PG_ADMIN_DSN,
    RESULTS_DIR,
    CpuMeter,
    Hub,
    PostgresDatabase,
    Prioritizer,
    descendants,
    latency_summary,
    machine_info,
    pids_with_cmdline,
    print_table,
    timestamp,
    write_json,
)

SCOPE = "system/MessageHeader.crs"


def make_template(target_bytes: int) -> bytes:
    """A discharge summary message of about ``target_bytes``, with placeholders to fill."""
    div = "<div>" + ("Discharge summary narrative. " * (target_bytes // 29)) + "</div>"
    bundle = {
        "resourceType": "Bundle",
        "id": "@@BUNDLE@@",
        "type": "message",
        "entry": [
            {
                "fullUrl": "urn:uuid:h",
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": "@@HEADER@@",
                    "eventCoding": {
                        "system": "https://fhir.nhs.uk/CodeSystem/message-event",
                        "code": "discharge-summary",
                    },
                    "destination": [{"endpoint": "urn:participant:@@TO@@"}],
                    "source": {"endpoint": "urn:participant:@@FROM@@"},
                },
            },
            {
                "fullUrl": "urn:uuid:p",
                "resource": {
                    "resourceType": "Patient",
                    "id": "p",
                    "identifier": [
                        {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": "9434765919"}
                    ],
                    "name": [{"family": "Smith", "given": ["Jo"]}],
                    "birthDate": "1970-01-02",
                },
            },
            {
                "fullUrl": "urn:uuid:c",
                "resource": {
                    "resourceType": "Composition",
                    "id": "c",
                    "status": "final",
                    "title": "Discharge summary",
                    "text": {"status": "generated", "div": div},
                },
            },
        ],
    }
    return json.dumps(bundle).encode()


def start_simulator(extra: list[str], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sharedcare.cli", "simulate", "recipient", "--port", "0", *extra],
        stdout=subprocess.PIPE,
        stderr=open(log, "ab"),  # noqa: SIM115 - lives as long as the process
    )
    assert proc.stdout is not None
    url = proc.stdout.readline().decode().strip()
    if not url.startswith("http"):
        raise RuntimeError(f"simulator did not start: {url!r}")
    return proc, url


def register(hub: Hub, systems: list[dict[str, Any]]) -> None:
    from sharedcare.iam.client import public_jwks
    from sharedcare.registry.model import new_system
    from sharedcare.registry.service import Registry
    from sharedcare.settings import load_settings
    from sharedcare.store.db import Database
    from sharedcare.store.repository import Store
    from sharedcare.store.service import FhirService

    settings = load_settings(database_url=hub.database_url, data_dir=hub.data_dir, port=hub.port)

    async def run() -> None:
        db = Database(settings.database)
        try:
            registry = Registry(
                FhirService(
                    Store(db), fhir_base=settings.fhir_base, default_count=50, max_count=1000
                )
            )
            for s in systems:
                await registry.add(
                    new_system(
                        client_id=s["id"],
                        kind="provider",
                        name=s["id"],
                        scopes=SCOPE,
                        fhir_base=f"https://{s['id']}.example/fhir",
                        messaging_endpoint=s["endpoint"],
                        jwks=public_jwks(s["key"]),
                    )
                )
        finally:
            await db.close()

    asyncio.run(run())


async def token(http: Any, hub: Hub, client_id: str, key: Any) -> str:
    from sharedcare.iam.client import sign_assertion, token_form

    assertion = sign_assertion(key, client_id, f"{hub.base}/oauth2/token")
    async with http.post(f"{hub.base}/oauth2/token", data=token_form(assertion, SCOPE)) as r:
        body = await r.json()
        assert r.status == 200, body
        return str(body["access_token"])


async def drive(
    hub: Hub,
    senders: list[dict[str, Any]],
    recipients: list[str],
    template: bytes,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Open-loop sending; returns accept times per bundle id and counters."""
    import aiohttp

    accepted: dict[str, float] = {}
    statuses: dict[int, int] = {}
    errors = 0
    lag_max = 0.0
    total = args.warmup + args.duration
    measure_from = time.time() + args.warmup
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=args.concurrency),
        timeout=aiohttp.ClientTimeout(total=60),
    ) as http:
        tokens = {s["id"]: await token(http, hub, s["id"], s["key"]) for s in senders}
        in_flight = asyncio.Semaphore(args.concurrency)
        pending: set[asyncio.Task[None]] = set()

        async def send(n: int) -> None:
            nonlocal errors
            sender = senders[n % len(senders)]["id"]
            to = recipients[(n // len(senders)) % len(recipients)]
            bid = str(uuid.uuid4())
            body = (
                template.replace(b"@@BUNDLE@@", bid.encode())
                .replace(b"@@HEADER@@", str(uuid.uuid4()).encode())
                .replace(b"@@TO@@", to.encode())
                .replace(b"@@FROM@@", sender.encode())
            )
            headers = {
                "Authorization": f"Bearer {tokens[sender]}",
                "Content-Type": "application/fhir+json",
            }
            try:
                async with http.post(
                    f"{hub.fhir}/$process-message", data=body, headers=headers
                ) as r:
                    await r.read()
                    statuses[r.status] = statuses.get(r.status, 0) + 1
                    if r.status == 202:
                        accepted[bid] = time.time()
            except Exception:  # noqa: BLE001 - counted
                errors += 1
            finally:
                in_flight.release()

        async def refresh() -> None:  # on its own, so a send loop that falls behind cannot stall it
            nonlocal tokens
            while True:
                await asyncio.sleep(120)
                tokens = {s["id"]: await token(http, hub, s["id"], s["key"]) for s in senders}

        refresher = asyncio.create_task(refresh())
        start = time.monotonic()
        n = 0
        while True:
            now = time.monotonic()
            if now - start >= total:
                break
            due = int((now - start) * args.rate)
            lag_max = max(lag_max, (due - n) / args.rate)
            while n < due:
                await in_flight.acquire()
                task = asyncio.create_task(send(n))
                pending.add(task)
                task.add_done_callback(pending.discard)
                n += 1
            await asyncio.sleep(0.002)
        if pending:
            await asyncio.wait(pending)
        refresher.cancel()
    return {
        "accepted": accepted,
        "statuses": statuses,
        "errors": errors,
        "sent": n,
        "measure_from": measure_from,
        "send_lag_max_s": round(lag_max, 3),
    }


def collect(urls: list[str]) -> tuple[dict[str, float], int]:
    import httpx

    arrived: dict[str, float] = {}
    duplicates = 0
    for url in urls:
        body = httpx.get(f"{url}/_admin/received?compact=1", timeout=120).json()
        duplicates += body["duplicates"]
        for bid, at in body["messages"]:
            arrived.setdefault(bid, at)
    return arrived, duplicates


def run(args: argparse.Namespace) -> dict[str, Any]:
    from sharedcare.iam.client import generate_key

    pg = PostgresDatabase(PG_ADMIN_DSN).__enter__() if args.backend == "postgresql" else None
    workers = args.workers or (2 if pg else 1)
    logs = RESULTS_DIR / "messaging-logs"
    logs.mkdir(parents=True, exist_ok=True)
    sims: list[tuple[subprocess.Popen[bytes], str]] = []
    hub = Hub(
        database_url=pg.url if pg else None,
        workers=workers,
        log_path=logs / f"hub-{args.backend}.log",
        env={
            "SHAREDCARE_RATE_LIMIT_PER_SECOND": "0",
            **dict(kv.split("=", 1) for kv in args.hub_env),
        },
    )
    try:
        sim_args = [
            "--latency-ms",
            str(args.recipient_latency_ms),
            "--jitter-ms",
            str(args.recipient_jitter_ms),
        ]
        recipient_sims = [
            start_simulator(sim_args, logs / "sim.log") for _ in range(args.simulators)
        ]
        sims += recipient_sims
        hub.start()
        recipients = [f"ward-{i}" for i in range(args.recipients)]
        senders = [{"id": f"gp-{i}", "key": generate_key("ES384")} for i in range(args.senders)]
        systems: list[dict[str, Any]] = []
        for i, r in enumerate(recipients):
            url = recipient_sims[i % len(recipient_sims)][1]
            systems.append(
                {"id": r, "key": generate_key("ES384"), "endpoint": f"{url}/messages?to={r}"}
            )
        for s in senders:
            systems.append({"id": s["id"], "key": s["key"], "endpoint": None})
        register(hub, systems)
        template = make_template(args.message_bytes)
        groups = {
            "hub": lambda: (
                [p for p in [hub.proc.pid] + descendants(hub.proc.pid)] if hub.proc else []
            ),
            "recipients": lambda: [p for proc, _ in sims for p in [proc.pid]],
            "bench": lambda: [os.getpid()],
        }
        if pg:
            groups["pg"] = lambda: pids_with_cmdline(pg.name)
        prio = None
        if args.nice:
            # This machine is shared: raise the priority of the hub, the simulators, this
            # process and the bench database's PostgreSQL backends (see bench/README.md).
            own = lambda: [p for g in groups.values() for p in g()]
            sessions = lambda: [hub.proc.pid] if hub.proc else []
            prio = Prioritizer(args.nice, own, sessions).start()
        meter = CpuMeter(groups)
        meter.start()
        started = time.time()
        result = asyncio.run(drive(hub, senders, recipients, template, args))
        sent_s = time.time() - started
        cpu = meter.stop()
        if prio is not None:
            prio.stop()
        # Drain: wait until every accepted message has arrived (or give up).
        deadline = time.time() + args.drain
        accepted = result["accepted"]
        while True:
            arrived, duplicates = collect([u for _, u in recipient_sims])
            missing = [b for b in accepted if b not in arrived]
            if not missing or time.time() > deadline:
                break
            time.sleep(2)
        measured = {b: t for b, t in accepted.items() if t >= result["measure_from"]}
        lat = sorted(max(0.0, arrived[b] - t) * 1000 for b, t in measured.items() if b in arrived)
        summary = latency_summary(lat)
        window = [arrived[b] for b in measured if b in arrived]
        delivered_in_window = sum(
            1
            for b, t in measured.items()
            if b in arrived and arrived[b] <= started + args.warmup + args.duration
        )
        out = {
            "backend": args.backend,
            "workers": workers,
            "rate_target": args.rate,
            "duration_s": args.duration,
            "message_bytes": len(template) + 100,
            "senders": args.senders,
            "recipients": args.recipients,
            "sent": result["sent"],
            "statuses": result["statuses"],
            "errors": result["errors"],
            "send_lag_max_s": result["send_lag_max_s"],
            "accepted_measured": len(measured),
            # Over the time the measured accepts actually took (the sender may fall behind).
            "accepted_rate": round(
                len(measured) / max(1e-9, max(measured.values()) - min(measured.values())), 1
            )
            if len(measured) > 1
            else 0.0,
            "delivered_rate_in_window": round(delivered_in_window / args.duration, 1),
            "delivered_rate": round(len(window) / max(1e-9, max(window) - min(window)), 1)
            if len(window) > 1
            else 0.0,
            "delivered_measured": len(lat),
            "missing_after_drain": len(missing),
            "duplicates_at_recipients": duplicates,
            "latency_ms": summary,
            "last_arrival_after_end_s": round(
                max(window) - (started + args.warmup + args.duration), 2
            )
            if window
            else None,
            "cpu": cpu,
            "wall_s": round(sent_s, 1),
            "machine": machine_info(),
        }
        return out
    finally:
        hub.stop()
        for proc, _ in sims:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
        if pg:
            pg.drop()


def main() -> None:
    import signal

    # `timeout` and Ctrl-C: stop the hub and simulators (the finally blocks), never orphan them.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument(
        "--rate", type=float, default=None, help="messages/s offered (default 500 PG, 200 SQLite)"
    )
    parser.add_argument(
        "--duration", type=float, default=60.0, help="measured seconds (the target run: 600)"
    )
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument(
        "--drain", type=float, default=60.0, help="seconds to wait for the backlog after sending"
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="hub processes (default 2 PG, 1 SQLite)"
    )
    parser.add_argument("--senders", type=int, default=20)
    parser.add_argument("--recipients", type=int, default=5)
    parser.add_argument("--simulators", type=int, default=1, help="recipient simulator processes")
    parser.add_argument("--message-bytes", type=int, default=15_000)
    parser.add_argument(
        "--concurrency", type=int, default=256, help="most $process-message calls in flight"
    )
    parser.add_argument("--recipient-latency-ms", type=float, default=2.0)
    parser.add_argument("--recipient-jitter-ms", type=float, default=3.0)
    parser.add_argument(
        "--nice", type=int, default=0, help="run our processes at this nice value (root: -10)"
    )
    parser.add_argument("--hub-env", action="append", default=[], help="KEY=VALUE for the hub")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = []
    for backend in backends:
        a = argparse.Namespace(**{**vars(args), "backend": backend})
        if a.rate is None:
            a.rate = 500.0 if backend == "postgresql" else 200.0
        results.append(run(a))
    rows = []
    for r in results:
        lat = r["latency_ms"]
        cpu = r["cpu"]
        rows.append(
            [
                f"{r['backend']}, {r['workers']}",
                r["rate_target"],
                r["duration_s"],
                r["accepted_rate"],
                r["delivered_rate_in_window"],
                lat.get("p50"),
                lat.get("p99"),
                lat.get("max"),
                r["missing_after_drain"],
                r["statuses"],
                cpu.get("hub_cores"),
                cpu.get("pg_cores"),
                cpu.get("recipients_cores"),
                cpu.get("bench_cores"),
                cpu.get("other_cores"),
            ]
        )
    print_table(
        "Messaging: accepted → delivered",
        [
            "backend, workers",
            "offered/s",
            "seconds",
            "accepted/s",
            "delivered/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "missing",
            "statuses",
            "hub cores",
            "pg cores",
            "sim cores",
            "bench cores",
            "other cores",
        ],
        rows,
    )
    path = args.json or RESULTS_DIR / f"messaging-{args.backend}-{timestamp()}.json"
    write_json(path, results)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
