"""Metrics of the synchronous federated query (REQUIREMENTS §6, "sync query" and "per provider" rows).

==================================================  =========  ===========================================
Metric                                              Type       Meaning
==================================================  =========  ===========================================
``sharedcare_query_requests_total``                 counter    Federated queries and proxied reads, by
                                                               ``consumer`` (client id) and ``outcome``:
                                                               complete, partial (a provider impaired),
                                                               no_data (every provider impaired),
                                                               unknown_person, rejected (4xx), error.
                                                               Query rate per consumer = rate() by
                                                               consumer.
``sharedcare_query_internal_round_trip_seconds``    histogram  The hub's own time per query: receipt →
                                                               last provider request sent, plus last
                                                               provider answer → response ready (audit
                                                               included). Average = sum / count.
``sharedcare_query_internal_round_trip_max_seconds`` gauge     Largest internal round trip of the last
                                                               10 minutes (max over live processes).
``sharedcare_query_provider_round_trip_seconds``    histogram  External round trip per ``provider``:
                                                               request sent → last byte of the answer
                                                               read, or the failure (parsing it is
                                                               the hub's time).
``sharedcare_query_provider_round_trip_max_seconds`` gauge     Largest external round trip of the last
                                                               10 minutes, by ``provider``.
``sharedcare_query_provider_requests_total``        counter    Requests to providers by ``provider`` and
                                                               ``outcome``: ok, timeout, unavailable
                                                               (connection failed), error (HTTP error),
                                                               invalid (not FHIR), circuit_open.
                                                               Failures % = non-ok / all.
``sharedcare_query_no_response_total``              counter    Queries that returned no data, by
                                                               ``reason``: hub_error (the hub failed,
                                                               5xx) and all_providers_failed.
``sharedcare_query_resources_per_response``         histogram  Resources in each merged page.
``sharedcare_query_response_bytes``                 histogram  Size of each merged page (page sizes).
``sharedcare_query_providers_per_query``            histogram  Providers asked per query: the
                                                               aggregation multiplier is sum / count.
==================================================  =========  ===========================================

Values are added up in the process and written to the shared values once a second
(:mod:`sharedcare.metrics.buffer`). Created on first use, so importing this module does not fix prometheus_client's process
mode too early (see ``sharedcare.metrics.registry``).
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sharedcare.metrics.buffer import BufferedCounter, BufferedHistogram
from sharedcare.metrics.registry import lazy

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

PROVIDER_OUTCOMES: Final = ("ok", "timeout", "unavailable", "error", "invalid", "circuit_open")
QUERY_OUTCOMES: Final = ("complete", "partial", "no_data", "unknown_person", "rejected", "error")
LATENCY_BUCKETS: Final = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0,
)  # fmt: skip
# The hub's own time is milliseconds: finer edges around the 10 ms target at half of
# saturation (issue 6), so a quantile near it is not interpolated across 10-25 ms.
INTERNAL_BUCKETS: Final = (
    0.001, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
RESOURCE_BUCKETS: Final = (0, 1, 5, 10, 20, 40, 60, 100, 200, 500, 1000)
BYTES_BUCKETS: Final = (1e3, 1e4, 5e4, 1e5, 2e5, 5e5, 1e6, 5e6)
FANOUT_BUCKETS: Final = (0, 1, 2, 3, 4, 5, 8, 12, 20)
WINDOW_SECONDS: Final = 600.0  # REQUIREMENTS §6: the sync-query measures use 10-minute windows


@dataclass(frozen=True, slots=True)
class QueryMetrics:
    requests: Counter
    internal: Histogram
    internal_max: Gauge
    provider: Histogram
    provider_max: Gauge
    provider_requests: Counter
    no_response: Counter
    resources: Histogram
    response_bytes: Histogram
    fanout: Histogram


def _create() -> QueryMetrics:
    from prometheus_client import Counter, Gauge, Histogram

    return QueryMetrics(
        requests=Counter(
            "sharedcare_query_requests",
            "Federated queries, by consumer and outcome.",
            ["consumer", "outcome"],
        ),
        internal=Histogram(
            "sharedcare_query_internal_round_trip_seconds",
            "The hub's own time per federated query, excluding the wait for providers.",
            buckets=INTERNAL_BUCKETS,
        ),
        internal_max=Gauge(
            "sharedcare_query_internal_round_trip_max_seconds",
            "Largest internal round trip of the last 10 minutes.",
            multiprocess_mode="livemax",
        ),
        provider=Histogram(
            "sharedcare_query_provider_round_trip_seconds",
            "External round trip to each provider.",
            ["provider"],
            buckets=LATENCY_BUCKETS,
        ),
        provider_max=Gauge(
            "sharedcare_query_provider_round_trip_max_seconds",
            "Largest external round trip of the last 10 minutes, by provider.",
            ["provider"],
            multiprocess_mode="livemax",
        ),
        provider_requests=Counter(
            "sharedcare_query_provider_requests",
            "Requests to providers, by provider and outcome.",
            ["provider", "outcome"],
        ),
        no_response=Counter(
            "sharedcare_query_no_response", "Queries that returned no data, by reason.", ["reason"]
        ),
        resources=Histogram(
            "sharedcare_query_resources_per_response",
            "Resources per merged page.",
            buckets=RESOURCE_BUCKETS,
        ),
        response_bytes=Histogram(
            "sharedcare_query_response_bytes", "Bytes per merged page.", buckets=BYTES_BUCKETS
        ),
        fanout=Histogram(
            "sharedcare_query_providers_per_query",
            "Providers asked per query.",
            buckets=FANOUT_BUCKETS,
        ),
    )


query_metrics = lazy(_create)


class WindowMax:
    """The largest value seen in the last ``window`` seconds, kept in one-minute buckets."""

    def __init__(self, window: float = WINDOW_SECONDS, buckets: int = 10) -> None:
        self.width = window / buckets
        self.buckets = buckets
        self._values: dict[str, dict[int, float]] = defaultdict(dict)

    def observe(self, key: str, value: float, now: float | None = None) -> None:
        slot = int((now if now is not None else time.monotonic()) // self.width)
        slots = self._values[key]
        if value > slots.get(slot, 0.0):
            slots[slot] = value
        if len(slots) > self.buckets + 1:
            for old in [s for s in slots if s <= slot - self.buckets]:
                del slots[old]

    def current(self, now: float | None = None) -> dict[str, float]:
        slot = int((now if now is not None else time.monotonic()) // self.width)
        return {
            key: max((v for s, v in slots.items() if s > slot - self.buckets), default=0.0)
            for key, slots in self._values.items()
        }


_internal_max = WindowMax()
_provider_max = WindowMax()


@dataclass(frozen=True, slots=True)
class _Hot:
    """The per-query values, buffered in-process (sharedcare.metrics.buffer)."""

    requests: BufferedCounter
    internal: BufferedHistogram
    provider: BufferedHistogram
    provider_requests: BufferedCounter
    no_response: BufferedCounter
    resources: BufferedHistogram
    response_bytes: BufferedHistogram
    fanout: BufferedHistogram


def _create_hot() -> _Hot:
    m = query_metrics()
    return _Hot(
        BufferedCounter(m.requests),
        BufferedHistogram(m.internal),
        BufferedHistogram(m.provider),
        BufferedCounter(m.provider_requests),
        BufferedCounter(m.no_response),
        BufferedHistogram(m.resources),
        BufferedHistogram(m.response_bytes),
        BufferedHistogram(m.fanout),
    )


_hot = lazy(_create_hot)


def record_provider(provider: str, outcome: str, seconds: float | None) -> None:
    """One request to a provider: its outcome and, unless it was never sent, its round trip."""
    m = _hot()
    m.provider_requests.inc(provider, outcome)
    if seconds is not None:
        m.provider.observe(seconds, provider)
        _provider_max.observe(provider, seconds)


def record_query(
    consumer: str,
    outcome: str,
    *,
    internal: float | None = None,
    resources: int | None = None,
    size: int | None = None,
    providers: int | None = None,
) -> None:
    """One federated query or proxied read as the consumer saw it."""
    m = _hot()
    m.requests.inc(consumer, outcome)
    if internal is not None:
        m.internal.observe(internal)
        _internal_max.observe("", internal)
    if resources is not None:
        m.resources.observe(resources)
    if size is not None:
        m.response_bytes.observe(size)
    if providers is not None:
        m.fanout.observe(providers)
    if outcome == "no_data":
        m.no_response.inc("all_providers_failed")
    elif outcome == "error":
        m.no_response.inc("hub_error")


def refresh_maxima() -> None:
    """Publish the 10-minute maxima (called every few seconds by the query lifespan)."""
    m = query_metrics()
    m.internal_max.set(_internal_max.current().get("", 0.0))
    for provider, value in _provider_max.current().items():
        m.provider_max.labels(provider=provider).set(value)
