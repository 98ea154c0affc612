"""The synchronous federated query under load: throughput, end-to-end and internal round trip.

Set-up: a hub (``sharedcare serve``, ``--workers`` processes, PostgreSQL or SQLite), three
providers answering every Observation search with a fixed searchset of 13 resources of ~5 KB
(nginx when installed, so the figures are the hub's own; else aiohttp in another process), a
PDS simulator so the providers' people verify, the providers' people registered through the
PIXm feed. A merged answer is ~39 resources / ~200 KB. Each query is audited durably and
consent-filtered, as in production.

Phases:

1. **saturation**: closed loop, ``--concurrency`` queries in flight (bench/common.py's load
   process): the throughput the node sustains;
2. **25 / 50 / 75 %** of that rate, open loop: end-to-end p50/p99 from the client, and the
   hub's internal round trip p50/p99 (its own time excluding providers, from its
   ``sharedcare_query_internal_round_trip_seconds`` histogram). wrk on a fixed timetable
   when installed (``bench/common.py``'s paced Wrk), else ``sharedcare.simulators.loadtest``;
   each level reports the CPU every party used;
3. **one provider 2 s slow** at 50 %: that provider moved to a server answering after
   ``--slow-s``; end-to-end p99 must stay within the wait (1500 ms) + 50 ms.

    python bench/sync_query.py [--backend postgresql|sqlite] [--workers 2] [--duration 10] [--profile]
        [--python-client] [--assume-saturation R] [--phases saturation,levels,slow]

Every phase is driven by wrk when it is installed (``apt-get install wrk``): a C client
leaves the 2 cores to the hub (at 50 % the Python load client used 0.26-0.33 cores, paced
wrk 0.11-0.14); ``--python-client`` uses the Python load processes instead.
``--assume-saturation R`` skips that phase and runs the levels at fractions of R.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing as mp
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Self

import httpx
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS_DIR,
    CpuMeter,
    Hub,
    LoadGenerator,
    Phase,
    PostgresDatabase,
    PySpy,
    Req,
    TokenSource,
    Wrk,
    descendants,
    free_port,
    log,
    machine_info,
    pids_named,
    pids_with_cmdline,
    print_table,
    summarise_profile,
    timestamp,
    wait_for_quiet,
    write_json,
)


# -- providers answering fixed responses (nginx when installed, else aiohttp) -------------
def searchset(provider: str, resources: int = 13, resource_bytes: int = 5000) -> bytes:
    """A provider's Observation searchset for one person, as the simulator generates it."""
    from sharedcare.simulators.provider import ProviderConfig, create_provider_app, provider_people

    config = ProviderConfig(
        id=provider,
        people=5,
        share=1.0,
        resources_per_search=resources,
        resource_bytes=resource_bytes,
    )
    person = provider_people(config)[0]

    async def fetch() -> bytes:
        transport = httpx.ASGITransport(app=create_provider_app(config))
        async with httpx.AsyncClient(transport=transport, base_url="http://fixed") as client:
            r = await client.get("/Observation", params={"patient": f"Patient/{person.local_id}"})
            r.raise_for_status()
            return r.content

    return asyncio.run(fetch())


NGINX_CONF = """
worker_processes {workers};
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        root {root}/files;
        location / {{
            default_type application/fhir+json;
            rewrite ^/([^/]+)/ /$1.json break;
        }}
    }}
}}
"""


class Nginx:
    """nginx serving ``files`` (provider id → bytes) at ``http://127.0.0.1:{port}/{provider}``."""

    def __init__(self, files: dict[str, bytes], workers: int = 1):
        self.root = Path(tempfile.mkdtemp(prefix="sharedcare-nginx-"))
        self.root.chmod(0o755)  # nginx workers run as an unprivileged user
        self.port = free_port()
        (self.root / "files").mkdir()
        for name, body in files.items():
            (self.root / "files" / f"{name}.json").write_bytes(body)
        conf = self.root / "nginx.conf"
        conf.write_text(NGINX_CONF.format(workers=workers, root=self.root, port=self.port))
        self.conf = conf
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("nginx") is not None or Path("/usr/sbin/nginx").exists()

    def base(self, provider: str) -> str:
        return f"http://127.0.0.1:{self.port}/{provider}"

    def __enter__(self) -> Self:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf), "-p", str(self.root), "-g", "daemon off;"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        _wait_up(f"http://127.0.0.1:{self.port}/x/ping", self.proc)
        return self

    def pids(self) -> list[int]:
        return descendants(self.proc.pid) if self.proc else []

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _wait_up(url: str, proc: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if hasattr(proc, "poll") and proc.poll() is not None:
            raise RuntimeError("fixed-response server exited at start")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


def _serve_fixed(port: int, files: dict[str, bytes], delay_s: float) -> None:
    from aiohttp import web

    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def handle(request: web.Request) -> web.Response:
        provider = request.path.strip("/").split("/", 1)[0]
        if delay_s and request.path != "/_ping":
            await asyncio.sleep(delay_s)
        body = files.get(provider)
        if body is None:
            return web.Response(status=404, text="{}", content_type="application/fhir+json")
        return web.Response(body=body, content_type="application/fhir+json")

    app = web.Application()
    app.router.add_route("GET", "/{tail:.*}", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handle_signals=True)


class FixedServer:
    """The same fixed files from aiohttp in a spawned process, after ``delay_s``."""

    def __init__(self, files: dict[str, bytes], delay_s: float = 0.0):
        self.port = free_port()
        ctx = mp.get_context("spawn")
        self.proc = ctx.Process(target=_serve_fixed, args=(self.port, files, delay_s), daemon=True)

    def base(self, provider: str) -> str:
        return f"http://127.0.0.1:{self.port}/{provider}"

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc.pid else []

    def __enter__(self) -> Self:
        self.proc.start()
        _wait_up(f"http://127.0.0.1:{self.port}/_ping", self.proc.__class__, timeout=90)
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        self.proc.join(10)


PROVIDERS = ("leeds-pas", "gp-b86001", "community-rxf")
CONSUMER = "bench-consumer"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
END_USER = {
    "requesting_user": {"id": "C123456", "name": "Bench Clinician", "role": "R8000"},
    "requesting_organization": "RR8",
    "reason_for_access": "TREAT",
}


class LoadToken(TokenSource):
    """A picklable token provider for ``loadtest.run_load`` in the load process."""

    async def __call__(self) -> str:
        return self.header().removeprefix("Bearer ")


def _settings(hub: Hub) -> Any:
    from sharedcare.settings import load_settings

    return load_settings(database_url=hub.database_url, data_dir=hub.data_dir, port=hub.port)


def register(hub: Hub, bases: dict[str, str], people: int) -> tuple[LoadToken, list[str]]:
    """Providers and the consumer in the registry, then the people through the PIXm feed."""
    from sharedcare.iam.client import generate_key, public_jwks
    from sharedcare.pix.index import PatientIndex
    from sharedcare.registry.model import new_system
    from sharedcare.registry.service import Registry
    from sharedcare.simulators.provider import ProviderConfig, provider_people, register_people
    from sharedcare.simulators.registration import SmartToken
    from sharedcare.store.db import Database
    from sharedcare.store.repository import Store
    from sharedcare.store.service import FhirService

    settings = _settings(hub)
    keys = {p: generate_key("ES384", kid=f"{p}-es384") for p in (*PROVIDERS, CONSUMER)}
    configs = {p: ProviderConfig(id=p, people=people, share=1.0) for p in PROVIDERS}

    async def run() -> None:
        db = Database(settings.database)
        try:
            registry = Registry(
                FhirService(
                    Store(db), fhir_base=settings.fhir_base, default_count=50, max_count=1000
                )
            )
            for p in PROVIDERS:
                await registry.add(
                    new_system(
                        client_id=p, kind="provider", name=p, scopes="system/Patient.u system/*.rs",
                        fhir_base=bases[p], identifier_systems=(configs[p].identifier_system,),
                        jwks=public_jwks(keys[p]),
                    )
                )  # fmt: skip
            await registry.add(
                new_system(client_id=CONSUMER, kind="consumer", name="bench consumer", organization="RR8",
                           scopes="system/*.rs", jwks=public_jwks(keys[CONSUMER]))
            )  # fmt: skip
            await asyncio.gather(
                *(
                    register_people(
                        configs[p], hub.base, SmartToken(hub.base, p, keys[p]), concurrency=16
                    )
                    for p in PROVIDERS
                )
            )
            expected = sum(len(provider_people(c)) for c in configs.values())
            index = PatientIndex(db, Store(db))
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                _people, links = await index.counts()
                if links.get("verified", 0) >= expected:
                    return
                await asyncio.sleep(0.5)
            raise RuntimeError(f"only {links} of {expected} links verified")
        finally:
            await db.close()

    asyncio.run(run())
    nhs = [p.nhs_number for p in provider_people(configs[PROVIDERS[0]])]
    token = LoadToken(
        keys[CONSUMER].as_dict(private=True),
        CONSUMER,
        f"{hub.base}/oauth2/token",
        scope="system/*.rs",
        end_user=END_USER,
    )
    token.header()
    return token, nhs


def move_provider(hub: Hub, provider: str, base: str) -> None:
    """Point a provider's registered FHIR endpoint elsewhere (as an operator would)."""
    from sharedcare.store.db import Database
    from sharedcare.store.repository import Store
    from sharedcare.store.service import FhirService

    settings = _settings(hub)

    async def run() -> None:
        db = Database(settings.database)
        try:
            fhir = FhirService(
                Store(db), fhir_base=settings.fhir_base, default_count=50, max_count=1000
            )
            current = orjson.loads((await fhir.read("Endpoint", f"{provider}.fhir")).body or b"{}")
            current["address"] = base
            current.pop("meta", None)
            await fhir.update("Endpoint", f"{provider}.fhir", current)
        finally:
            await db.close()

    asyncio.run(run())
    time.sleep(3.0)  # SHAREDCARE_REGISTRY_CACHE_SECONDS (2 s) in every hub process


_BUCKET = re.compile(
    r'^sharedcare_query_internal_round_trip_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)$',
    re.MULTILINE,
)


def internal_buckets(hub: Hub) -> list[tuple[float, float]]:
    """The hub's internal round trip histogram, once every worker has written its values.

    Workers add their metrics up in-process and write them once a second
    (sharedcare.metrics.buffer): wait that out, so a phase's last second is counted.
    """
    time.sleep(1.5)
    text = httpx.get(f"{hub.base}/metrics", timeout=10).text
    return [
        (float("inf") if le == "+Inf" else float(le), float(n)) for le, n in _BUCKET.findall(text)
    ]


def provider_outcomes(hub: Hub, provider: str) -> dict[str, float]:
    """The hub's request counts to ``provider`` by outcome (call after internal_buckets)."""
    text = httpx.get(f"{hub.base}/metrics", timeout=10).text
    pattern = re.compile(
        r"^sharedcare_query_provider_requests_total\{([^}]*)\} ([0-9.e+]+)$", re.MULTILINE
    )
    out: dict[str, float] = {}
    for labels, n in pattern.findall(text):
        found = dict(re.findall(r'(\w+)="([^"]*)"', labels))
        if found.get("provider") == provider:
            out[found["outcome"]] = out.get(found["outcome"], 0.0) + float(n)
    return out


def quantile(
    before: list[tuple[float, float]], after: list[tuple[float, float]], q: float
) -> float | None:
    """histogram_quantile over the difference of two scrapes (ms, linear within a bucket)."""
    old = dict(before)
    counts = [(le, n - old.get(le, 0.0)) for le, n in after]
    total = counts[-1][1] if counts else 0
    if not total:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for le, cumulative in counts:
        if cumulative >= rank:
            if le == float("inf"):
                return lower * 1000
            width = cumulative - below
            return (lower + (le - lower) * ((rank - below) / width if width else 1.0)) * 1000
        lower, below = le, cumulative
    return None


def share_within(
    before: list[tuple[float, float]], after: list[tuple[float, float]], edge: float
) -> float | None:
    """The share (%) of queries between two scrapes whose internal round trip was <= ``edge`` s.

    Exact, not interpolated, when ``edge`` is one of the histogram's bucket edges (10 ms is):
    a p99 target holds exactly when this share is at least 99 %.
    """
    old = dict(before)
    counts = {le: n - old.get(le, 0.0) for le, n in after}
    total = counts.get(float("inf"), 0.0)
    if not total or edge not in counts:
        return None
    return 100 * counts[edge] / total


def _open_loop(
    base: str,
    paths: tuple[str, ...],
    rate: float,
    duration: float,
    token: LoadToken,
    connections: int,
    conn: Any,
) -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    from sharedcare.simulators.loadtest import LoadPlan, run_load

    plan = LoadPlan(
        base,
        paths=paths,
        rate=rate,
        duration=duration,
        connections=connections,
        timeout=10.0,
        client="aiohttp",
    )
    result = run_load(plan, token=token)
    conn.send(result.to_dict())


def open_loop(
    hub: Hub,
    paths: tuple[str, ...],
    rate: float,
    duration: float,
    token: LoadToken,
    longest_s: float = 0.5,
) -> dict[str, Any]:
    """Open-loop load at ``rate``; ``longest_s`` is the longest a query should take.

    The client opens enough connections for every query that should be in flight at once
    (rate x longest, with room to spare), so that a wait in the load client's own queue
    is never counted against the hub.
    """
    connections = max(256, math.ceil(rate * longest_s * 1.5))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(
        target=_open_loop,
        args=(hub.base, paths, rate, duration, token, connections, child),
        daemon=True,
    )
    proc.start()
    result: dict[str, Any] = parent.recv()
    proc.join(30)
    return result


def paced_wrk(
    hub: Hub,
    paths: tuple[str, ...],
    rate: float,
    duration: float,
    token: LoadToken,
    longest_s: float = 0.5,
) -> dict[str, Any]:
    """:func:`open_loop` driven by wrk on a fixed timetable: the same figures, with the
    client's CPU (a C client's, a fifth of the Python one's at 50 %) not taken from the
    hub on a 2-core machine. The keys are the Python load client's."""
    connections = max(64, math.ceil(rate * longest_s * 1.5))
    wrk = Wrk(hub.base, paths, token.header(), rate=rate)
    try:
        got = wrk.run(connections, duration)
    finally:
        wrk.close()
    errors = {**got["errors"], "4xx": got.get("4xx", 0), "5xx": got.get("5xx", 0)}
    return {
        "achieved_rate": got["rate_per_s"],
        # wrk's requests are the answers it read; socket errors and timeouts are not among them.
        "ok": got["requests"] - errors["4xx"] - errors["5xx"],
        "errors": errors,
        "partial": got.get("partial", 0),
        "latency_ms": got["latency_ms"],
        "client": "wrk (paced)",
    }


def print_report(report: dict[str, Any], args: Any) -> None:
    sat = report["saturation"]
    saturation = sat["rate"]
    levels = report.get("levels", [])
    slow = report.get("slow")
    rows: list[list[Any]] = [
        [
            f"saturation (closed loop, {sat.get('client', 'python')})",
            saturation,
            sat["latency_ms"]["p50"],
            sat["latency_ms"]["p99"],
            None,
            None,
            None,
            sat["failed"],
        ]
    ]
    for level in levels:
        rows.append([
            f"{level['fraction']:.0%} open loop", level["achieved"], level["e2e_ms"]["p50"], level["e2e_ms"]["p99"],
            level["internal_p50_ms"], level["internal_p99_ms"], level.get("internal_within_10ms_pct"),
            sum(level["errors"].values()),
        ])  # fmt: skip
    if slow:
        rows.append([
            f"50%, one provider {args.slow_s:g} s slow", slow["rate"], slow["e2e_ms"]["p50"], slow["e2e_ms"]["p99"],
            slow["internal_p50_ms"], slow["internal_p99_ms"], slow.get("internal_within_10ms_pct"),
            sum(slow["errors"].values()),
        ])  # fmt: skip
    print_table(
        f"Federated query: 3 providers, {report['merged']['resources']} resources / "
        f"{report['merged']['bytes'] // 1000} KB merged, {args.workers} workers, {args.backend}, "
        f"providers by {report['server']}",
        [
            "phase",
            "queries/s",
            "e2e p50 ms",
            "e2e p99 ms",
            "internal p50 ms",
            "internal p99 ms",
            "internal <= 10 ms %",
            "errors",
        ],
        rows,
    )
    targets: dict[str, bool] = {}
    if sat.get("client") != "assumed":  # --assume-saturation measured nothing
        targets["throughput >= 600/s"] = saturation >= 600
    if len(levels) > 1:
        # Exact from the 10 ms bucket edge when the hub has it; else the interpolated p99.
        share = levels[1].get("internal_within_10ms_pct")
        targets["internal p99 <= 10 ms at 50%"] = (
            share >= 99 if share is not None else (levels[1]["internal_p99_ms"] or 1e9) <= 10
        )
    if slow:
        limit = args.wait_ms + 50
        targets[f"slow provider: e2e p99 <= {limit} ms"] = (slow["e2e_ms"]["p99"] or 1e9) <= limit
        print(
            f"  slow provider's requests: {slow.get('slow_provider_outcomes')}; "
            f"{slow.get('waited_share', 0):.1%} of queries waited for it"
            + (
                " (under 1 %: the p99 does not test the deadline)"
                if slow.get("waited_share", 0) < 0.01
                else ""
            )
        )
    report["targets"] = targets
    for name, ok in targets.items():
        print(f"  {'met' if ok else 'MISSED'}: {name}")
    print(f"  CPU during saturation: {sat['cpu']}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--people", type=int, default=200)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--slow-s", type=float, default=2.0)
    parser.add_argument("--wait-ms", type=int, default=1500)
    parser.add_argument("--profile", action="store_true", help="py-spy the hub during saturation")
    parser.add_argument(
        "--no-nginx", action="store_true", help="serve fixed responses with aiohttp"
    )
    parser.add_argument(
        "--python-client",
        action="store_true",
        help="drive every phase with the Python load processes even when wrk is installed",
    )
    parser.add_argument(
        "--assume-saturation",
        type=float,
        default=None,
        help="skip the saturation phase and take this rate as saturation (for the levels)",
    )
    parser.add_argument("--phases", default="saturation,levels,slow", help="comma-separated subset")
    args = parser.parse_args()
    phases = set(args.phases.split(","))

    from sharedcare.simulators.pds import SimulatorServer, create_pds_app

    files = {p: searchset(p) for p in PROVIDERS}
    fixed: Any = FixedServer(files) if args.no_nginx or not Nginx.available() else Nginx(files)
    log(f"providers: {type(fixed).__name__}, {len(files[PROVIDERS[0]]):,} bytes per answer")
    report: dict[str, Any] = {
        "machine": machine_info(),
        "args": vars(args),
        "server": type(fixed).__name__,
    }
    db = PostgresDatabase() if args.backend == "postgresql" else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(fixed)
        pds = stack.enter_context(SimulatorServer(create_pds_app(args.people, 2026)))
        if db is not None:
            stack.enter_context(db)
        hub = Hub(
            database_url=db.url if db else None,
            workers=args.workers,
            env={
                "SHAREDCARE_PDS_BASE_URL": pds.url,
                "SHAREDCARE_RATE_LIMIT_PER_SECOND": "1000000",
                "SHAREDCARE_RATE_LIMIT_BURST": "1000000",
                "SHAREDCARE_QUERY_PROVIDER_WAIT_MS": str(args.wait_ms),
                "SHAREDCARE_QUERY_PROVIDER_CONNECTIONS": "256",
            },
        )
        stack.enter_context(hub)
        stack.callback(hub.cleanup)
        log(
            f"hub on {hub.base} ({args.workers} workers, {args.backend}); registering {args.people} people x 3 providers"
        )
        token, nhs = register(hub, {p: fixed.base(p) for p in PROVIDERS}, args.people)
        paths = tuple(f"/fhir/Observation?patient.identifier={NHS}|{n}" for n in nhs)
        sample = httpx.get(
            f"{hub.base}{paths[0]}", headers={"Authorization": token.header()}, timeout=10
        )
        bundle = sample.json()
        matches = [e for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]
        report["merged"] = {
            "resources": len(matches),
            "bytes": len(sample.content),
            "status": sample.status_code,
        }
        log(f"a merged answer: {len(matches)} resources, {len(sample.content):,} bytes")
        groups = {
            "hub": hub.pids,
            "providers": fixed.pids,
            "postgres": (lambda: pids_with_cmdline(db.name)) if db else (list),
        }

        # 1. saturation, closed loop
        report["quiet"] = wait_for_quiet()
        requests = [Req("GET", p) for p in paths]
        use_wrk = Wrk.available() and not args.python_client
        if args.assume_saturation:  # levels only, at fractions of a rate measured before
            sat = {"rate_per_s": args.assume_saturation, "latency_ms": {"p50": 0.0, "p99": 0.0},
                   "failed": 0, "statuses": {}, "client": "assumed"}  # fmt: skip
            cpu: dict[str, Any] = {}
        with contextlib.ExitStack() as phase:
            if not args.assume_saturation:
                if use_wrk:
                    wrk = Wrk(hub.base, paths, token.header())
                    phase.callback(wrk.close)
                    client_pids: Any = wrk.pids
                    wrk.run(args.concurrency, 3)  # warm-up, not measured
                else:
                    load = phase.enter_context(LoadGenerator(hub.base))
                    client_pids = lambda: [load.pid] if load.pid else []
                meter = CpuMeter({**groups, "client": client_pids})
                spy = (
                    PySpy(hub.proc.pid, RESULTS_DIR / f"sync-query-{timestamp()}.pyspy").start()
                    if args.profile
                    else None
                )  # type: ignore[union-attr]
                meter.start()
                if use_wrk:
                    sat = wrk.run(args.concurrency, args.duration)
                else:
                    sat = load.run(
                        Phase(
                            "saturation",
                            requests,
                            concurrency=args.concurrency,
                            duration=args.duration,
                            warmup=3,
                            cycle=True,
                            auth=token,
                        )
                    )
                cpu = meter.stop()
                if spy is not None:
                    report["profile"] = summarise_profile(spy.stop())
                    log(
                        f"hub profile (self time by component): {report['profile'].get('components_self')}"
                    )
                    log(
                        f"hub profile (sharedcare inclusive): {report['profile'].get('sharedcare_inclusive')}"
                    )
                    log(f"hub profile (self top): {report['profile'].get('self_top')}")
        saturation = sat["rate_per_s"]
        report["saturation"] = {
            "rate": saturation,
            "latency_ms": sat["latency_ms"],
            "failed": sat["failed"],
            "statuses": sat["statuses"],
            "cpu": cpu,
            "client": sat["client"]
            if args.assume_saturation
            else ("wrk" if use_wrk else "python (aiohttp)"),
        }
        log(
            f"saturation: {saturation:.0f} queries/s (p50 {sat['latency_ms']['p50']:.1f} ms), cpu {cpu}"
        )

        # 2. 25 / 50 / 75 % of saturation, open loop
        levels = []
        for fraction in (0.25, 0.5, 0.75) if "levels" in phases else ():
            wait_for_quiet()
            rate = max(1.0, saturation * fraction)
            before = internal_buckets(hub)
            # The open-loop client: wrk, or this process's only multiprocessing child here.
            meter = CpuMeter(
                {
                    **groups,
                    "client": lambda: pids_named("wrk") + [c.pid for c in mp.active_children()],
                }
            )
            meter.start()
            got = (paced_wrk if use_wrk else open_loop)(hub, paths, rate, args.duration, token)
            level_cpu = meter.stop()
            after = internal_buckets(hub)
            level = {
                "fraction": fraction, "rate": rate, "achieved": got["achieved_rate"], "ok": got["ok"],
                "errors": got["errors"], "partial": got["partial"], "e2e_ms": got["latency_ms"],
                "internal_p50_ms": quantile(before, after, 0.5), "internal_p99_ms": quantile(before, after, 0.99),
                "internal_within_10ms_pct": share_within(before, after, 0.01), "cpu": level_cpu,
            }  # fmt: skip
            levels.append(level)
            log(
                f"{fraction:.0%}: {rate:.0f}/s e2e p99 {got['latency_ms']['p99']} ms, internal p99 {level['internal_p99_ms']}, "
                f"cores: hub {level_cpu.get('hub_cores')} client {level_cpu.get('client_cores')} "
                f"postgres {level_cpu.get('postgres_cores')} machine {level_cpu.get('machine_busy_cores')}"
            )
        report["levels"] = levels

        # 3. one provider slow
        if "slow" in phases:
            with FixedServer(
                {PROVIDERS[2]: files[PROVIDERS[2]]}, delay_s=args.slow_s
            ) as slow_server:
                move_provider(hub, PROVIDERS[2], slow_server.base(PROVIDERS[2]))
                wait_for_quiet()
                rate = max(1.0, saturation * 0.5)
                before = internal_buckets(hub)
                asked_before = provider_outcomes(hub, PROVIDERS[2])
                got = (paced_wrk if use_wrk else open_loop)(
                    hub, paths, rate, args.duration, token, longest_s=args.wait_ms / 1000
                )
                after = internal_buckets(hub)
                asked = provider_outcomes(hub, PROVIDERS[2])
                asked = {k: n - asked_before.get(k, 0.0) for k, n in asked.items()}
                move_provider(hub, PROVIDERS[2], fixed.base(PROVIDERS[2]))
            report["slow"] = {
                "rate": rate, "slow_s": args.slow_s, "ok": got["ok"], "partial": got["partial"],
                "errors": got["errors"], "e2e_ms": got["latency_ms"], "internal_p50_ms": quantile(before, after, 0.5),
                "internal_p99_ms": quantile(before, after, 0.99), "limit_ms": args.wait_ms + 50,
                "internal_within_10ms_pct": share_within(before, after, 0.01),
                # How the slow provider's requests ended: only queries that asked it and
                # waited (timeout) test the deadline; the rest found its breaker open.
                "slow_provider_outcomes": {k: int(n) for k, n in asked.items() if n},
                "waited_share": (asked.get("timeout", 0.0) + asked.get("hub_busy", 0.0)) / max(1, got["ok"] + sum(got["errors"].values())),
            }  # fmt: skip
    print_report(report, args)
    path = write_json(RESULTS_DIR / f"sync-query-{args.backend}-{timestamp()}.json", report)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
