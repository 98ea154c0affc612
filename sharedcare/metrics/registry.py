"""Prometheus metrics for sharedcare, safe across several uvicorn worker processes.

Metrics (names are part of the operator contract; do not rename):

====================================================  =========  ================================================
Metric                                                Type       Meaning
====================================================  =========  ================================================
``sharedcare_http_requests_total``                    counter    HTTP requests served, by ``route`` (the route
                                                                 *template*, e.g. ``/fhir/{type}/{id}``, or
                                                                 ``<unmatched>``), ``method`` and ``status``.
``sharedcare_http_request_duration_seconds``          histogram  Wall time from request start to the end of the
                                                                 response, by ``route`` and ``method``; buckets
                                                                 1 ms .. 5 s.
``sharedcare_http_requests_in_flight``                gauge      Requests currently being handled, summed over
                                                                 live worker processes (``livesum``).
``sharedcare_store_operations_total``                 counter    Store operations, by ``operation`` (read, vread,
                                                                 search, history, create, update, delete) and
                                                                 ``resource_type``.
``sharedcare_log_fatal_total``                        counter    Log events at level ``fatal``; alert on any
                                                                 increase.
====================================================  =========  ================================================

Multi-process mode: ``prometheus_client`` decides once per process, when ``prometheus_client.values``
is first imported, whether values live in memory or in per-process mmap files under
``PROMETHEUS_MULTIPROC_DIR``.  That decision cannot be changed afterwards, so:

* the supervisor (CLI) calls :func:`setup_multiprocess_dir` exactly once, *before* it starts the
  workers (uvicorn spawns them, so they re-import everything and see the variable), and never from
  a worker, because it deletes the other workers' files;
* this module imports ``prometheus_client`` lazily (on the first :func:`get_metrics`), so importing
  it to call :func:`setup_multiprocess_dir` does not itself fix the mode too early;
* :func:`render_metrics` looks at the mode the process actually runs in, not at the environment,
  so a process that imported ``prometheus_client`` before the variable was set still exports its
  own in-memory values instead of an empty or foreign set.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, TypeVar

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

__all__ = [
    "MULTIPROC_ENV",
    "READ_OPERATIONS",
    "WRITE_OPERATIONS",
    "Metrics",
    "StoreReadOp",
    "StoreWriteOp",
    "get_metrics",
    "is_multiprocess",
    "record_store_read",
    "record_store_write",
    "render_metrics",
    "setup_multiprocess_dir",
]

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

# 1 ms .. 5 s: a cached read is ~1 ms, a large search or a cold database a few seconds;
# anything slower lands in +Inf, which is itself the signal.
HTTP_DURATION_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)

StoreReadOp = Literal["read", "vread", "search", "history"]
StoreWriteOp = Literal["create", "update", "delete"]
READ_OPERATIONS: Final = frozenset({"read", "vread", "search", "history"})
WRITE_OPERATIONS: Final = frozenset({"create", "update", "delete"})


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Metrics:
    """The process's metric objects."""

    http_requests_total: Counter
    http_request_duration_seconds: Histogram
    http_requests_in_flight: Gauge
    store_operations_total: Counter
    log_fatal_total: Counter


def lazy(create: Callable[[], T]) -> Callable[[], T]:
    """A getter that calls ``create`` once, on first use, from any thread.

    Every capability's metrics are made this way, so prometheus_client is imported (and its
    multiprocess mode decided) only when a metric is first used; the lock matters because
    sync endpoints run in a thread pool and registering twice raises "Duplicated timeseries".
    """
    lock = threading.Lock()
    made: list[T] = []

    def get() -> T:
        if not made:
            with lock:
                if not made:
                    made.append(create())
        return made[0]

    return get


def _create_metrics() -> Metrics:
    """Create and register all metrics in the default registry."""
    from prometheus_client import Counter, Gauge, Histogram

    metrics = Metrics(
        http_requests_total=Counter(
            "sharedcare_http_requests_total",
            "HTTP requests served, by route template, method and status.",
            ["route", "method", "status"],
        ),
        http_request_duration_seconds=Histogram(
            "sharedcare_http_request_duration_seconds",
            "HTTP request duration in seconds, by route template and method.",
            ["route", "method"],
            buckets=HTTP_DURATION_BUCKETS,
        ),
        http_requests_in_flight=Gauge(
            "sharedcare_http_requests_in_flight",
            "HTTP requests currently being handled.",
            # Sum over workers that are alive: a dead worker's in-flight count is meaningless.
            multiprocess_mode="livesum",
        ),
        store_operations_total=Counter(
            "sharedcare_store_operations_total",
            "Store operations, by operation and resource type.",
            ["operation", "resource_type"],
        ),
        log_fatal_total=Counter(
            "sharedcare_log_fatal_total",
            "Log events at level fatal.",
        ),
    )
    if is_multiprocess():
        # livesum gauges keep a per-pid file; drop ours on a clean interpreter exit. Not enough on
        # its own: uvicorn workers re-raise SIGTERM after a graceful shutdown and die by the
        # signal, skipping atexit, so render_metrics() also prunes files of vanished pids.
        atexit.register(_mark_this_process_dead)
    return metrics


get_metrics = lazy(_create_metrics)


def _mark_this_process_dead() -> None:
    """Remove this process's live-gauge files."""
    from prometheus_client import multiprocess

    path = os.environ.get(MULTIPROC_ENV)
    if path and os.path.isdir(path):
        # Evaluated at exit, not at registration, so a forked child removes its own files.
        multiprocess.mark_process_dead(os.getpid(), path)


def _prune_dead_live_gauges(path: str) -> None:
    """Remove live-gauge files whose writer process no longer exists."""
    if os.name != "posix":
        return  # os.kill(pid, 0) is a liveness probe only on POSIX; on Windows it terminates
    from prometheus_client import multiprocess

    dead: set[int] = set()
    for db in Path(path).glob("gauge_live*_*.db"):
        pid_text = db.stem.rpartition("_")[2]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            dead.add(int(pid_text))
    for pid in dead:
        # The collector tolerates live files vanishing mid-scrape, so racing another scrape is fine.
        multiprocess.mark_process_dead(pid, path)


def _pid_alive(pid: int) -> bool:
    """Tell whether a process with this pid exists (a permission error still means it does)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_multiprocess() -> bool:
    """Tell whether this process's metric values live in PROMETHEUS_MULTIPROC_DIR."""
    from prometheus_client import values

    return bool(getattr(values.ValueClass, "_multiprocess", False))


def render_metrics() -> tuple[bytes, str]:
    """Render all metrics in the Prometheus text format; return (body, content type)."""
    from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
    from prometheus_client.multiprocess import MultiProcessCollector

    from sharedcare.metrics import buffer

    get_metrics()  # so that every family is exported (at zero) from the very first scrape
    buffer.flush()  # this process's pending hot-path values (other workers' lag by <= 1 s)
    if is_multiprocess():
        # A fresh registry per scrape: the collector reads all workers' files at collect time,
        # and must not be mixed with this process's in-memory default collectors.
        path = os.environ.get(MULTIPROC_ENV)
        if path:
            _prune_dead_live_gauges(path)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)  # a missing directory raises ValueError here
        body = generate_latest(registry)
    else:
        body = generate_latest(REGISTRY)
    # generate_latest() emits text format 0.0.4; prometheus_client 0.26's CONTENT_TYPE_LATEST
    # says version=1.0.0, which it only pairs with negotiated escaping.
    return body, CONTENT_TYPE_PLAIN_0_0_4


def setup_multiprocess_dir(path: Path) -> None:
    """Create or empty *path* and point PROMETHEUS_MULTIPROC_DIR at it; call once, before workers start."""
    path = Path(path).absolute()
    values = sys.modules.get("prometheus_client.values")
    keep_suffix: str | None = None
    if values is not None:
        if getattr(values.ValueClass, "_multiprocess", False):
            current = os.environ.get(MULTIPROC_ENV)
            if current is None or Path(current).absolute() != path:
                # Files already opened elsewhere would split this process's metrics in two dirs.
                raise RuntimeError(
                    f"prometheus_client already runs in multiprocess mode with {MULTIPROC_ENV}="
                    f"{current!r}; cannot switch to {str(path)!r}"
                )
            # This process already writes here (variable set before import); its open mmaps must
            # survive the cleanup, or its values would go to unlinked files.
            keep_suffix = f"_{os.getpid()}.db"
        else:
            warnings.warn(
                "setup_multiprocess_dir() called after prometheus_client was imported: this "
                "process keeps in-memory metrics; only processes started afterwards share "
                f"{str(path)!r}",
                RuntimeWarning,
                stacklevel=2,
            )
    path.mkdir(parents=True, exist_ok=True)
    # Stale files from a previous run (e.g. a reused pid in a container) would be summed in;
    # only *.db files are removed so a mistaken path such as /tmp loses nothing else.
    for db in path.glob("*.db"):
        if keep_suffix is None or not db.name.endswith(keep_suffix):
            db.unlink(missing_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)


def record_store_read(op: StoreReadOp, rtype: str) -> None:
    """Count one store read operation (read, vread, search, history) on resource type *rtype*."""
    if op not in READ_OPERATIONS:
        raise ValueError(f"not a store read operation: {op!r}")
    # rtype must already be a validated resource type: a raw client string would make the label
    # set unbounded.
    get_metrics().store_operations_total.labels(operation=op, resource_type=rtype).inc()


def record_store_write(op: StoreWriteOp, rtype: str) -> None:
    """Count one store write operation (create, update, delete) on resource type *rtype*."""
    if op not in WRITE_OPERATIONS:
        raise ValueError(f"not a store write operation: {op!r}")
    get_metrics().store_operations_total.labels(operation=op, resource_type=rtype).inc()
