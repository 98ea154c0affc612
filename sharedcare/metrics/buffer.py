"""Hot-path metrics, added up in the process and written to prometheus_client once a second.

In multiprocess mode every ``inc`` or ``observe`` of a prometheus_client value takes a lock,
checks the process id and writes an mmap, and every ``labels(...)`` call looks the child up
under another lock: 2-3 µs each. A federated query touches about twenty of them, which
bench/sync_query.py's profile put at 5 % of the hub's CPU. The values here are plain
in-process sums instead (a dict update under one uncontended lock), and :func:`flush` adds
them to the shared values:

* every :data:`FLUSH_SECONDS` from a daemon thread, so a scrape lags by about that much;
* before the process renders ``/metrics``, so a single-process hub is never behind;
* at interpreter exit. A process killed by a signal loses at most the last second's counts.

A histogram is kept as per-bucket counts and a sum, and written with the same arithmetic as
``Histogram.observe`` (the first bucket whose upper bound is >= the value); the test
``tests/test_metrics_buffer.py`` checks the exposition against unbuffered observations.
"""

from __future__ import annotations

import atexit
import os
import threading
from bisect import bisect_left
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

__all__ = ["FLUSH_SECONDS", "BufferedCounter", "BufferedGauge", "BufferedHistogram", "flush"]

FLUSH_SECONDS: Final = 1.0

_lock = threading.Lock()
_buffers: list[_Buffer] = []
_flusher_started = False


class _Buffer:
    """Pending values per label tuple; :meth:`_apply` writes them to the metric."""

    __slots__ = ("_children", "_pending", "metric")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self._pending: dict[tuple[str, ...], Any] = {}
        self._children: dict[tuple[str, ...], Any] = {}
        with _lock:
            _buffers.append(self)

    def _child(self, labels: tuple[str, ...]) -> Any:
        child = self._children.get(labels)
        if child is None:
            child = self.metric.labels(*labels) if labels else self.metric
            if len(self._children) < 10_000:  # label sets are bounded; this only guards surprises
                self._children[labels] = child
        return child

    def _take(self) -> dict[tuple[str, ...], Any]:
        pending, self._pending = self._pending, {}
        return pending

    def _add(self, labels: tuple[str, ...], amount: float) -> None:
        _ensure_flusher()
        with _lock:
            pending = self._pending
            pending[labels] = pending.get(labels, 0.0) + amount

    def _apply(self, pending: dict[tuple[str, ...], Any]) -> None:
        """Sums (a counter's or a gauge's): one ``inc`` per label set; histograms override."""
        for labels, amount in pending.items():
            if amount:
                self._child(labels).inc(amount)


class BufferedCounter(_Buffer):
    """``inc(*labels, amount=1)`` on a Counter (label values in the metric's order)."""

    __slots__ = ()

    def __init__(self, metric: Counter) -> None:
        super().__init__(metric)

    def inc(self, *labels: str, amount: float = 1.0) -> None:
        self._add(labels, amount)


class BufferedGauge(_Buffer):
    """``add(*labels, amount=...)`` on a Gauge: increments and decrements, netted per flush."""

    __slots__ = ()

    def __init__(self, metric: Gauge) -> None:
        super().__init__(metric)

    def add(self, *labels: str, amount: float) -> None:
        self._add(labels, amount)


class BufferedHistogram(_Buffer):
    """``observe(value, *labels)`` on a Histogram."""

    __slots__ = ("_bounds",)

    def __init__(self, metric: Histogram) -> None:
        super().__init__(metric)
        # The parent of a labelled histogram keeps the bounds (+Inf last), as each child does.
        self._bounds: list[float] = list(metric._upper_bounds)

    def observe(self, value: float, *labels: str) -> None:
        _ensure_flusher()
        slot = bisect_left(self._bounds, value)  # first bound >= value, as Histogram.observe
        with _lock:
            counts = self._pending.get(labels)
            if counts is None:
                counts = self._pending[labels] = [0.0] * (len(self._bounds) + 1)
            counts[0] += value
            counts[slot + 1] += 1

    def _apply(self, pending: dict[tuple[str, ...], Any]) -> None:
        for labels, counts in pending.items():
            child = self._child(labels)
            child._sum.inc(counts[0])
            for i, n in enumerate(counts[1:]):
                if n:
                    child._buckets[i].inc(n)


def flush() -> None:
    """Write everything pending to prometheus_client now."""
    with _lock:
        work = [(b, b._take()) for b in _buffers if b._pending]
    for buffer, pending in work:
        buffer._apply(pending)


def _ensure_flusher() -> None:
    """Start this process's flushing thread on first use (again in a forked child)."""
    global _flusher_started
    if _flusher_started:
        return
    with _lock:
        if _flusher_started:
            return
        _flusher_started = True
    threading.Thread(target=_flush_forever, name="sharedcare-metrics-flush", daemon=True).start()


def _forked() -> None:
    """In a forked child: its parent's thread did not come along, and neither do its values."""
    global _flusher_started, _lock
    _flusher_started = False
    _lock = threading.Lock()
    for b in _buffers:
        b._pending = {}


def _flush_forever() -> None:
    stop = threading.Event()
    while not stop.wait(FLUSH_SECONDS):
        try:
            flush()
        except Exception:  # noqa: BLE001 - a metrics failure must never end the flushing
            import structlog

            structlog.get_logger("sharedcare.metrics").exception("metrics flush failed")


atexit.register(flush)
os.register_at_fork(after_in_child=_forked)
