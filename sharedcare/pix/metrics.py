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
``sharedcare_pix_registrations_total``         counter    Registrations received, by ``provider``
                                                          (client id) and ``outcome``: created,
                                                          updated, unchanged, refused.
``sharedcare_pix_registrations_failed_total``  counter    Refused registrations, by ``provider``
                                                          and ``reason``: malformed,
                                                          not_provider, foreign_system,
                                                          invalid_nhs_number,
                                                          missing_demographics, conflict.
``sharedcare_pix_people``                      gauge      People in the index (merged-away
                                                          records excluded), refreshed every
                                                          ``SHAREDCARE_PIX_COUNT_SECONDS``.
``sharedcare_pix_linkages``                    gauge      Linkages by ``status`` (pending,
                                                          unverified, verified, mismatch,
                                                          not_found, error, unlinked).
``sharedcare_pix_queries_total``               counter    ``$ihe-pix`` queries, by ``outcome``
                                                          (ok, not_found, unknown_source,
                                                          unknown_target, invalid).
``sharedcare_pix_availability_requests_total`` counter   ``$data-availability`` requests, by
                                                          ``consumer`` (client id) and
                                                          ``outcome`` (ok, not_found, refused,
                                                          invalid).
=============================================  =========  ========================================

Failed registrations (%) = failed / registrations (outcome refused is counted in both), over
10 min; alert above 1%.

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
    from prometheus_client import Counter, Gauge, Histogram

TRACE_OUTCOMES: Final = ("verified", "mismatch", "not_found", "transient_error", "permanent_error")
# PDS answers in tens of milliseconds when healthy; the tracer's default timeout is 5 s.
TRACE_DURATION_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class PixMetrics:
    tracing_results: Counter
    tracing_duration: Histogram
    registrations: Counter
    registrations_failed: Counter
    people: Gauge
    linkages: Gauge
    queries: Counter
    availability: Counter


def _create() -> PixMetrics:
    from prometheus_client import Counter, Gauge, Histogram

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
        registrations=Counter(
            "sharedcare_pix_registrations",
            "Registrations received, by provider and outcome.",
            ["provider", "outcome"],
        ),
        registrations_failed=Counter(
            "sharedcare_pix_registrations_failed",
            "Refused registrations, by provider and reason.",
            ["provider", "reason"],
        ),
        # Every process refreshes the same database counts: report the latest, not a sum.
        people=Gauge(
            "sharedcare_pix_people", "People in the index.", multiprocess_mode="mostrecent"
        ),
        linkages=Gauge(
            "sharedcare_pix_linkages",
            "Linkages by status.",
            ["status"],
            multiprocess_mode="mostrecent",
        ),
        queries=Counter("sharedcare_pix_queries", "$ihe-pix queries, by outcome.", ["outcome"]),
        availability=Counter(
            "sharedcare_pix_availability_requests",
            "$data-availability requests, by consumer and outcome.",
            ["consumer", "outcome"],
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


def record_registration(
    provider: str, outcome: str, reason: str | None = None, count: int = 1
) -> None:
    """Count ``count`` registrations; ``reason`` (a failure reason) when refused."""
    m = pix_metrics()
    m.registrations.labels(provider=provider, outcome=outcome).inc(count)
    if reason is not None:
        m.registrations_failed.labels(provider=provider, reason=reason).inc(count)


def record_query(outcome: str) -> None:
    pix_metrics().queries.labels(outcome=outcome).inc()


def record_availability(consumer: str, outcome: str) -> None:
    pix_metrics().availability.labels(consumer=consumer, outcome=outcome).inc()


def set_counts(people: int, linkages: dict[str, int], statuses: tuple[str, ...]) -> None:
    m = pix_metrics()
    m.people.set(people)
    for status in statuses:
        m.linkages.labels(status=status).set(linkages.get(status, 0))
