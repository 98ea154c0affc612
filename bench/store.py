"""Benchmark of the regional FHIR store over real HTTP (a benchmark, not a test).

Starts ``sharedcare serve`` on a fresh database (SQLite in a temporary folder, or a new
PostgreSQL database ``sharedcare_bench_<ts>`` that is dropped afterwards) and drives it from
a closed-loop load generator in a separate process:

  create      POST /fhir/Patient with generated people (names, valid NHS numbers, addresses)
  bulk        POST /fhir transaction Bundles of --bundle-size Patients; resources/s and the
              projected time for 1,000,000 Patients
  read        GET /fhir/Patient/{id}
  identifier  GET /fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{n}
  name        GET /fhir/Patient?family=smi&given=ol (prefix searches)

Searches run against everything loaded by create and bulk. Prints a table and writes every
figure with the run parameters to --json (default bench/results/store-<ts>.json).

    python bench/store.py                                  # both backends, ~4-5 min
    python bench/store.py --backend postgresql --workers 2
    python bench/store.py --backend postgresql --phases bulk --bulk 1000000
    python bench/store.py --backend postgresql --profile create,identifier,bulk
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import orjson

# Run as a script (python bench/store.py) or a module (python -m bench.store): either way the
# helpers are imported as the top-level module `common`, which the spawned load process also finds.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import common
from common import CpuMeter, Hub, LoadGenerator, Phase, PostgresDatabase, PySpy, Req, log

from sharedcare.simulators.people import NHS_SYSTEM, people

FHIR_JSON = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
PHASES = ("create", "bulk", "read", "identifier", "name")
TARGETS = {  # PostgreSQL on 2 cores, from the brief
    "create_per_s": 500,
    "identifier_per_s": 800,
    "identifier_p99_ms": 50,
    "bulk_1m_minutes": 30,
}
CREATE_SEED, BULK_SEED = 1, 2
MAX_BULK_SAMPLE = 100_000  # bulk-loaded people regenerated to pick search targets from


# --------------------------------------------------------------------------- requests


def bundle_requests(seed: int, total: int, bundle_size: int) -> Iterator[Req]:
    """Transaction Bundles of POST Patient, generated lazily in the load process."""
    gen = people(total, seed)
    index = 0
    while True:
        entries: list[dict[str, Any]] = []
        for person in gen:
            entries.append(
                {
                    "fullUrl": f"urn:uuid:{index:08x}-0000-4000-8000-{len(entries):012x}",
                    "resource": person,
                    "request": {"method": "POST", "url": "Patient"},
                }
            )
            if len(entries) == bundle_size:
                break
        if not entries:
            return
        body = orjson.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries})
        yield Req("POST", "/fhir", body, FHIR_JSON, weight=len(entries), tag=index)
        index += 1


def identifier_query(nhs: str) -> str:
    return "/fhir/Patient?identifier=" + quote(f"{NHS_SYSTEM}|{nhs}", safe="")


def name_query(person: dict[str, Any], rng: random.Random) -> str:
    name = person["name"][0]
    family = name["family"].lower()[:3]
    given = name["given"][0].lower()[: rng.choice((2, 3))]
    return "/fhir/Patient?" + urlencode({"family": family, "given": given})


# --------------------------------------------------------------------------- helpers


def _total(hub: Hub, query: str, auth: common.TokenSource | None) -> int | None:
    import httpx

    headers = {"Authorization": auth.header()} if auth else {}
    try:
        r = httpx.get(hub.fhir + query, headers=headers, timeout=120)
        return r.json().get("total") if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def _patient_count(hub: Hub, auth: common.TokenSource | None) -> int | None:
    return _total(hub, "/Patient?_count=0", auth)


def _public(result: dict[str, Any]) -> dict[str, Any]:
    """A phase result without its bulky per-request lists."""
    return {k: v for k, v in result.items() if k not in ("series", "ok_tags", "locations")}


def _rate_by_quarter(series: list[tuple[float, int]], window: float) -> list[float]:
    """Weight per second in each quarter of the window (does the rate fall as data grows?)."""
    if not series or window <= 0:
        return []
    q = window / 4
    sums = [0.0] * 4
    for t, w in series:
        sums[min(3, max(0, int(t / q)))] += w
    return [round(s / q, 1) for s in sums]


def _per_worker(cpu: dict[str, Any]) -> str:
    """Cores used by each hub worker, e.g. ``0.61/0.58``: how evenly connections spread."""
    return "/".join(f"{c:.2f}" for c in cpu.get("workers_cores_by_process", {}).values())


def _pid_list(load: LoadGenerator) -> list[int]:
    return [load.pid] if load.pid else []


def _capacity(res: dict[str, Any], workers: int) -> float | None:
    """Rate this phase would reach on an otherwise idle machine, from its CPU cost per unit.

    Each hub worker is one event loop (at most one core); hub, PostgreSQL and client
    together have ``cores``. A model, not a measurement: it assumes CPU is the limit
    (true for every phase measured here) and that the cost per unit does not change.
    """
    hub = res.get("hub_cpu_ms_per_unit")
    if not hub:
        return None
    total = (
        hub + (res.get("postgres_cpu_ms_per_unit") or 0) + (res.get("client_cpu_ms_per_unit") or 0)
    )
    cores = os.cpu_count() or 1
    return round(min(min(workers, cores) * 1000.0 / hub, cores * 1000.0 / total), 1)


class Runner:
    """One backend: a fresh database, a hub, a load process and the phases in order."""

    def __init__(self, backend: str, args: argparse.Namespace, out_dir: Path):
        self.backend = backend
        self.args = args
        self.out_dir = out_dir
        self.result: dict[str, Any] = {"backend": backend, "phases": {}}
        self.created: list[dict[str, Any]] = []
        self.created_ok: list[int] = []
        self.ids: list[str] = []
        self.bulk_ok: list[int] = []
        self.rng = random.Random(args.seed)

    def run(self) -> dict[str, Any]:
        args = self.args
        with contextlib.ExitStack() as stack:
            url = None
            pg: PostgresDatabase | None = None
            if self.backend == "postgresql":
                pg = stack.enter_context(PostgresDatabase(args.pg_admin_dsn, keep=args.keep_db))
                url = pg.url
                self.result["database"] = pg.name
            # The hub's per-client rate limit (if it has one) would cap the load: lift it,
            # keeping the limiter's own bookkeeping on the request path.
            env = {"SHAREDCARE_RATE_LIMIT_PER_SECOND": "1000000"}
            env.update(kv.split("=", 1) for kv in args.hub_env)
            hub = Hub(
                database_url=url,
                workers=args.workers,
                env=env,
                log_path=self.out_dir / f"hub-{self.backend}.log",
                source_dir=args.source_dir,
            )
            if args.keep_db:
                self.result["data_dir"] = str(hub.data_dir)
            else:
                stack.callback(hub.cleanup)
            log(f"{self.backend}: starting hub ({args.workers} worker(s)) on port {hub.port}")
            stack.enter_context(hub)
            self.auth = None
            if common.hub_needs_token(hub):
                self.auth = common.bootstrap_token(hub)
                log(
                    f"{self.backend}: the hub wants bearer tokens; registered client {self.auth.client_id}"
                )
            self.result["authenticated"] = self.auth is not None
            load = stack.enter_context(LoadGenerator(hub.base, args.client))
            groups = {"hub": hub.pids, "client": lambda: [load.pid] if load.pid else []}
            if args.workers > 1:  # how evenly the connections spread: CPU of each worker
                groups["workers"] = hub.worker_pids
            if pg is not None:
                # Backends serving the bench database (their process title names it): the
                # server's shared processes and other databases' backends are not ours.
                groups["postgres"] = lambda: common.pids_with_cmdline(pg.name)
            if args.nice:
                own = (
                    (lambda: hub.pids() + [load.pid] + common.pids_with_cmdline(pg.name))
                    if pg
                    else (lambda: hub.pids() + [load.pid])
                )
                sessions = lambda: [p for p in (hub.proc.pid if hub.proc else None, load.pid) if p]
                prio = common.Prioritizer(args.nice, own, sessions).start()  # type: ignore[arg-type]
                stack.callback(prio.stop)
                log(
                    f"{self.backend}: hub, client{' and PostgreSQL backends' if pg else ''} at nice {args.nice}"
                )
            self.hub, self.load, self.groups = hub, load, groups
            self.result["hub_env"] = env

            self.pg, self.analyzed = pg, False
            for name in args.phases:
                if args.analyze and name in ("read", "identifier", "name") and not self.analyzed:
                    self.analyze()
                getattr(self, f"phase_{name}")()
            if args.compare_clients:
                self.compare_clients()
            self.result["patients_in_db"] = _patient_count(hub, self.auth)
            self.result["db_size_bytes"] = pg.size_bytes() if pg else hub.data_size_bytes()
            log(
                f"{self.backend}: done; {self.result['patients_in_db']} Patients, "
                f"{(self.result['db_size_bytes'] or 0) / 1e6:.0f} MB"
            )
        return self.result

    def analyze(self) -> None:
        """Refresh the planner's statistics and (PostgreSQL) the visibility map, as autovacuum
        (or an operator) eventually would: without the map an index-only scan still reads
        every table row it finds."""
        t0 = time.perf_counter()
        if self.pg is not None:
            common._asyncpg_run(
                self.pg.url.replace("postgresql+asyncpg://", "postgresql://"), "VACUUM (ANALYZE)"
            )
        else:
            import sqlite3

            with contextlib.closing(
                sqlite3.connect(self.hub.data_dir / "sharedcare.db", timeout=60)
            ) as db:
                db.execute("ANALYZE")
        self.analyzed = True
        self.result["analyze_s"] = round(time.perf_counter() - t0, 2)
        log(f"{self.backend}: (VACUUM) ANALYZE took {self.result['analyze_s']} s")

    # -- running one phase -----------------------------------------------------------
    def _measure(self, phase: Phase, load: LoadGenerator | None = None) -> dict[str, Any]:
        quiet = None
        if self.args.quiet_wait > 0:
            quiet = common.wait_for_quiet(self.args.quiet_threshold, self.args.quiet_wait)
            if not quiet["quiet"]:
                log(
                    f"  machine busy with other work ({quiet['busy_cores']} cores) after waiting "
                    f"{quiet['waited_s']} s; measuring anyway"
                )
        meter = CpuMeter(self.groups, detail=("workers",))
        spy = None
        if phase.name in self.args.profile:
            raw = self.out_dir / f"profile-{self.backend}-{phase.name}.txt"
            spy = PySpy(self.hub.proc.pid, raw, rate=self.args.profile_rate).start()  # type: ignore[union-attr]
        meter.start()
        try:
            res = (load or self.load).run(phase)
        finally:
            cpu = meter.stop()
            if spy is not None:
                spy.stop()
        res["cpu"] = cpu
        res["before_phase"] = quiet
        # CPU cost per request (per resource for bulk): steadier than throughput on a shared machine.
        # The CPU window covers the whole phase, warm-up included: divide by all it sent.
        per_request = res["weight_ok"] / res["ok"] if res["ok"] else 0
        units = res["requests_total"] * per_request
        for group in ("hub", "postgres", "client"):
            cores = cpu.get(f"{group}_cores")
            if cores is not None and units:
                res[f"{group}_cpu_ms_per_unit"] = round(cores * cpu["wall_s"] * 1000.0 / units, 3)
        res["estimated_idle_machine_rate"] = _capacity(res, self.args.workers)
        if spy is not None:
            res["profile"] = common.summarise_profile(spy.out)
            res["profile"]["raw"] = str(spy.out)
        lat = res["latency_ms"]
        log(
            f"{self.backend}/{phase.name}: {res['rate_per_s']:.1f} req/s"
            + (f" ({res['weight_per_s']:.0f} resources/s)" if res["weight_ok"] != res["ok"] else "")
            + f", p50 {common.fmt(lat['p50'])} ms, p99 {common.fmt(lat['p99'])} ms,"
            f" ok {res['ok']}, failed {res['failed']} {res['statuses'] if res['failed'] else ''}"
            f" | cores: hub {cpu.get('hub_cores')}, pg {cpu.get('postgres_cores', '-')},"
            f" client {cpu.get('client_cores')}, other {cpu.get('other_cores')}"
            + (f" | per worker {_per_worker(cpu)}" if cpu.get("workers_cores_by_process") else "")
        )
        if res["error_samples"]:
            log(f"  errors: {res['error_samples'][:2]}")
        return res

    def _phase_kwargs(self) -> dict[str, Any]:
        a = self.args
        return {
            "concurrency": a.concurrency,
            "duration": a.duration,
            "warmup": a.warmup,
            "auth": self.auth,
            "timeout": 60.0,
        }

    # -- phases ----------------------------------------------------------------------
    def phase_create(self) -> None:
        n = self.args.n
        log(f"{self.backend}/create: generating {n} people")
        self.created = list(people(n, CREATE_SEED))
        reqs = [
            Req("POST", "/fhir/Patient", orjson.dumps(p), FHIR_JSON, tag=i)
            for i, p in enumerate(self.created)
        ]
        res = self._measure(
            Phase("create", reqs, ok_status=(201,), collect_location=True, **self._phase_kwargs())
        )
        self.ids = [loc.split("/Patient/", 1)[1].split("/", 1)[0] for loc in res["locations"]]
        self.created_ok = res["ok_tags"]
        res["patients_created"] = len(self.created_ok)
        self.result["phases"]["create"] = _public(res)

    def phase_bulk(self) -> None:
        a = self.args
        size = a.bundle_size
        total = a.bulk if a.bulk else 50_000_000
        duration = None if a.bulk else a.bulk_seconds
        amount = f"{a.bulk} Patients" if a.bulk else f"{a.bulk_seconds}s of"
        log(
            f"{self.backend}/bulk: {amount} transaction Bundles of {size}, {a.bulk_concurrency} at a time"
        )
        phase = Phase(
            "bulk",
            bundle_requests,
            source_kwargs={"seed": BULK_SEED, "total": total, "bundle_size": size},
            concurrency=a.bulk_concurrency,
            duration=duration,
            warmup=0.0,
            timeout=600.0,
            auth=self.auth,
        )
        res = self._measure(phase)
        self.bulk_ok = sorted(res["ok_tags"])
        rate = res["weight_per_s"]
        res["bundle_size"] = size
        res["resources_loaded"] = res["weight_ok"]
        res["resources_per_s"] = rate
        res["resources_per_s_by_quarter"] = _rate_by_quarter(res["series"], res["window_s"])
        res["projected_1m_s"] = 1_000_000 / rate if rate else None
        res["projected_1m_min"] = res["projected_1m_s"] / 60 if rate else None
        self.result["phases"]["bulk"] = _public(res)

    def _population_sample(self) -> list[dict[str, Any]]:
        """Created and bulk-loaded people that the hub accepted, to pick search targets from."""
        sample = [self.created[i] for i in self.created_ok]
        if self.bulk_ok:
            size = self.args.bundle_size
            ok = set(self.bulk_ok)
            upto = min((max(ok) + 1) * size, MAX_BULK_SAMPLE)
            for i, person in enumerate(people(upto, BULK_SEED)):
                if i // size in ok:
                    sample.append(person)
        return sample

    def phase_read(self) -> None:
        if not self.ids:
            log(f"{self.backend}/read: skipped (no created ids; run the create phase)")
            return
        ids = self.ids[:]
        self.rng.shuffle(ids)
        reqs = [
            Req("GET", f"/fhir/Patient/{i}", headers={"Accept": "application/fhir+json"})
            for i in ids
        ]
        res = self._measure(Phase("read", reqs, cycle=True, **self._phase_kwargs()))
        self.result["phases"]["read"] = _public(res)

    def phase_identifier(self) -> None:
        sample = self._population_sample()
        if not sample:
            log(f"{self.backend}/identifier: skipped (nothing loaded)")
            return
        picks = [self.rng.choice(sample) for _ in range(min(len(sample), 50_000))]
        reqs = [
            Req(
                "GET",
                identifier_query(p["identifier"][0]["value"]),
                headers={"Accept": "application/fhir+json"},
            )
            for p in picks
        ]
        # Every looked-up number must be found (generated numbers may repeat: then total > 1).
        checks = [
            _total(self.hub, identifier_query(p["identifier"][0]["value"])[5:], self.auth)
            for p in picks[:10]
        ]
        res = self._measure(Phase("identifier", reqs, cycle=True, **self._phase_kwargs()))
        res["check_found"] = sum(1 for t in checks if t and t >= 1)
        res["check_of"] = len(checks)
        res["patients_in_db"] = _patient_count(self.hub, self.auth)
        self.result["phases"]["identifier"] = _public(res)

    def phase_name(self) -> None:
        sample = self._population_sample()
        if not sample:
            log(f"{self.backend}/name: skipped (nothing loaded)")
            return
        queries = [name_query(self.rng.choice(sample), self.rng) for _ in range(20_000)]
        reqs = [Req("GET", q, headers={"Accept": "application/fhir+json"}) for q in queries]
        # A few sample searches for the mean number of matches (bounded: without planner
        # statistics one name search can take tens of seconds).
        totals = []
        t0 = time.monotonic()
        for q in queries[:10]:
            totals.append(_total(self.hub, q[5:], self.auth))
            if time.monotonic() - t0 > 20:
                break
        res = self._measure(Phase("name", reqs, cycle=True, **self._phase_kwargs()))
        found = [t for t in totals if t is not None]
        res["example_query"] = queries[0]
        res["mean_matches"] = round(sum(found) / len(found), 1) if found else None
        self.result["phases"]["name"] = _public(res)

    def compare_clients(self) -> None:
        """The same read load from aiohttp and from httpx: client CPU per request."""
        if not self.ids:
            return
        reqs = [
            Req("GET", f"/fhir/Patient/{i}", headers={"Accept": "application/fhir+json"})
            for i in self.ids
        ]
        out = {}
        for client in ("aiohttp", "httpx"):
            with LoadGenerator(self.hub.base, client) as load:
                self.groups["client"] = functools.partial(_pid_list, load)
                phase = Phase(
                    f"read-{client}",
                    reqs,
                    cycle=True,
                    concurrency=self.args.concurrency,
                    duration=min(self.args.duration, 8.0),
                    warmup=1.0,
                    auth=self.auth,
                )
                res = self._measure(phase, load)
                out[client] = {
                    "rate_per_s": res["rate_per_s"],
                    "latency_ms": res["latency_ms"],
                    "client_cpu_us_per_request": res["client_cpu_us_per_request"],
                    "cpu": res["cpu"],
                }
        self.groups["client"] = lambda: [self.load.pid] if self.load.pid else []
        self.result["client_comparison"] = out


# --------------------------------------------------------------------------- report


def _row(backend: str, name: str, res: dict[str, Any], target: str = "") -> list[Any]:
    lat, cpu = res["latency_ms"], res.get("cpu", {})
    rate = res["resources_per_s"] if name == "bulk" else res["rate_per_s"]
    return [
        backend,
        name + (" (resources/s)" if name == "bulk" else ""),
        rate,
        lat["p50"],
        lat["p99"],
        res["ok"],
        res["failed"],
        common.fmt(cpu.get("hub_cores"), 2)
        + (f" ({_per_worker(cpu)})" if cpu.get("workers_cores_by_process") else ""),
        common.fmt(cpu.get("postgres_cores"), 2),
        common.fmt(cpu.get("client_cores"), 2),
        common.fmt(cpu.get("other_cores"), 2),
        common.fmt(res.get("hub_cpu_ms_per_unit"), 2),
        common.fmt(res.get("postgres_cpu_ms_per_unit"), 2),
        res.get("estimated_idle_machine_rate"),
        target,
    ]


def _targets(res: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """PostgreSQL figures against the brief's targets: measured, and on the CPU-cost estimate."""
    ph = res["phases"]
    out: dict[str, dict[str, Any]] = {}
    if "create" in ph:
        v, est = ph["create"]["rate_per_s"], ph["create"].get("estimated_idle_machine_rate")
        t = TARGETS["create_per_s"]
        out["create"] = {
            "value": v,
            "estimate": est,
            "target": f">= {t}/s",
            "met": v >= t,
            "met_on_estimate": est is not None and est >= t,
        }
    if "identifier" in ph:
        r = ph["identifier"]
        v, p99, est = r["rate_per_s"], r["latency_ms"]["p99"], r.get("estimated_idle_machine_rate")
        t, tp = TARGETS["identifier_per_s"], TARGETS["identifier_p99_ms"]
        out["identifier"] = {
            "value": v,
            "p99_ms": p99,
            "estimate": est,
            "target": f">= {t}/s, p99 <= {tp} ms",
            "met": v >= t and p99 is not None and p99 <= tp,
            "met_on_estimate": est is not None and est >= t,
        }
    if "bulk" in ph and ph["bulk"].get("projected_1m_min"):
        b = ph["bulk"]
        v = b["projected_1m_min"]
        est = b.get("estimated_idle_machine_rate")
        est_min = 1e6 / est / 60 if est else None
        t = TARGETS["bulk_1m_minutes"]
        out["bulk"] = {
            "value_min": v,
            "estimate_min": est_min,
            "target": f"< {t} min for 1M",
            "met": v < t,
            "met_on_estimate": est_min is not None and est_min < t,
        }
    return out


def report(results: list[dict[str, Any]], markdown: bool = False) -> None:
    rows = []
    for res in results:
        targets = res.get("targets", {})
        for name in PHASES:
            if name not in res["phases"]:
                continue
            r = res["phases"][name]
            mark = ""
            if name in targets:
                t = targets[name]
                mark = ("met" if t["met"] else "missed") + (
                    " (est. met)" if t.get("met_on_estimate") and not t["met"] else ""
                )
            rows.append(_row(res["backend"], name, r, mark))
    columns = [
        "backend",
        "phase",
        "rate/s",
        "p50 ms",
        "p99 ms",
        "ok",
        "failed",
        "hub cores (per worker)",
        "pg cores",
        "client cores",
        "other cores",
        "hub ms CPU/req",
        "pg ms CPU/req",
        "est. rate idle",
        "target",
    ]
    if markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(c if isinstance(c, str) else common.fmt(c) for c in row) + " |")
    else:
        common.print_table(
            "sharedcare store benchmark (bulk: per resource; other = CPU of processes outside the benchmark;"
            " est. rate idle = CPU-cost model for an otherwise idle machine)",
            columns,
            rows,
        )
    for res in results:
        b = res["phases"].get("bulk")
        if b and b.get("projected_1m_min"):
            print(
                f"{res['backend']}: bulk {b['resources_loaded']:,} Patients in {b['window_s']:.0f} s = "
                f"{b['resources_per_s']:,.0f}/s (by quarter {b['resources_per_s_by_quarter']}); "
                f"1,000,000 projected in {b['projected_1m_min']:.1f} min"
            )
        if "name" in res["phases"]:
            n = res["phases"]["name"]
            print(
                f"{res['backend']}: name search e.g. {n['example_query']} (mean matches {n['mean_matches']})"
            )
        cc = res.get("client_comparison")
        if cc:
            print(
                f"{res['backend']}: client CPU per request: "
                + ", ".join(
                    f"{k} {v['client_cpu_us_per_request']} us ({v['rate_per_s']:.0f}/s)"
                    for k, v in cc.items()
                )
            )
        print(
            f"{res['backend']}: {res.get('patients_in_db')} Patients, {(res.get('db_size_bytes') or 0) / 1e6:,.0f} MB on disk"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    p.add_argument(
        "--n",
        type=int,
        default=20_000,
        help="Patients prepared for the create phase (it stops at --duration). [20000]",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=12.0,
        help="Measured seconds per phase (after --warmup). [12]",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=2.0,
        help="Unmeasured seconds at the start of each phase. [2]",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="Concurrent client connections (closed loop). [16]",
    )
    p.add_argument("--workers", type=int, default=1, help="Hub worker processes. [1]")
    p.add_argument(
        "--bulk",
        type=int,
        default=0,
        help="Patients to load through Bundles (0: as many as fit in --bulk-seconds).",
    )
    p.add_argument(
        "--bulk-seconds",
        type=float,
        default=50.0,
        help="Length of the bulk phase when --bulk is 0. [50]",
    )
    p.add_argument(
        "--bundle-size", type=int, default=1000, help="Entries per transaction Bundle. [1000]"
    )
    p.add_argument("--bulk-concurrency", type=int, default=2, help="Bundles in flight at once. [2]")
    p.add_argument(
        "--phases", default=",".join(PHASES), help=f"Comma-separated subset of {','.join(PHASES)}."
    )
    p.add_argument(
        "--client",
        choices=("aiohttp", "httpx"),
        default="aiohttp",
        help="Load generator HTTP client. [aiohttp]",
    )
    p.add_argument(
        "--compare-clients",
        action="store_true",
        help="Also run a short read load with aiohttp and httpx.",
    )
    p.add_argument(
        "--profile", default="", help="Phases to record with py-spy (comma-separated, or 'all')."
    )
    p.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second. [100]")
    p.add_argument(
        "--analyze",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Run ANALYZE (PostgreSQL: VACUUM (ANALYZE)) after loading, before the read/search "
        "phases, as autovacuum eventually would (the hub does not; autovacuum is off on this "
        "machine's PostgreSQL). [on]",
    )
    p.add_argument(
        "--quiet-wait",
        type=float,
        default=10.0,
        help="Before each phase wait up to this many s for other load to fall below --quiet-threshold (0: no wait). [10]",
    )
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.4,
        help="Cores of other load tolerated before a phase. [0.4]",
    )
    p.add_argument(
        "--nice",
        type=int,
        default=0,
        help="Run hub, client and the bench database's PostgreSQL backends at this nice value (e.g. -10, needs root) on a shared machine. [0: off]",
    )
    p.add_argument(
        "--hub-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Extra environment for the hub (repeatable).",
    )
    p.add_argument(
        "--source",
        default=None,
        metavar="REV",
        help="Run the hub from git revision REV (git archive) instead of the work tree.",
    )
    p.add_argument(
        "--source-dir",
        type=Path,
        default=None,
        metavar="PATH",
        help="Run the hub from the source tree at PATH (e.g. a fixed base plus your changes).",
    )
    p.add_argument(
        "--pg-admin-dsn",
        default=common.PG_ADMIN_DSN,
        help="Database used to CREATE/DROP the bench database.",
    )
    p.add_argument(
        "--keep-db",
        action="store_true",
        help="Keep the database (PostgreSQL) or data folder (SQLite) at the end, for EXPLAIN.",
    )
    p.add_argument(
        "--seed", type=int, default=7, help="Seed for the choice of read/search targets. [7]"
    )
    p.add_argument(
        "--json", type=Path, default=None, help="Output file. [bench/results/store-<ts>.json]"
    )
    p.add_argument(
        "--report",
        type=Path,
        default=None,
        metavar="JSON",
        help="Only print the table of an earlier run's JSON.",
    )
    p.add_argument("--markdown", action="store_true", help="Print the table as Markdown.")
    args = p.parse_args(argv)
    args.phases = [x for x in args.phases.split(",") if x]
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phases {sorted(unknown)}")
    args.phases = [x for x in PHASES if x in args.phases]  # always in dependency order
    args.profile = set(
        PHASES if args.profile == "all" else [x for x in args.profile.split(",") if x]
    )
    for kv in args.hub_env:
        if "=" not in kv:
            p.error(f"--hub-env wants KEY=VALUE, not {kv!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.report:
        import json

        report(json.loads(args.report.read_text())["results"], args.markdown)
        return 0
    source_commit = str(args.source_dir) if args.source_dir else None
    if args.source:
        args.source_dir, source_commit = common.export_revision(args.source)
    ts = common.timestamp()
    json_path = args.json or common.RESULTS_DIR / f"store-{ts}.json"
    out_dir = json_path.parent / json_path.stem  # hub logs and raw profiles
    out_dir.mkdir(parents=True, exist_ok=True)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    started = time.time()
    machine = common.machine_info()
    params = {
        k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
        for k, v in vars(args).items()
    }
    params["source_commit"] = source_commit or "work tree"
    doc: dict[str, Any] = {
        "benchmark": "store",
        "started": ts,
        "parameters": params,
        "machine": machine,
        "postgres": {
            "version": common.postgres_version(args.pg_admin_dsn),
            "settings": common.postgres_settings(args.pg_admin_dsn),
        }
        if "postgresql" in backends
        else None,
        "targets": TARGETS,
        "results": [],
    }
    log(
        f"store benchmark: {', '.join(backends)}; {machine['cores']} cores, workers {args.workers}, "
        f"concurrency {args.concurrency}, client {args.client}; output {json_path}"
    )
    try:
        for backend in backends:
            res = Runner(backend, args, out_dir).run()
            if backend == "postgresql":
                res["targets"] = _targets(res)
            doc["results"].append(res)
            common.write_json(json_path, doc)  # keep what we have if a later backend fails
    finally:
        doc["duration_s"] = round(time.time() - started, 1)
        common.write_json(json_path, doc)
        if args.source is not None:
            import shutil

            shutil.rmtree(args.source_dir, ignore_errors=True)
    report(doc["results"], args.markdown)
    print(f"JSON: {json_path}  ({doc['duration_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
