"""Security signals of identity and access (REQUIREMENTS §3 and §6, "identity" row).

=============================================  =======  ==========================================
Metric                                         Type     Meaning
=============================================  =======  ==========================================
``sharedcare_iam_claims_total``                counter  Token requests (client assertions), by
                                               ``participant`` (client id, ``<unknown>`` for
                                               unregistered ones) and ``outcome``
                                               (accepted, rejected).
``sharedcare_iam_claim_rejections_total``      counter  Rejected assertions by ``reason``:
                                               bad_signature, expired, replayed_jti,
                                               unknown_client, suspended, bad_audience,
                                               bad_scope, malformed, jwks_unavailable.
``sharedcare_iam_duplicate_jti_total``         counter  Assertions whose ``jti`` was already used,
                                               by ``participant``.
``sharedcare_iam_expired_tokens_total``        counter  Requests made with an expired access token,
                                               by ``participant``.
``sharedcare_iam_requests_rejected_total``     counter  API requests refused, by ``reason``
                                               (invalid_token, expired_token, suspended,
                                               insufficient_scope, no_end_user, rate_limited).
=============================================  =======  ==========================================

Claims rejected (%) = rejected / all claims; duplicate jti (%) = duplicate / all claims.
Counters are created on first use so that importing this module does not fix the
prometheus_client process mode too early (see ``sharedcare.metrics.registry``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sharedcare.metrics.registry import lazy

if TYPE_CHECKING:
    from prometheus_client import Counter

UNKNOWN: Final = "<unknown>"
REJECTION_REASONS: Final = (
    "bad_signature", "expired", "replayed_jti", "unknown_client", "suspended",
    "bad_audience", "bad_scope", "malformed", "jwks_unavailable",
)
REQUEST_REJECTIONS: Final = (
    "invalid_token", "expired_token", "suspended", "insufficient_scope", "no_end_user",
    "rate_limited",
)


@dataclass(frozen=True, slots=True)
class IamMetrics:
    claims: Counter
    rejections: Counter
    duplicate_jti: Counter
    expired_tokens: Counter
    requests_rejected: Counter


def _create() -> IamMetrics:
    from prometheus_client import Counter

    metrics = IamMetrics(
        claims=Counter(
            "sharedcare_iam_claims", "Client assertions presented, by participant and outcome.",
            ["participant", "outcome"],
        ),
        rejections=Counter(
            "sharedcare_iam_claim_rejections", "Client assertions rejected, by reason.", ["reason"]
        ),
        duplicate_jti=Counter(
            "sharedcare_iam_duplicate_jti", "Client assertions replaying a used jti.", ["participant"]
        ),
        expired_tokens=Counter(
            "sharedcare_iam_expired_tokens", "Requests made with an expired access token.",
            ["participant"],
        ),
        requests_rejected=Counter(
            "sharedcare_iam_requests_rejected", "API requests refused by access control.", ["reason"]
        ),
    )
    for reason in REJECTION_REASONS:  # export every series at zero from the first scrape
        metrics.rejections.labels(reason=reason)
    for reason in REQUEST_REJECTIONS:
        metrics.requests_rejected.labels(reason=reason)
    return metrics


iam_metrics = lazy(_create)



def record_claim(participant: str | None, reason: str | None) -> None:
    """Count one assertion: accepted when ``reason`` is None, else rejected for ``reason``."""
    m = iam_metrics()
    who = participant or UNKNOWN
    m.claims.labels(participant=who, outcome="accepted" if reason is None else "rejected").inc()
    if reason is not None:
        m.rejections.labels(reason=reason).inc()
        if reason == "replayed_jti":
            m.duplicate_jti.labels(participant=who).inc()


def record_request_rejected(reason: str, participant: str | None = None) -> None:
    """Count one API request refused by access control."""
    m = iam_metrics()
    m.requests_rejected.labels(reason=reason).inc()
    if reason == "expired_token":
        m.expired_tokens.labels(participant=participant or UNKNOWN).inc()
