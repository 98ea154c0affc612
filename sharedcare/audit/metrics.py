"""Prometheus metrics of the audit trail (created lazily, like sharedcare.metrics.registry).

======================================================  =========  =======================================
Metric                                                  Type       Meaning
======================================================  =========  =======================================
``sharedcare_audit_records_total``                      counter    AuditEvents committed, by ``outcome``
                                                                   (0 released, 4 refused, 8, 12).
``sharedcare_audit_write_failures_total``               counter    Audit records not written because the
                                                                   database failed or was too far behind
                                                                   (each a request answered 503); alert
                                                                   on any increase.
``sharedcare_audit_abandoned_total``                    counter    Release records not written: their
                                                                   caller gave up first (timeout, client
                                                                   gone) and released nothing.
``sharedcare_audit_flush_batch_size``                   histogram  Records per group-commit transaction.
``sharedcare_audit_flush_duration_seconds``             histogram  Wall time of one group-commit
                                                                   transaction.
``sharedcare_audit_record_duration_seconds``            histogram  Time a request waits for its event
                                                                   to be durable, plus building it: the
                                                                   latency audit adds (target p99 2 ms).
``sharedcare_audit_pending``                            gauge      Records waiting for a flush.
``sharedcare_audit_wal_waits_total``                    counter    SQLite only: flushes that waited for a
                                                                   checkpoint because the write-ahead log
                                                                   passed twice its limit (the disk is
                                                                   slower than the audit writes).
======================================================  =========  =======================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sharedcare.metrics.buffer import BufferedCounter, BufferedHistogram
from sharedcare.metrics.registry import lazy

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

__all__ = ["AuditMetrics", "HotAuditMetrics", "get_audit_metrics", "hot_audit_metrics"]

BATCH_BUCKETS: Final = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
# 0.25 ms .. 5 s: a group commit is ~1 ms; seconds mean the database is in trouble.
LATENCY_BUCKETS: Final = (
    0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
)


@dataclass(frozen=True, slots=True)
class AuditMetrics:
    records_total: Counter
    write_failures_total: Counter
    abandoned_total: Counter
    flush_batch_size: Histogram
    flush_duration_seconds: Histogram
    record_duration_seconds: Histogram
    pending: Gauge
    wal_waits_total: Counter


def _create() -> AuditMetrics:
    from prometheus_client import Counter, Gauge, Histogram

    return AuditMetrics(
        records_total=Counter(
            "sharedcare_audit_records_total",
            "AuditEvents committed, by outcome (0 released, 4 refused, 8 and 12 failures).",
            ["outcome"],
        ),
        write_failures_total=Counter(
            "sharedcare_audit_write_failures_total",
            "Audit records not written (database failed or too far behind); each was answered 503.",
        ),
        abandoned_total=Counter(
            "sharedcare_audit_abandoned_total",
            "Release records dropped because their caller gave up and released nothing.",
        ),
        flush_batch_size=Histogram(
            "sharedcare_audit_flush_batch_size",
            "Audit records written per group-commit transaction.",
            buckets=BATCH_BUCKETS,
        ),
        flush_duration_seconds=Histogram(
            "sharedcare_audit_flush_duration_seconds",
            "Wall time of one audit group-commit transaction, in seconds.",
            buckets=LATENCY_BUCKETS,
        ),
        record_duration_seconds=Histogram(
            "sharedcare_audit_record_duration_seconds",
            "Time a request waits for its audit record to be durable, in seconds.",
            buckets=LATENCY_BUCKETS,
        ),
        pending=Gauge(
            "sharedcare_audit_pending",
            "Audit records waiting for a group commit.",
            multiprocess_mode="livesum",
        ),
        wal_waits_total=Counter(
            "sharedcare_audit_wal_waits_total",
            "SQLite audit flushes that waited for a write-ahead log checkpoint (the disk is behind).",
        ),
    )


get_audit_metrics = lazy(_create)


@dataclass(frozen=True, slots=True)
class HotAuditMetrics:
    """The per-record and per-flush values, buffered in-process (sharedcare.metrics.buffer)."""

    records_total: BufferedCounter
    flush_batch_size: BufferedHistogram
    flush_duration_seconds: BufferedHistogram
    record_duration_seconds: BufferedHistogram


def _create_hot() -> HotAuditMetrics:
    m = get_audit_metrics()
    return HotAuditMetrics(
        BufferedCounter(m.records_total),
        BufferedHistogram(m.flush_batch_size),
        BufferedHistogram(m.flush_duration_seconds),
        BufferedHistogram(m.record_duration_seconds),
    )


hot_audit_metrics = lazy(_create_hot)

