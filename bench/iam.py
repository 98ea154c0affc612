"""Benchmark of identity and access (a benchmark, not a test).

Two figures, with their targets from issue 3:

  validation  the time the auth middleware adds to a request, in µs, measured in-process
              around an empty ASGI app (so nothing else is timed): a token already seen by
              the process (the common case: clients reuse a token for its 5 minutes) and a
              token seen for the first time (one RS384 signature check). Target: ≤ 100 µs p50.
  issuance    tokens per second from POST /oauth2/token: in-process (one core, no HTTP),
              and over real sockets against ``sharedcare serve --workers 2`` driven by a
              separate load process with pre-signed assertions. Target: ≥ 300 tokens/s on
              2 cores. Assertions signed with ES384 and with RS384 (ES384 costs the hub
              ~1 ms per signature check, RS384 ~0.05 ms).

Prints a table and writes JSON to bench/results/iam-<ts>.json.

    python bench/iam.py                         # SQLite and PostgreSQL, ~2 min
    python bench/iam.py --backend sqlite --seconds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

if __package__:
    from . import common
    from .common import CpuMeter, Hub, LoadGenerator, Phase, PostgresDatabase, Req, log
else:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common
    from common import CpuMeter, Hub, LoadGenerator, Phase, PostgresDatabase, Req, log

from sharedcare.iam.client import generate_key, public_jwks, sign_assertion, token_form

TARGETS = {"validation_p50_us": 100.0, "tokens_per_s_2_cores": 300.0}
SCOPE = "system/*.read"
END_USER = {
    "requesting_user": {"id": "U0001", "name": "Benchmark User", "role": "R8000"},
    "requesting_organization": "X26",
    "reason_for_access": "TREAT",
}
NO_LIMIT = {"SHAREDCARE_RATE_LIMIT_PER_SECOND": "1000000", "SHAREDCARE_RATE_LIMIT_BURST": "2000000"}


def us(values_ns: list[int]) -> dict[str, float | None]:
    return {k: (round(v / 1000.0, 1) if v is not None else None) for k, v in common.latency_summary(values_ns).items()}


# --------------------------------------------------------------------------- in-process


async def in_process(database_url: str, data_dir: Path, n: int, cold: int, issue: int) -> dict[str, Any]:
    """Validation overhead and single-process issuance, on the real app and database."""
    import httpx

    from sharedcare.app import create_app
    from sharedcare.iam.middleware import AuthMiddleware
    from sharedcare.registry.model import new_system
    from sharedcare.settings import Settings

    settings = Settings(
        database_url=database_url, data_dir=data_dir, base_url="http://bench.local", hub_key_alg="RS384",
        rate_limit_per_second=1e6, rate_limit_burst=2_000_000,
    )
    app = create_app(settings)
    token_url = f"{settings.public_base_url}/oauth2/token"
    keys = {"ES384": generate_key("ES384", "bench-es"), "RS384": generate_key("RS384", "bench-rs")}
    out: dict[str, Any] = {}
    async with app.router.lifespan_context(app):
        iam = app.state.iam
        for alg, key in keys.items():
            await iam.registry.add(new_system(client_id=f"bench-{alg.lower()}", kind="consumer", name=alg,
                                              scopes=SCOPE, jwks=public_jwks(key)))
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url=settings.public_base_url) as http:
            form = token_form(sign_assertion(keys["RS384"], "bench-rs384", token_url, end_user=END_USER), SCOPE)
            token = (await http.post("/oauth2/token", data=form)).json()["access_token"]

        async def empty(scope: Any, receive: Any, send: Any) -> None:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            pass

        def scope_for(bearer: str) -> dict[str, Any]:
            return {"type": "http", "method": "GET", "path": "/fhir/Patient", "query_string": b"",
                    "headers": [(b"host", b"bench.local"), (b"accept", b"application/fhir+json"),
                                (b"authorization", f"Bearer {bearer}".encode())]}

        guarded = AuthMiddleware(empty, iam=iam)

        async def timed(target: Any, scopes: list[dict[str, Any]]) -> list[int]:
            times = []
            for s in scopes:
                t0 = time.perf_counter_ns()
                await target(s, receive, send)
                times.append(time.perf_counter_ns() - t0)
            return times

        warm_scope = scope_for(token)
        await timed(guarded, [warm_scope] * 1000)  # warm-up
        base = await timed(empty, [warm_scope] * n)
        warm = await timed(guarded, [warm_scope] * n)
        fresh = [
            (await iam.tokens.issue(client_id="bench-rs384", scopes=[SCOPE], participant_organization=None,
                                    end_user=None))[0]
            for _ in range(cold)
        ]
        cold_times = await timed(guarded, [scope_for(t) for t in fresh])
        b50 = common.percentile(sorted(base), 50) or 0.0
        out["validation"] = {
            "requests": n,
            "empty_app_us": us(base),
            "warm_token_us": us(warm),
            "first_use_token_us": us(cold_times),
            "added_p50_us_warm": round(((common.percentile(sorted(warm), 50) or 0) - b50) / 1000, 1),
            "added_p50_us_first_use": round(((common.percentile(sorted(cold_times), 50) or 0) - b50) / 1000, 1),
        }
        # Issuance in one process: the token endpoint's logic without HTTP.
        for alg, key in keys.items():
            cid = f"bench-{alg.lower()}"
            forms = [list(token_form(sign_assertion(key, cid, token_url, end_user=END_USER), SCOPE).items())
                     for _ in range(issue)]
            t0 = time.perf_counter()
            statuses = [(await iam.token(f)).status for f in forms]
            elapsed = time.perf_counter() - t0
            out[f"issue_{alg}"] = {"tokens": statuses.count(200), "per_s": round(issue / elapsed, 1),
                                   "ms_per_token": round(elapsed / issue * 1000, 3)}
    return out


# --------------------------------------------------------------------------- over HTTP


def issuance_over_http(backend: str, url: str | None, args: argparse.Namespace, out_dir: Path) -> dict[str, Any]:
    """POST /oauth2/token against ``sharedcare serve`` from a separate load process."""
    from sharedcare.registry.model import new_system
    from sharedcare.registry.service import Registry
    from sharedcare.settings import load_settings
    from sharedcare.store.db import Database
    from sharedcare.store.repository import Store
    from sharedcare.store.service import FhirService

    results: dict[str, Any] = {}
    with Hub(database_url=url, workers=args.workers, env=NO_LIMIT, log_path=out_dir / f"iam-hub-{backend}.log") as hub:
        keys = {"ES384": generate_key("ES384", "http-es"), "RS384": generate_key("RS384", "http-rs")}
        settings = load_settings(database_url=hub.database_url, data_dir=hub.data_dir, port=hub.port)

        async def register() -> None:
            db = Database(settings.database)
            try:
                fhir = FhirService(Store(db), fhir_base=settings.fhir_base, default_count=50, max_count=1000)
                for alg, key in keys.items():
                    await Registry(fhir).add(new_system(client_id=f"http-{alg.lower()}", kind="consumer",
                                                        name=alg, scopes=SCOPE, jwks=public_jwks(key)))
            finally:
                await db.close()

        asyncio.run(register())
        token_url = f"{hub.base}/oauth2/token"
        with LoadGenerator(hub.base, args.client) as load, contextlib.ExitStack() as stack:
            if args.nice:  # a shared machine: see bench/README.md, "Measuring on a shared machine"
                db_name = url.rsplit("/", 1)[1] if url else None
                own = lambda: hub.pids() + [load.pid] + (common.pids_with_cmdline(db_name) if db_name else [])
                sessions = lambda: [p for p in (hub.proc.pid if hub.proc else None, load.pid) if p]
                stack.callback(common.Prioritizer(args.nice, own, sessions).start().stop)  # type: ignore[arg-type]
            for alg, key in keys.items():
                count = int(args.expect_rate * (args.seconds + 2) * 1.5)
                log(f"{backend}: signing {count} {alg} assertions")
                headers = {"Content-Type": "application/x-www-form-urlencoded"}
                requests = [
                    Req("POST", "/oauth2/token", urlencode(token_form(
                        sign_assertion(key, f"http-{alg.lower()}", token_url, end_user=END_USER), SCOPE)).encode(), headers)
                    for _ in range(count)
                ]
                groups = {"hub": hub.pids, "client": lambda: [load.pid] if load.pid else []}
                if url:
                    groups["postgres"] = functools.partial(common.pids_with_cmdline, url.rsplit("/", 1)[1])
                quiet = common.wait_for_quiet(args.quiet_threshold, args.quiet_wait)  # shared machine
                meter = CpuMeter(groups)
                meter.start()
                res = load.run(Phase(f"token-{alg}", requests, concurrency=args.concurrency,
                                     duration=args.seconds, warmup=2.0))
                cpu = meter.stop()
                hub_cores = cpu.get("hub_cores") or 0.0
                results[alg] = {
                    "tokens_per_s": round(res["rate_per_s"], 1),
                    "failed": res["failed"],
                    "statuses": res["statuses"],
                    "latency_ms": {k: (round(v, 2) if v is not None else None) for k, v in res["latency_ms"].items()},
                    "cpu": cpu,
                    "tokens_per_hub_core_s": round(res["rate_per_s"] / hub_cores, 1) if hub_cores else None,
                    "quiet_before": quiet,
                }
                log(f"{backend}: {alg} {res['rate_per_s']:.0f} tokens/s (hub {hub_cores:.2f} cores)")
    return results


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--seconds", type=float, default=8.0, help="measured seconds per HTTP phase")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp")
    parser.add_argument("--requests", type=int, default=20_000, help="validations measured")
    parser.add_argument("--cold", type=int, default=2_000, help="first-use tokens measured")
    parser.add_argument("--issue", type=int, default=1_000, help="in-process issuances per alg")
    parser.add_argument("--expect-rate", type=float, default=1500.0, help="assertions to pre-sign per second")
    parser.add_argument("--nice", type=int, default=0, help="run hub, client and PostgreSQL at this nice value")
    parser.add_argument("--quiet-threshold", type=float, default=0.4, help="other load (cores) to wait out")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="longest wait for it, seconds")
    parser.add_argument("--pg-admin-dsn", default=common.PG_ADMIN_DSN)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    out_dir = common.RESULTS_DIR
    report: dict[str, Any] = {"benchmark": "iam", "targets": TARGETS, "machine": common.machine_info(),
                              "args": {k: str(v) for k, v in vars(args).items()}, "backends": {}}
    for backend in backends:
        with contextlib.ExitStack() as stack:
            url = None
            if backend == "postgresql":
                url = stack.enter_context(PostgresDatabase(args.pg_admin_dsn, prefix="sharedcare_bench_iam")).url
                inproc_url = stack.enter_context(PostgresDatabase(args.pg_admin_dsn, prefix="sharedcare_bench_iam_ip")).url
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sharedcare-iam-")))
            if backend == "sqlite":
                inproc_url = f"sqlite+aiosqlite:///{tmp / 'inproc.db'}"
            log(f"{backend}: in-process validation and issuance")
            entry = asyncio.run(in_process(inproc_url, tmp / "data", args.requests, args.cold, args.issue))
            log(f"{backend}: token endpoint over HTTP, {args.workers} workers")
            entry["http"] = issuance_over_http(backend, url, args, out_dir)
            report["backends"][backend] = entry
    rows = []
    for backend, entry in report["backends"].items():
        v = entry["validation"]
        rows.append([backend, "validation, token seen before: added p50 µs", v["added_p50_us_warm"], "≤ 100"])
        rows.append([backend, "validation, token seen before: p99 µs", v["warm_token_us"]["p99"], ""])
        rows.append([backend, "validation, first use of a token: added p50 µs", v["added_p50_us_first_use"], "≤ 100"])
        for alg in ("ES384", "RS384"):
            rows.append([backend, f"issuance in-process, {alg} assertions: tokens/s (1 core)", entry[f"issue_{alg}"]["per_s"], ""])
            http = entry["http"][alg]
            rows.append([backend, f"issuance over HTTP, {alg}, {args.workers} workers: tokens/s", http["tokens_per_s"], "≥ 300"])
            rows.append([backend, "  p50 / p99 ms", f"{http['latency_ms']['p50']} / {http['latency_ms']['p99']}", ""])
            rows.append([backend, "  hub cores used / tokens per hub core-second",
                         f"{http['cpu'].get('hub_cores')} / {http['tokens_per_hub_core_s']}", ""])
            rows.append([backend, "  other processes' cores during the phase", http["cpu"].get("other_cores"), ""])
    common.print_table("sharedcare identity and access", ["backend", "figure", "value", "target"], rows)
    path = args.json or out_dir / f"iam-{common.timestamp()}.json"
    common.write_json(path, report)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
