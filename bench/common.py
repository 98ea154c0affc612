"""Shared helpers for sharedcare benchmarks (not tests).

- :class:`PostgresDatabase`: a fresh ``sharedcare_bench_<ts>`` database, dropped afterwards.
- :class:`Hub`: ``sharedcare serve`` in a subprocess on a free port, waited for on /readyz.
- :class:`LoadGenerator`: a closed-loop HTTP load generator (aiohttp or httpx, keep-alive,
  a fixed number of concurrent workers) in its own process, so that client and server do
  not share one event loop or one GIL.
- :class:`CpuMeter`: CPU seconds used by the hub, PostgreSQL and the client during a phase,
  read from /proc (the machine has 2 cores: who uses them is the first thing to know).
- :class:`PySpy`: ``py-spy record`` of the hub during a phase, summarised as text.
- percentiles, a Rich table and JSON output.

Everything here is generic; a benchmark script supplies the requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import importlib.metadata
import itertools
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
PG_ADMIN_DSN = os.environ.get("BENCH_PG_ADMIN_DSN", "postgresql://postgres@127.0.0.1:5432/test")
CLK_TCK = os.sysconf("SC_CLK_TCK")


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """Linear-interpolated percentile (p in 0..100) of an already sorted sequence."""
    if not sorted_values:
        return None
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    k = (len(sorted_values) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(sorted_values) - 1)
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo))


def latency_summary(latencies_ms: Iterable[float]) -> dict[str, float | None]:
    values = sorted(latencies_ms)
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    return {
        "p50": percentile(values, 50),
        "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "max": values[-1],
        "mean": sum(values) / len(values),
    }


# --------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    """Cores, memory, OS, Python and the versions of everything on the request path."""
    mem_kb = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    cpu_model = None
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    commit = None
    with contextlib.suppress(Exception):
        commit = (
            subprocess.run(
                ["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
            or None
        )
    dirty = None
    with contextlib.suppress(Exception):
        status = subprocess.run(
            ["git", "-C", str(REPO_DIR), "status", "--porcelain", "--", "sharedcare"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
        diff = subprocess.run(
            ["git", "-C", str(REPO_DIR), "diff", "HEAD", "--", "sharedcare"],
            capture_output=True,
            timeout=10,
            check=False,
        ).stdout
        import hashlib

        # The code measured is the work tree: say how far it is from the commit.
        dirty = {
            "changed_paths": len(status.splitlines()),
            "diff_sha1": hashlib.sha1(diff).hexdigest()[:12],
        }
    return {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "cpu_model": cpu_model,
        "memory_gib": round(mem_kb / 1024 / 1024, 1) if mem_kb else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite_library": sqlite3.sqlite_version,
        "git_commit": commit,
        "git_worktree_sharedcare": dirty,
        "versions": {
            d: _version(d)
            for d in (
                "sharedcare",
                "starlette",
                "uvicorn",
                "uvloop",
                "httptools",
                "sqlalchemy",
                "asyncpg",
                "aiosqlite",
                "orjson",
                "fhir.resources",
                "pydantic",
                "aiohttp",
                "httpx",
            )
        },
    }


# --------------------------------------------------------------------------- PostgreSQL


def _asyncpg_run(dsn: str, *statements: str) -> list[Any]:
    import asyncpg

    async def run() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return [await conn.fetchval(s) for s in statements]
        finally:
            await conn.close()

    return asyncio.run(run())


def postgres_version(admin_dsn: str = PG_ADMIN_DSN) -> str | None:
    try:
        return str(_asyncpg_run(admin_dsn, "SHOW server_version")[0])
    except Exception:  # noqa: BLE001 - informational only
        return None


def postgres_settings(admin_dsn: str = PG_ADMIN_DSN) -> dict[str, str]:
    names = (
        "shared_buffers",
        "synchronous_commit",
        "fsync",
        "max_connections",
        "work_mem",
        "autovacuum",
        "ssl",
    )
    try:
        values = _asyncpg_run(admin_dsn, *(f"SHOW {n}" for n in names))
    except Exception:  # noqa: BLE001
        return {}
    return dict(zip(names, map(str, values), strict=True))


class PostgresDatabase:
    """A fresh database ``sharedcare_bench_<ts>`` created on the admin database, dropped on exit."""

    def __init__(
        self, admin_dsn: str = PG_ADMIN_DSN, *, keep: bool = False, prefix: str = "sharedcare_bench"
    ):
        self.admin_dsn = admin_dsn
        self.keep = keep
        self.name = f"{prefix}_{timestamp().replace('-', '_')}_{os.getpid()}"
        base = admin_dsn.rsplit("/", 1)[0]
        self.url = base.replace("postgresql://", "postgresql+asyncpg://", 1) + "/" + self.name

    def __enter__(self) -> Self:
        _asyncpg_run(self.admin_dsn, f'CREATE DATABASE "{self.name}"')
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.keep:
            self.drop()

    def drop(self) -> None:
        with contextlib.suppress(Exception):
            _asyncpg_run(self.admin_dsn, f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def size_bytes(self) -> int | None:
        try:
            return int(_asyncpg_run(self.admin_dsn, f"SELECT pg_database_size('{self.name}')")[0])
        except Exception:  # noqa: BLE001
            return None


# --------------------------------------------------------------------------- /proc


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = defaultdict(list)
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids[ppid].append(int(entry.name))
    return kids


def descendants(pid: int) -> list[int]:
    kids = _children_map()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def pids_named(comm: str) -> list[int]:
    out = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if Path(entry.path, "comm").read_text().strip() == comm:
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def steal_seconds() -> float:
    """CPU time the hypervisor gave to other guests while this machine's vCPUs wanted it.

    On a shared host this is the clearest sign that the machine itself was slower: the same
    code measured minutes apart on this VM ran 25-50 % slower when steal was high.
    """
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return parts[7] / CLK_TCK if len(parts) > 7 else 0.0


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine from /proc/stat."""
    parts = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return (total - idle) / CLK_TCK, total / CLK_TCK


class CpuMeter:
    """CPU seconds per group of processes between :meth:`start` and :meth:`stop`.

    ``groups`` maps a name to a callable returning that group's pids now. A thread polls
    every ``interval`` seconds, so processes that start and exit during the phase (e.g.
    PostgreSQL backends of connections a pool opens and closes) are counted up to their
    last poll; processes that appear during the phase count from zero.
    """

    def __init__(
        self,
        groups: dict[str, Callable[[], list[int]]],
        interval: float = 0.25,
        detail: tuple[str, ...] = (),
    ):
        import threading

        self.groups = groups
        # Sub-groups (parts of another group, e.g. a hub's workers): also reported per
        # process, and not added again to the machine total.
        self.detail = detail
        self.interval = interval
        self._before: dict[str, dict[int, float]] = {}
        self._last: dict[str, dict[int, float]] = {}
        self._t0 = 0.0
        self._m0 = (0.0, 0.0)
        self._steal0 = 0.0
        self._done = threading.Event()
        self._thread: Any = None

    def _poll(self) -> None:
        for g, f in self.groups.items():
            last = self._last.setdefault(g, {})
            for p in f():
                used = cpu_seconds(p)
                if used:
                    last[p] = used

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            self._poll()

    def start(self) -> None:
        import threading

        self._before = {g: {p: cpu_seconds(p) for p in f()} for g, f in self.groups.items()}
        self._last = {g: dict(v) for g, v in self._before.items()}
        self._t0 = time.perf_counter()
        self._m0 = machine_busy()
        self._steal0 = steal_seconds()
        self._done.clear()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-cpu-meter")
        self._thread.start()

    def stop(self) -> dict[str, Any]:
        self._done.set()
        if self._thread is not None:
            self._thread.join(5)
        self._poll()
        wall = time.perf_counter() - self._t0
        busy1, total1 = machine_busy()
        out: dict[str, Any] = {"wall_s": round(wall, 3)}
        for g in self.groups:
            before = self._before.get(g, {})
            used = sum(max(0.0, v - before.get(p, 0.0)) for p, v in self._last.get(g, {}).items())
            out[f"{g}_cores"] = round(used / wall, 3) if wall else None
            out[f"{g}_processes_seen"] = len(self._last.get(g, {}))
            if g in self.detail and wall:
                out[f"{g}_cores_by_process"] = {
                    str(p): round(max(0.0, v - before.get(p, 0.0)) / wall, 3)
                    for p, v in sorted(self._last.get(g, {}).items())
                }
        dt = total1 - self._m0[1]
        out["machine_busy_pct"] = round(100.0 * (busy1 - self._m0[0]) / dt, 1) if dt else None
        if wall:
            machine = (busy1 - self._m0[0]) / wall
            ours = sum(
                v
                for k, v in out.items()
                if k.endswith("_cores") and v and k[: -len("_cores")] not in self.detail
            )  # before other_cores
            out["machine_busy_cores"] = round(machine, 3)
            # CPU used by processes outside the benchmark (other work on a shared machine).
            out["other_cores"] = round(max(0.0, machine - ours), 3)
            # Part of "other": time the hypervisor ran other guests on our vCPUs.
            out["steal_cores"] = round((steal_seconds() - self._steal0) / wall, 3)
        return out


def busy_cores(interval: float = 1.0) -> float:
    """Cores in use over the next ``interval`` seconds, machine-wide."""
    b0, _ = machine_busy()
    t0 = time.perf_counter()
    time.sleep(interval)
    b1, _ = machine_busy()
    return (b1 - b0) / (time.perf_counter() - t0)


def wait_for_quiet(
    threshold: float = 0.4, max_wait: float = 60.0, interval: float = 1.0
) -> dict[str, Any]:
    """Wait (up to ``max_wait`` s) until the machine's other load is under ``threshold`` cores.

    Benchmarks here share 2 cores with whatever else runs; a phase measured while another
    process burns a core says little about the hub. Call between phases, when the
    benchmark itself is idle. Returns what it saw, for the record.
    """
    start = time.monotonic()
    seen = busy_cores(interval)
    while seen > threshold and time.monotonic() - start < max_wait:
        seen = busy_cores(interval)
    return {
        "waited_s": round(time.monotonic() - start, 1),
        "busy_cores": round(seen, 2),
        "quiet": seen <= threshold,
    }


def pids_with_cmdline(needle: str) -> list[int]:
    """Processes whose command line contains ``needle`` (e.g. PostgreSQL backends of a database,
    whose process title names it)."""
    out = []
    raw = needle.encode()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if raw in Path(entry.path, "cmdline").read_bytes():
                    out.append(int(entry.name))
            except OSError:
                continue
    return out


class Prioritizer:
    """Keep the benchmark's own processes at a higher CPU priority (a negative nice value).

    On a machine shared with other work, the kernel's fair scheduler otherwise gives the
    hub, its PostgreSQL backends and the client no more CPU than any test run nearby.
    Only processes of this benchmark are touched: those ``pids()`` returns, re-checked
    every ``interval`` seconds (connection pools start new backends as they go).

    With ``kernel.sched_autogroup_enabled`` (the default on many distributions) CPU is
    shared fairly between *sessions* first, and a process's nice value only counts inside
    its session: so the nice value is also written to ``/proc/PID/autogroup`` for the
    processes ``own_sessions()`` returns (the hub and the load process lead or share
    sessions of their own). PostgreSQL backends live in the server's session, shared
    with everyone's connections: only their own nice value is set.
    """

    def __init__(
        self,
        nice: int,
        pids: Callable[[], list[int]],
        own_sessions: Callable[[], list[int]] = list,
        interval: float = 0.5,
    ):
        import threading

        self.nice = nice
        self.pids = pids
        self.own_sessions = own_sessions
        self.interval = interval
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="bench-prioritizer")
        self._seen: set[int] = set()

    def _apply(self) -> None:
        for pid in self.own_sessions():
            if -pid not in self._seen:
                with contextlib.suppress(OSError):
                    Path(f"/proc/{pid}/autogroup").write_text(str(self.nice))
                    self._seen.add(-pid)
        for pid in self.pids():
            if pid not in self._seen:
                try:
                    for task in os.listdir(f"/proc/{pid}/task"):  # every thread (aiosqlite's too)
                        os.setpriority(os.PRIO_PROCESS, int(task), self.nice)
                    self._seen.add(pid)
                except (OSError, ValueError):
                    continue

    def _loop(self) -> None:
        while not self._done.wait(self.interval):
            self._seen.clear() if len(self._seen) > 10000 else None
            self._apply()

    def start(self) -> Prioritizer:
        self._apply()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)


# --------------------------------------------------------------------------- hub process


def export_revision(rev: str, into: Path | None = None) -> tuple[Path, str]:
    """``git archive REV`` unpacked into a temporary folder (read-only for the repository).

    Lets a benchmark measure a fixed commit while the work tree is being edited.
    Returns (folder, full commit id).
    """
    commit = subprocess.run(
        ["git", "-C", str(REPO_DIR), "rev-parse", "--verify", f"{rev}^{{commit}}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = into or Path(tempfile.mkdtemp(prefix=f"sharedcare-src-{commit[:8]}-"))
    archive = subprocess.run(
        ["git", "-C", str(REPO_DIR), "archive", "--format=tar", commit],
        capture_output=True,
        check=True,
    )
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target, commit


class Hub:
    """``sharedcare serve`` in a subprocess with a fresh data folder, on a free port."""

    def __init__(
        self,
        *,
        database_url: str | None,
        workers: int = 1,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        data_dir: Path | None = None,
        source_dir: Path | None = None,
    ):
        self.port = free_port()
        self.source_dir = source_dir
        self.workers = workers
        self._own_dir = data_dir is None
        self.data_dir = data_dir or Path(tempfile.mkdtemp(prefix="sharedcare-bench-"))
        self.database_url = database_url
        self.extra_env = env or {}
        self.log_path = log_path or self.data_dir / "hub.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: Any = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def fhir(self) -> str:
        return f"{self.base}/fhir"

    def start(self, timeout: float = 60.0) -> Hub:
        env = {
            **os.environ,
            "SHAREDCARE_DATA_DIR": str(self.data_dir),
            "SHAREDCARE_PORT": str(self.port),
            "SHAREDCARE_HOST": "127.0.0.1",
            "SHAREDCARE_WORKERS": str(self.workers),
            "SHAREDCARE_LOG_LEVEL": "warning",
            **self.extra_env,
        }
        env.pop("SHAREDCARE_CONFIG_FILE", None)
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        cwd = None
        if self.source_dir is not None:
            # `python -m` puts the working directory first on sys.path, ahead of the
            # editable install's finder: the hub runs the exported source.
            cwd = str(self.source_dir)
            env["PYTHONPATH"] = cwd + os.pathsep + env.get("PYTHONPATH", "")
        if self.database_url:
            env["SHAREDCARE_DATABASE_URL"] = self.database_url
        else:
            env.pop("SHAREDCARE_DATABASE_URL", None)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sharedcare.cli", "serve"],
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=cwd,
        )
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        last: str = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"hub exited with {self.proc.returncode}; see {self.log_path}:\n{self.log_tail()}"
                )
            try:
                r = httpx.get(f"{self.base}/readyz", timeout=2.0)
                if r.status_code == 200:
                    if self.workers > 1:
                        self._wait_workers(deadline)
                    return
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.2)
        raise TimeoutError(f"hub not ready after {timeout}s ({last}); see {self.log_path}")

    def _wait_workers(self, deadline: float) -> None:
        # /readyz answers as soon as one worker listens; give the others their start-up too.
        while time.monotonic() < deadline and len(self.worker_pids()) < self.workers:
            time.sleep(0.2)
        time.sleep(1.0)

    def pids(self) -> list[int]:
        """The hub's processes (supervisor and workers)."""
        return descendants(self.proc.pid) if self.proc else []

    def worker_pids(self) -> list[int]:
        """Processes that serve requests: the supervisor itself when workers == 1."""
        if not self.proc:
            return []
        if self.workers == 1:
            return [self.proc.pid]
        out = []
        for pid in self.pids():
            with contextlib.suppress(OSError):
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"multiprocessing" in cmd and b"resource_tracker" not in cmd:
                    out.append(pid)
        return out

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                # Our own session (start_new_session): its process group is ours to end.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self._log_file:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def data_size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.data_dir.rglob("*") if p.is_file())

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- access tokens

BENCH_CLIENT_ID = "bench-admin"
BENCH_SCOPES = "system/*.* sharedcare/admin"
BENCH_END_USER = {
    "requesting_user": {"id": "U0001", "name": "Benchmark User", "role": "R8000"},
    "requesting_organization": "X26",
    "reason_for_access": "TREAT",
}


@dataclass
class TokenSource:
    """Bearer tokens for a registered client system (SMART Backend Services), refreshed
    before they expire. Picklable, so the load process can refresh its own tokens."""

    jwk: dict[str, Any]
    client_id: str
    token_url: str
    scope: str = BENCH_SCOPES
    end_user: dict[str, Any] = field(default_factory=lambda: dict(BENCH_END_USER))
    _header: str | None = None
    _until: float = 0.0

    def header(self) -> str:
        """``Bearer <token>``, fetching a new token when the current one has < 60 s left."""
        if self._header is None or time.time() > self._until:
            import httpx
            from joserfc.jwk import import_key

            from sharedcare.iam.client import sign_assertion, token_form

            key = import_key(self.jwk)
            assertion = sign_assertion(key, self.client_id, self.token_url, end_user=self.end_user)  # type: ignore[arg-type]
            r = httpx.post(self.token_url, data=token_form(assertion, self.scope), timeout=30)
            if r.status_code != 200:
                raise RuntimeError(f"token endpoint answered {r.status_code}: {r.text[:300]}")
            body = r.json()
            self._header = f"Bearer {body['access_token']}"
            self._until = time.time() + max(10.0, float(body.get("expires_in", 300)) - 60.0)
        return self._header


def hub_needs_token(hub: Hub) -> bool:
    import httpx

    r = httpx.get(f"{hub.fhir}/Patient?_count=0", timeout=30)
    return r.status_code == 401


def bootstrap_token(hub: Hub, client_id: str = BENCH_CLIENT_ID) -> TokenSource:
    """Register an admin client system in the hub's database and return its token source.

    Works on hubs with ``sharedcare.iam`` (registration goes through the registry's own
    service, in this process, against the hub's database, as the test fixtures do).
    """
    from sharedcare.iam.client import generate_key, public_jwks
    from sharedcare.registry.model import new_system
    from sharedcare.registry.service import Registry
    from sharedcare.settings import load_settings
    from sharedcare.store.db import Database
    from sharedcare.store.repository import Store
    from sharedcare.store.service import FhirService

    settings = load_settings(database_url=hub.database_url, data_dir=hub.data_dir, port=hub.port)
    key = generate_key("ES384", kid=f"{client_id}-es384")

    async def register() -> None:
        db = Database(settings.database)
        try:
            fhir = FhirService(
                Store(db), fhir_base=settings.fhir_base, default_count=50, max_count=1000
            )
            registry = Registry(fhir, cache_seconds=0)
            if await registry.get(client_id) is None:
                await registry.add(
                    new_system(
                        client_id=client_id,
                        kind="consumer",
                        name="sharedcare benchmark",
                        scopes=BENCH_SCOPES,
                        jwks=public_jwks(key),
                    )
                )
        finally:
            await db.close()

    asyncio.run(register())
    source = TokenSource(key.as_dict(private=True), client_id, f"{hub.base}/oauth2/token")
    source.header()  # fail here, not in the middle of a phase
    return source


# --------------------------------------------------------------------------- load generator


@dataclass(slots=True)
class Req:
    """One request: ``weight`` counts what it carries (e.g. Bundle entries), ``tag`` names it."""

    method: str
    path: str
    body: bytes | None = None
    headers: dict[str, str] | None = None
    weight: int = 1
    tag: Any = None


@dataclass
class Phase:
    """A closed-loop phase: ``concurrency`` workers send requests back to back.

    ``requests`` is a list (cycled when ``cycle``) or a picklable callable returning an
    iterator of :class:`Req` in the load process (for bodies too big to prepare up front).
    Requests that start in the first ``warmup`` seconds are sent but not measured. The
    phase ends after ``warmup + duration`` seconds or when the requests run out.
    """

    name: str
    requests: list[Req] | Callable[..., Iterator[Req]]
    concurrency: int = 16
    duration: float | None = 15.0
    warmup: float = 2.0
    cycle: bool = False
    ok_status: tuple[int, ...] = (200,)
    collect_location: bool = False
    auth: TokenSource | None = None
    source_kwargs: dict[str, Any] = field(default_factory=dict)
    timeout: float = 300.0


def _iter_requests(phase: Phase) -> Iterator[Req]:
    if callable(phase.requests):
        return iter(phase.requests(**phase.source_kwargs))
    return itertools.cycle(phase.requests) if phase.cycle else iter(phase.requests)


async def _aiohttp_client(
    base: str, concurrency: int, timeout: float, auth: TokenSource | None
) -> tuple[Any, Callable[..., Any]]:
    import aiohttp

    session = aiohttp.ClientSession(
        base_url=base,
        connector=aiohttp.TCPConnector(
            limit=concurrency, limit_per_host=concurrency, ttl_dns_cache=None
        ),
        timeout=aiohttp.ClientTimeout(total=timeout),
        auto_decompress=False,
    )

    async def send(req: Req) -> tuple[int, int, str | None]:
        headers = (
            req.headers if auth is None else {**(req.headers or {}), "Authorization": auth.header()}
        )
        async with session.request(req.method, req.path, data=req.body, headers=headers) as resp:
            data = await resp.read()
            return resp.status, len(data), resp.headers.get("Location")

    return session, send


async def _httpx_client(
    base: str, concurrency: int, timeout: float, auth: TokenSource | None
) -> tuple[Any, Callable[..., Any]]:
    import httpx

    client = httpx.AsyncClient(
        base_url=base,
        limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
        timeout=timeout,
    )

    async def send(req: Req) -> tuple[int, int, str | None]:
        headers = (
            req.headers if auth is None else {**(req.headers or {}), "Authorization": auth.header()}
        )
        r = await client.request(req.method, req.path, content=req.body, headers=headers)
        return r.status_code, len(r.content), r.headers.get("location")

    return client, send


async def _run_phase(base: str, client_kind: str, phase: Phase) -> dict[str, Any]:
    make = _aiohttp_client if client_kind == "aiohttp" else _httpx_client
    if phase.auth is not None:
        phase.auth.header()  # a blocking refresh, if one is due, before the clock starts
    session, send = await make(base, phase.concurrency, phase.timeout, phase.auth)
    requests = _iter_requests(phase)
    records: list[tuple[float, float, int, int, Any]] = []  # (start, latency, status, weight, tag)
    locations: list[str] = []
    errors: Counter[str] = Counter()
    error_samples: list[str] = []
    ok = set(phase.ok_status)
    cpu0 = time.process_time()
    start = time.perf_counter()
    deadline = start + phase.warmup + phase.duration if phase.duration is not None else float("inf")

    async def worker() -> None:
        while True:
            t0 = time.perf_counter()
            if t0 >= deadline:
                return
            try:
                req = next(requests)
            except StopIteration:
                return
            try:
                status, _size, location = await send(req)
            except Exception as exc:  # noqa: BLE001 - counted and sampled, the run goes on
                status, location = -1, None
                errors[type(exc).__name__] += 1
                if len(error_samples) < 5:
                    error_samples.append(repr(exc)[:300])
            t1 = time.perf_counter()
            records.append((t0, t1 - t0, status, req.weight, req.tag))
            if phase.collect_location and location and status in ok:
                locations.append(location)

    try:
        await asyncio.gather(*(worker() for _ in range(phase.concurrency)))
    finally:
        end = time.perf_counter()
        cpu = time.process_time() - cpu0
        await (session.close() if client_kind == "aiohttp" else session.aclose())

    window_start = start + phase.warmup
    measured = [r for r in records if r[0] >= window_start]
    if not measured:  # e.g. a bulk load shorter than the warm-up: measure everything
        measured, window_start = records, start
    window = max(end - window_start, 1e-9)
    good = [r for r in measured if r[2] in ok]
    statuses = Counter(str(r[2]) for r in measured)
    # Time series of successful weight (e.g. resources loaded), relative to the window.
    series = [(round(r[0] + r[1] - window_start, 4), r[3]) for r in good]
    return {
        "phase": phase.name,
        "client": client_kind,
        "concurrency": phase.concurrency,
        "requests_total": len(records),
        "requests_measured": len(measured),
        "ok": len(good),
        "failed": len(measured) - len(good),
        "statuses": dict(statuses),
        "errors": dict(errors),
        "error_samples": error_samples,
        "window_s": round(window, 3),
        "elapsed_s": round(end - start, 3),
        "rate_per_s": len(good) / window,
        "weight_ok": sum(r[3] for r in good),
        "weight_per_s": sum(r[3] for r in good) / window,
        "latency_ms": latency_summary(r[1] * 1000.0 for r in good),
        "client_cpu_s": round(cpu, 3),
        "client_cpu_us_per_request": round(cpu / len(records) * 1e6, 1) if records else None,
        "ok_tags": [r[4] for r in records if r[2] in ok and r[4] is not None],
        "locations": locations,
        "series": series,
    }


def _load_main(conn: Any, base: str, client_kind: str) -> None:
    """The load process: run each Phase it is sent, answer with its result."""
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    while True:
        phase = conn.recv()
        if phase is None:
            return
        try:
            conn.send(("ok", asyncio.run(_run_phase(base, client_kind, phase))))
        except Exception:  # noqa: BLE001 - reported to the parent
            conn.send(("error", traceback.format_exc()))


class LoadGenerator:
    """A load process (spawned, so it has its own interpreter and GIL) driven over a pipe."""

    def __init__(self, base: str, client: str = "aiohttp"):
        if client not in ("aiohttp", "httpx"):
            raise ValueError(f"unknown client {client!r}")
        self.base = base
        self.client = client
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_load_main, args=(child, base, client), daemon=True, name="bench-load"
        )

    @property
    def pid(self) -> int | None:
        return self.proc.pid

    def start(self) -> LoadGenerator:
        self.proc.start()
        return self

    def run(self, phase: Phase) -> dict[str, Any]:
        self._conn.send(phase)
        kind, value = self._conn.recv()
        if kind != "ok":
            raise RuntimeError(f"load phase {phase.name} failed in the load process:\n{value}")
        return value

    def stop(self) -> None:
        if self.proc.is_alive():
            with contextlib.suppress(OSError, BrokenPipeError):
                self._conn.send(None)
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.terminate()
                self.proc.join(5)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------- profiling


class PySpy:
    """``py-spy record --format raw`` of a process tree; :func:`summarise_profile` reads it."""

    def __init__(
        self,
        pid: int,
        out: Path,
        *,
        rate: int = 100,
        duration: float | None = None,
        subprocesses: bool = True,
    ):
        self.out = out
        exe = shutil.which("py-spy")
        if exe is None:
            raise RuntimeError("py-spy is not installed: pip install py-spy")
        cmd = [
            exe,
            "record",
            "--pid",
            str(pid),
            "--format",
            "raw",
            "--rate",
            str(rate),
            "--full-filenames",
            "-o",
            str(out),
        ]
        if subprocesses:
            cmd.append("--subprocesses")
        if duration:
            cmd += ["--duration", str(int(duration))]
        self.cmd = cmd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> PySpy:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(0.3)  # attach before the load starts
        return self

    def stop(self) -> Path:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return self.out


def _frame_parts(frame: str) -> tuple[str, str]:
    """('function', 'path') of a py-spy frame 'function (path:line)'."""
    name, _, rest = frame.partition(" (")
    path = rest.rsplit(":", 1)[0] if rest else ""
    return name, path


_COMPONENTS: tuple[tuple[str, str], ...] = (
    ("sharedcare/store/indexing", "sharedcare indexing"),
    ("sharedcare/store/validation", "sharedcare validation"),
    ("sharedcare/", "sharedcare (other)"),
    ("fhir/resources", "fhir.resources/pydantic"),
    ("fhir_core", "fhir.resources/pydantic"),
    ("pydantic", "fhir.resources/pydantic"),
    ("sqlalchemy/dialects/postgresql/asyncpg", "sqlalchemy asyncpg adapter"),
    ("sqlalchemy/dialects/sqlite/aiosqlite", "sqlalchemy aiosqlite adapter"),
    ("sqlalchemy/sql/compiler", "sqlalchemy compiler"),
    ("sqlalchemy/", "sqlalchemy (other)"),
    ("asyncpg/", "asyncpg"),
    ("aiosqlite/", "aiosqlite"),
    ("sqlite3/", "sqlite3"),
    ("starlette/", "starlette"),
    ("uvicorn/", "uvicorn"),
    ("httptools", "uvicorn"),
    ("prometheus_client/", "prometheus_client"),
    ("structlog/", "structlog/logging"),
    ("logging/", "structlog/logging"),
    ("orjson", "orjson"),
    ("fhirpathpy/", "fhirpathpy"),
    ("uuid", "uuid"),
    ("asyncio/", "asyncio/uvloop"),
    ("uvloop", "asyncio/uvloop"),
    ("threading", "threads"),
    ("concurrent/", "threads"),
    ("queue", "threads"),
)


def component(path: str) -> str:
    for needle, name in _COMPONENTS:
        if needle in path:
            return name
    return "other"


_ROOTS = ("_run_module_as_main", "<module>", "Runner.run", "_bootstrap", "spawn_main")


def _is_idle(frame: str) -> bool:
    """A leaf that is a thread waiting for work, which py-spy can still count as active."""
    if frame.startswith("_worker (") and "concurrent/futures/thread.py:81)" in frame:
        return True
    if frame.startswith("_connection_worker_thread (") and "aiosqlite/core.py:59)" in frame:
        return True  # aiosqlite's thread waiting for the next query
    return frame.startswith(("Condition.wait (", "Event.wait (", "SimpleQueue.get ("))


_WRAPPERS = ("sharedcare/cli.py", "sharedcare/metrics/middleware.py", "sharedcare/store/routes.py")


def summarise_profile(path: Path, top: int = 12) -> dict[str, Any]:
    """Self time per function and per component, and inclusive time of sharedcare functions.

    A raw (collapsed) line is ``process;frame;frame;... count`` with frames
    ``function (file:line)``. Percentages are of all samples of the recorded processes
    (py-spy samples only threads that are running, so idle time is not in them).
    SQLAlchemy runs driver calls in greenlets, whose stacks py-spy cannot join to the
    request's stack: ``greenlet_stacks_pct`` says how much is attributed only by self time
    (inclusive figures of sharedcare functions leave those samples out).
    """
    self_t: Counter[str] = Counter()
    incl_t: Counter[str] = Counter()
    comp_t: Counter[str] = Counter()
    orphan = 0
    total = 0
    idle = 0
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return {"samples": 0}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = [
            f for f in stack.split(";") if " (" in f and not f.startswith(("process ", "thread "))
        ]
        if frames and _is_idle(frames[-1]):
            idle += count
            continue
        total += count
        if not frames:
            continue
        if not any(f.startswith(_ROOTS) for f in frames[:3]):
            orphan += count
        leaf_name, leaf_path = _frame_parts(frames[-1])
        self_t[f"{leaf_name} ({_short(leaf_path)})"] += count
        comp_t[component(leaf_path)] += count
        seen: set[str] = set()
        for f in frames:
            name, fpath = _frame_parts(f)
            if "/sharedcare/" not in "/" + fpath or fpath.endswith(_WRAPPERS):
                continue
            key = f"{name} ({_short(fpath)})"
            if key not in seen:
                seen.add(key)
                incl_t[key] += count

    def pct(counter: Counter[str], n: int) -> list[tuple[str, float]]:
        return (
            [(k, round(100.0 * v / total, 1)) for k, v in counter.most_common(n)] if total else []
        )

    return {
        "samples": total,
        "idle_samples_dropped": idle,
        "greenlet_stacks_pct": round(100.0 * orphan / total, 1) if total else None,
        "self_top": pct(self_t, top),
        "components_self": pct(comp_t, 30),
        "sharedcare_inclusive": pct(incl_t, top * 2),
    }


def _short(path: str) -> str:
    """A readable module path: relative to site-packages, the stdlib or the repository."""
    for marker in ("site-packages/", "dist-packages/"):
        if marker in path:
            return path.split(marker, 1)[1]
    repo = str(REPO_DIR) + "/"
    if path.startswith(repo):
        return path[len(repo) :]
    if "/lib/python3" in path:
        tail = path.split("/lib/python3", 1)[1]
        return tail.split("/", 1)[1] if "/" in tail else tail
    return path


# --------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A Rich table when Rich is available, plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # pragma: no cover - rich is a sharedcare dependency
        print(title)
        print(" | ".join(columns))
        for row in rows:
            print(" | ".join(fmt(c) for c in row))
        return
    table = Table(title=title, title_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(c if isinstance(c, str) else fmt(c) for c in row))
    Console(width=max(120, shutil.get_terminal_size((160, 40)).columns)).print(table)


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- wrk (when installed)

_WRK_SCRIPT = """
local paths = {%(paths)s}
local headers = {["Authorization"] = %(auth)s, ["Accept"] = "application/fhir+json"}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i %% #paths) + 1], headers)
end
%(pace)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK-JSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"bytes\\": %%d, \\"p50_us\\": %%d, \\"p99_us\\": %%d, " ..
    "\\"max_us\\": %%d, \\"connect\\": %%d, \\"read\\": %%d, \\"write\\": %%d, \\"status\\": %%d, \\"timeout\\": %%d}\\n",
    summary.requests, summary.duration, summary.bytes, latency:percentile(50), latency:percentile(99),
    latency.max, e.connect, e.read, e.write, e.status, e.timeout))
  if paced_counts then paced_counts() end
end
"""


# Open loop at a fixed rate: every request takes the next slot of one timetable
# (start + k / rate), whichever connection is free to send it; wrk waits (delay) until then.
_WRK_PACE = """
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } sharedcare_ts;
int clock_gettime(int clk, sharedcare_ts *ts);
]]
local ts = ffi.new("sharedcare_ts")
local function now_ms()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
-- What a Python client would check too: 4xx, 5xx, and merged answers naming an impaired
-- provider (an OperationOutcome entry), counted in each thread and summed in done().
local threads = {}
setup = function(thread) table.insert(threads, thread) end
partial, s4xx, s5xx = 0, 0, 0
response = function(status, headers, body)
  if status >= 500 then s5xx = s5xx + 1
  elseif status >= 400 then s4xx = s4xx + 1
  elseif body:find('"mode":"outcome"', 1, true) then partial = partial + 1 end
end
function paced_counts()
  local p, a, b = 0, 0, 0
  for _, t in ipairs(threads) do
    p = p + t:get("partial"); a = a + t:get("s4xx"); b = b + t:get("s5xx")
  end
  io.write(string.format("WRK-PACED {\\"partial\\": %%d, \\"4xx\\": %%d, \\"5xx\\": %%d}\\n", p, a, b))
end
local interval_ms = %(interval_ms)s
local start_ms = nil
local slot = 0
delay = function()
  local now = now_ms()
  if start_ms == nil then start_ms = now end
  local at = start_ms + slot * interval_ms
  slot = slot + 1
  if at <= now then return 0 end
  return math.floor(at - now + 0.5)
end
"""


class Wrk:
    """A closed-loop phase driven by wrk (Debian package ``wrk``), when installed.

    wrk is written in C: at a few hundred 200 KB answers a second it uses a fraction of the
    CPU a Python client does, and on a 2-core machine that CPU is taken from the server
    being measured. Every request is a GET of one of ``paths`` (cycled) with the header
    ``Authorization: <auth>``; non-2xx answers count as errors.
    """

    def __init__(self, base: str, paths: Sequence[str], auth: str, rate: float | None = None):
        """``rate``: open loop at that many requests a second (see ``_WRK_PACE``); None is
        closed loop, as fast as the connections go."""
        self.base = base.rstrip("/")
        self.dir = Path(tempfile.mkdtemp(prefix="sharedcare-wrk-"))
        self.script = self.dir / "paths.lua"
        quoted = ", ".join(json.dumps(p) for p in paths)
        pace = _WRK_PACE % {"interval_ms": repr(1000.0 / rate)} if rate else ""
        self.script.write_text(
            _WRK_SCRIPT % {"paths": quoted, "auth": json.dumps(auth), "pace": pace}
        )
        self.proc: subprocess.Popen[str] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("wrk") is not None

    def pids(self) -> list[int]:
        return [self.proc.pid] if self.proc is not None and self.proc.poll() is None else []

    def run(self, concurrency: int, duration: float, timeout_s: float = 10.0) -> dict[str, Any]:
        cmd = [
            "wrk", "-t", "1", "-c", str(concurrency), "-d", f"{max(1, round(duration))}s",
            "--timeout", f"{round(timeout_s)}s", "-s", str(self.script), self.base + "/",
        ]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        out, _ = self.proc.communicate(timeout=duration + 60)
        line = next((ln for ln in out.splitlines() if ln.startswith("WRK-JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk gave no summary:\n{out}")
        got = json.loads(line.removeprefix("WRK-JSON "))
        non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        errors = got["connect"] + got["read"] + got["write"] + got["timeout"]
        failed = errors + (int(non2xx.group(1)) if non2xx else 0)
        seconds = got["duration_us"] / 1e6
        return {
            "requests": got["requests"],
            "rate_per_s": round(got["requests"] / seconds, 1) if seconds else 0.0,
            "latency_ms": {
                "p50": round(got["p50_us"] / 1000, 1),
                "p99": round(got["p99_us"] / 1000, 1),
                "max": round(got["max_us"] / 1000, 1),
            },
            "failed": failed,
            "statuses": {"non-2xx": int(non2xx.group(1)) if non2xx else 0, "socket errors": errors},
            "client": "wrk",
            "errors": {
                "connect": got["connect"] + got["read"] + got["write"],
                "timeout": got["timeout"],
            },
            **self._paced(out),
        }

    @staticmethod
    def _paced(out: str) -> dict[str, Any]:
        """Open loop only: 4xx, 5xx and partial answers, as the Python load client counts them."""
        line = next((ln for ln in out.splitlines() if ln.startswith("WRK-PACED ")), None)
        if line is None:
            return {}
        got = json.loads(line.removeprefix("WRK-PACED "))
        return {"partial": got["partial"], "4xx": got["4xx"], "5xx": got["5xx"]}

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
