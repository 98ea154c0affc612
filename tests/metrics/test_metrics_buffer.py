"""Buffered hot-path metrics expose exactly what unbuffered prometheus_client calls would."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from sharedcare.metrics import buffer

BUCKETS = (0.001, 0.01, 0.1, 1.0, 5.0)
values = st.floats(min_value=0, max_value=20, allow_nan=False) | st.sampled_from(BUCKETS)
labels = st.sampled_from(["gp-1", "acute-2", "mh-3"])


def _pair(
    kind: type, name: str, **kw: object
) -> tuple[Any, Any, CollectorRegistry, CollectorRegistry]:
    """The same metric twice, each in its own registry: one used directly, one buffered."""
    r1, r2 = CollectorRegistry(), CollectorRegistry()
    return kind(name, "d", registry=r1, **kw), kind(name, "d", registry=r2, **kw), r1, r2


def _exposition(registry: CollectorRegistry) -> list[str]:
    # _created timestamps differ between the two registries; everything else must match.
    return [
        line for line in generate_latest(registry).decode().splitlines() if "_created" not in line
    ]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(values, labels), max_size=40))
def test_a_buffered_histogram_exposes_what_observe_would(
    observations: list[tuple[float, str]],
) -> None:
    direct, hist, r1, r2 = _pair(Histogram, "rt_seconds", labelnames=["provider"], buckets=BUCKETS)
    buffered = buffer.BufferedHistogram(hist)
    for value, provider in observations:
        direct.labels(provider).observe(value)
        buffered.observe(value, provider)
    buffer.flush()
    got, want = _exposition(r2), _exposition(r1)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if g.startswith("rt_seconds_sum"):  # summed in another order: equal to rounding
            assert g.split("{")[0] == w.split("{")[0]
            assert math.isclose(
                float(g.rsplit(" ", 1)[1]), float(w.rsplit(" ", 1)[1]), rel_tol=1e-9
            )
        else:
            assert g == w


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(labels, st.integers(min_value=1, max_value=5)), max_size=30))
def test_buffered_counters_and_gauges_add_up_like_direct_ones(incs: list[tuple[str, int]]) -> None:
    direct, counter, r1, r2 = _pair(Counter, "asked", labelnames=["provider"])
    gdirect, gauge, g1, g2 = _pair(Gauge, "in_flight")
    bc = buffer.BufferedCounter(counter)
    bg = buffer.BufferedGauge(gauge)
    for provider, n in incs:
        direct.labels(provider).inc(n)
        bc.inc(provider, amount=n)
        gdirect.inc(n)
        bg.add(amount=n)
        gdirect.dec(1)
        bg.add(amount=-1)
    buffer.flush()
    assert _exposition(r2) == _exposition(r1)
    assert _exposition(g2) == _exposition(g1)


def test_pending_values_are_written_within_a_second_and_at_exit(tmp_path: Path) -> None:
    """A process records and exits: its values reach the shared files (flush thread, atexit)."""
    script = textwrap.dedent(
        f"""
        import os, time
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = {str(tmp_path)!r}
        from prometheus_client import Counter, CollectorRegistry
        from prometheus_client.multiprocess import MultiProcessCollector
        from prometheus_client import generate_latest
        from sharedcare.metrics.buffer import BufferedCounter, FLUSH_SECONDS

        c = BufferedCounter(Counter("timed", "t"))
        c.inc(amount=3)
        time.sleep(FLUSH_SECONDS * 2.5)  # the flushing thread writes it
        r = CollectorRegistry(); MultiProcessCollector(r, path={str(tmp_path)!r})
        print("timed", [l for l in generate_latest(r).decode().splitlines() if l.startswith("timed_total")])
        BufferedCounter(Counter("at_exit", "t")).inc(amount=7)  # written only by the atexit flush
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert "timed_total 3.0" in out.stdout
    check = textwrap.dedent(
        f"""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector
        r = CollectorRegistry(); MultiProcessCollector(r, path={str(tmp_path)!r})
        print(generate_latest(r).decode())
        """
    )
    exposed = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "at_exit_total 7.0" in exposed
    assert "timed_total 3.0" in exposed
