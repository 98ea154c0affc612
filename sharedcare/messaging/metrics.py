"""Metrics of reliable messaging (REQUIREMENTS §6, "messaging" rows).

==================================================  =========  =============================================
Metric                                              Type       Meaning
==================================================  =========  =============================================
``sharedcare_messaging_received_total``             counter    ``$process-message`` calls by ``sender`` and
                                                               ``outcome`` (accepted, duplicate): throughput
                                                               by sender. A duplicate is a resent Bundle.id.
``sharedcare_messaging_accept_duration_seconds``    histogram  Request received → message durable (the hub's
                                                               answer time).
``sharedcare_messaging_internal_latency_seconds``   histogram  Message durable → first delivery attempt sent
                                                               (push) : the hub's own queueing time. Alert
                                                               when the 10-minute average exceeds 1 s.
``sharedcare_messaging_delivery_latency_seconds``   histogram  Accepted → delivered (2xx from a push, or the
                                                               mailbox acknowledgement), by ``recipient``.
``sharedcare_messaging_queue_size``                 gauge      Messages not yet delivered, by ``recipient``
                                                               (refreshed every 10 s by each hub process).
``sharedcare_messaging_delivery_attempts``          histogram  Push attempts a message needed, observed when
                                                               it is delivered or dead-lettered.
``sharedcare_messaging_attempts_total``             counter    Push attempts by ``recipient`` and ``outcome``
                                                               (delivered, failed).
``sharedcare_messaging_acknowledged_total``         counter    Responses received for messages, by ``code``
                                                               and ``first_delivery`` (true when the message
                                                               was delivered once and never resent).
``sharedcare_messaging_dead_letters_total``         counter    Messages dead-lettered, by ``recipient``.
==================================================  =========  =============================================

Efficiency (the share acknowledged at the first delivery) =
``acknowledged_total{first_delivery="true"} / acknowledged_total``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sharedcare.metrics.registry import lazy

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS: Final = (
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
    15.0,
    60.0,
    300.0,
    3600.0,
)
ATTEMPT_BUCKETS: Final = (1, 2, 3, 5, 10, 20, 50, 100)


@dataclass(frozen=True, slots=True)
class MessagingMetrics:
    received: Counter
    accept_duration: Histogram
    internal_latency: Histogram
    delivery_latency: Histogram
    queue_size: Gauge
    delivery_attempts: Histogram
    attempts: Counter
    acknowledged: Counter
    dead_letters: Counter


def _create() -> MessagingMetrics:
    from prometheus_client import Counter, Gauge, Histogram

    return MessagingMetrics(
        received=Counter(
            "sharedcare_messaging_received",
            "$process-message calls by sender and outcome.",
            ["sender", "outcome"],
        ),
        accept_duration=Histogram(
            "sharedcare_messaging_accept_duration_seconds",
            "Request received to message durable.",
            buckets=LATENCY_BUCKETS,
        ),
        internal_latency=Histogram(
            "sharedcare_messaging_internal_latency_seconds",
            "Message durable to first delivery attempt sent.",
            buckets=LATENCY_BUCKETS,
        ),
        delivery_latency=Histogram(
            "sharedcare_messaging_delivery_latency_seconds",
            "Accepted to delivered, by recipient.",
            ["recipient"],
            buckets=LATENCY_BUCKETS,
        ),
        queue_size=Gauge(
            "sharedcare_messaging_queue_size",
            "Messages not yet delivered, by recipient.",
            ["recipient"],
            multiprocess_mode="livemax",
        ),
        delivery_attempts=Histogram(
            "sharedcare_messaging_delivery_attempts",
            "Push attempts a message needed.",
            buckets=ATTEMPT_BUCKETS,
        ),
        attempts=Counter(
            "sharedcare_messaging_attempts",
            "Push attempts by recipient and outcome.",
            ["recipient", "outcome"],
        ),
        acknowledged=Counter(
            "sharedcare_messaging_acknowledged",
            "Responses received for messages, by code and whether the first delivery was acknowledged.",
            ["code", "first_delivery"],
        ),
        dead_letters=Counter(
            "sharedcare_messaging_dead_letters",
            "Messages dead-lettered, by recipient.",
            ["recipient"],
        ),
    )


messaging_metrics = lazy(_create)
