"""Metrics of the patient index (REQUIREMENTS §6, "index" row).

=============================================  =========  ========================================
Metric                                         Type       Meaning
=============================================  =========  ========================================
``sharedcare_pix_tracing_results_total``       counter    Tracing attempts against PDS, by
                                                          ``outcome``: verified, mismatch,
                                                          not_found, transient_error,
                                                          permanent_error. Every retry of a
                                                          transient error counts again.
``sharedcare_pix_tracing_duration_seconds``    histogram  Wall time of one tracing request to
                                                          PDS (request sent → body read or
                                                          failure), by ``outcome``; buckets
                                                          5 ms .. 10 s.
=============================================  =========  ========================================

Tracing errors (%) = (transient_error + permanent_error) / all results, over 1 h; alert
above 1%. NHS numbers that fail Modulus 11 are refused before any request and are not
counted here (they are failed registrations, not tracing errors).

Metrics are created on first use, so importing this module does not fix the
prometheus_client process mode too early (see ``sharedcare.metrics.registry``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sharedcare.metrics.registry import lazy

if TYPE_CHECKING:
    from prometheus_client import Counter, Histogram

TRACE_OUTCOMES: Final = ("verified", "mismatch", "not_found", "transient_error", "permanent_error")
# PDS answers in tens of milliseconds when healthy; the tracer's default timeout is 5 s.
TRACE_DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class PixMetrics:
    tracing_results: Counter
    tracing_duration: Histogram


def _create() -> PixMetrics:
    from prometheus_client import Counter, Histogram

    metrics = PixMetrics(
        tracing_results=Counter(
            "sharedcare_pix_tracing_results",
            "Tracing attempts against PDS, by outcome.",
            ["outcome"],
        ),
        tracing_duration=Histogram(
            "sharedcare_pix_tracing_duration_seconds",
            "Duration of one tracing request to PDS, by outcome.",
            ["outcome"],
            buckets=TRACE_DURATION_BUCKETS,
        ),
    )
    for outcome in TRACE_OUTCOMES:  # export every series at zero from the first scrape
        metrics.tracing_results.labels(outcome=outcome)
    return metrics


pix_metrics = lazy(_create)



def record_trace(outcome: str, latency_s: float) -> None:
    """Count one tracing attempt and its duration."""
    if outcome not in TRACE_OUTCOMES:
        raise ValueError(f"not a tracing outcome: {outcome!r}")
    m = pix_metrics()
    m.tracing_results.labels(outcome=outcome).inc()
    m.tracing_duration.labels(outcome=outcome).observe(latency_s)
