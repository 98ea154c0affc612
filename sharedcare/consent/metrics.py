"""Consent metrics (REQUIREMENTS §6, "consent" row) and the consent-record census.

===================================================  =======  ==========================================
Metric                                               Type     Meaning
===================================================  =======  ==========================================
``sharedcare_consent_resources_tested_total``        counter  Resources put through a consent decision,
                                                              by ``resource_type``.
``sharedcare_consent_resources_withheld_total``      counter  Resources withheld, by ``resource_type``
                                                              and ``rule`` (a rule id of the policy
                                                              file, or ``consent``, ``default``,
                                                              ``malformed``).
``sharedcare_consent_resources_qualified_total``     counter  Resources released with a qualification
                                                              (extra security labels), by
                                                              ``resource_type`` and ``rule``.
``sharedcare_consent_reviews_total``                 counter  Releases flagged for review (e.g. an
                                                              emergency override of an opt-out), by
                                                              ``rule``.
``sharedcare_consent_records``                       gauge    Active patient-privacy Consent records in
                                                              the store, by ``policy`` (policyRule:
                                                              OPTIN, OPTINR, OPTOUT, OPTOUTE, other,
                                                              none); set by :func:`refresh_consent_records`.
``sharedcare_consent_policy_reloads_total``          counter  Policy reloads, by ``outcome`` (ok, failed).
``sharedcare_consent_policy_info``                   gauge    1 for the policy in force in each process, by
                                                              ``version`` and ``digest`` (first 12 hex).
===================================================  =======  ==========================================

Withheld % over an hour::

    100 * sum(rate(sharedcare_consent_resources_withheld_total[1h]))
        / sum(rate(sharedcare_consent_resources_tested_total[1h]))

Labels stay bounded: ``resource_type`` is an R4 type name or ``<other>``/``<malformed>``,
``rule`` comes from the policy file. Counters are created on first use so that importing
this module does not fix the prometheus_client process mode (``sharedcare.metrics.registry``).
"""

from __future__ import annotations

import atexit
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from sharedcare.metrics.registry import lazy

if TYPE_CHECKING:
    from prometheus_client import Counter, Gauge

    from sharedcare.consent.model import Decision
    from sharedcare.store.repository import Store

POLICY_LABELS: Final = ("OPTIN", "OPTINR", "OPTOUT", "OPTOUTE", "other", "none")
OTHER_TYPE: Final = "<other>"


@dataclass(frozen=True, slots=True)
class ConsentMetrics:
    tested: Counter
    withheld: Counter
    qualified: Counter
    reviews: Counter
    records: Gauge
    reloads: Counter
    policy: Gauge


def _create() -> ConsentMetrics:
    from prometheus_client import Counter, Gauge

    return ConsentMetrics(
        tested=Counter(
            "sharedcare_consent_resources_tested",
            "Resources put through a consent decision, by resource type.",
            ["resource_type"],
        ),
        withheld=Counter(
            "sharedcare_consent_resources_withheld",
            "Resources withheld by consent or policy, by resource type and rule.",
            ["resource_type", "rule"],
        ),
        qualified=Counter(
            "sharedcare_consent_resources_qualified",
            "Resources released with a qualification (security labels), by resource type and rule.",
            ["resource_type", "rule"],
        ),
        reviews=Counter(
            "sharedcare_consent_reviews",
            "Releases flagged for review (e.g. emergency override of an opt-out), by rule.",
            ["rule"],
        ),
        records=Gauge(
            "sharedcare_consent_records",
            "Active patient-privacy Consent records in the store, by policyRule.",
            ["policy"],
            # Set from a count query by whichever process ran it last.
            multiprocess_mode="mostrecent",
        ),
        reloads=Counter(
            "sharedcare_consent_policy_reloads",
            "Consent policy reloads, by outcome (ok, failed).",
            ["outcome"],
        ),
        policy=Gauge(
            "sharedcare_consent_policy_info",
            "The consent policy in force (1), by version and digest.",
            ["version", "digest"],
            multiprocess_mode="liveall",
        ),
    )


consent_metrics = lazy(_create)



def _type_label(rtype: str) -> str:
    from sharedcare.store.searchparams import r4_resource_types

    if rtype.startswith("<") or rtype in r4_resource_types():
        return rtype
    return OTHER_TYPE  # a provider's invented type must not mint a new series


# Decisions are tallied per filter() call, merged here, and written to prometheus_client at
# most once a second: a labelled child lookup plus a locked increment costs microseconds, which
# per 40-resource response would be a tenth of the engine's whole budget. A timer writes what is
# still pending a second later, so counts lag a scrape by at most about FLUSH_SECONDS even when
# traffic stops; a process killed by a signal loses at most that much.
FLUSH_SECONDS: Final = 1.0
_pending: dict[tuple[str, str, Decision, bool], int] = {}
_pending_lock = threading.Lock()
_last_flush = 0.0
_timer: threading.Timer | None = None
_children: dict[tuple[str, str, Decision, bool], tuple[Any, ...]] = {}


def record_decisions(tally: Mapping[tuple[str, str, Decision, bool], int]) -> None:
    """Count decisions, aggregated per (resource type, rule, decision, review) by the caller."""
    global _last_flush, _timer
    now = time.monotonic()
    timer = None
    with _pending_lock:
        for key, n in tally.items():
            _pending[key] = _pending.get(key, 0) + n
        due = now - _last_flush >= FLUSH_SECONDS
        if due:
            _last_flush = now
        elif _timer is None:
            timer = _timer = threading.Timer(FLUSH_SECONDS, _timed_flush)
            timer.daemon = True
    if due:
        flush_decisions()
    elif timer is not None:
        timer.start()


def _timed_flush() -> None:
    global _timer
    with _pending_lock:
        _timer = None
    flush_decisions()


def flush_decisions() -> None:
    """Write pending decision counts to the counters now (also run at interpreter exit)."""
    with _pending_lock:
        if not _pending:
            return
        pending = dict(_pending)
        _pending.clear()
    for key, n in pending.items():
        for child in _children.get(key) or _bind(key):
            child.inc(n)


def _bind(key: tuple[str, str, Decision, bool]) -> tuple[Any, ...]:
    """The counter children one tally key increments (cached: label lookups are not free)."""
    from sharedcare.consent.model import Decision

    rtype, rule, decision, review = key
    m = consent_metrics()
    label = _type_label(rtype)
    children: list[Any] = [m.tested.labels(label)]
    if decision is Decision.WITHHOLD:
        children.append(m.withheld.labels(label, rule))
    elif decision is Decision.QUALIFY:
        children.append(m.qualified.labels(label, rule))
    if review:
        children.append(m.reviews.labels(rule))
    if len(_children) < 10_000:  # bounded by types x rules; the cap only guards against surprises
        _children[key] = tuple(children)
    return tuple(children)


atexit.register(flush_decisions)


def record_reload(*, ok: bool) -> None:
    consent_metrics().reloads.labels("ok" if ok else "failed").inc()


_in_force: tuple[str, str] | None = None


def record_policy_in_force(version: str, digest: str) -> None:
    """Show which policy this process decides with (the previous one's series is removed)."""
    global _in_force
    gauge = consent_metrics().policy
    labels = (version, digest[:12])
    if _in_force is not None and _in_force != labels:
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ or "prometheus_multiproc_dir" in os.environ:
            gauge.labels(*_in_force).set(0)  # multiprocess mode cannot remove a series
        else:
            try:
                gauge.remove(*_in_force)
            except KeyError:
                pass
    gauge.labels(*labels).set(1)
    _in_force = labels


def policy_label(raw: Mapping[str, Any]) -> str:
    """The ``policy`` label of one Consent resource."""
    from sharedcare.consent.records import policy_rule

    try:
        rule = policy_rule(dict(raw))
    except (AttributeError, TypeError):
        return "other"
    if rule is None:
        return "none"
    return rule if rule in POLICY_LABELS else "other"


async def count_consents_by_policy(store: Store, *, page_size: int = 1000) -> dict[str, int]:
    """Active patient-privacy Consent records in ``store``, by policyRule.

    Pages through the store's search (``status=active``, ``scope=patient-privacy``) by
    keyset cursor and reads each record's ``policyRule``: R4 defines no search parameter on
    policyRule, so the index tables cannot group by it. At 600,000 records (10% of the
    population) that is 600 pages; run it every few minutes, not per scrape.
    """
    import orjson

    from sharedcare.consent.model import CONSENT_SCOPE
    from sharedcare.store.search import run_search
    from sharedcare.store.search_parse import parse_search

    counts = dict.fromkeys(POLICY_LABELS, 0)
    base = [
        ("status", "active"),
        ("scope", f"{CONSENT_SCOPE}|patient-privacy"),
        ("_count", str(page_size)),
        ("_total", "none"),
    ]
    cursor: str | None = None
    while True:
        items = base + ([("_cursor", cursor)] if cursor else [])
        plan = parse_search(
            "Consent", items, store.params["Consent"],
            default_count=page_size, max_count=page_size, all_params=store.params,
        )
        page = await run_search(store.db, plan, "")
        for hit in page.matches:
            counts[policy_label(orjson.loads(hit.body))] += 1
        if not page.next_cursor or not page.matches:
            return counts
        cursor = page.next_cursor


def record_consent_counts(counts: Mapping[str, int]) -> None:
    """Set the ``sharedcare_consent_records`` gauge from :func:`count_consents_by_policy`."""
    gauge = consent_metrics().records
    for label in POLICY_LABELS:
        gauge.labels(label).set(counts.get(label, 0))


async def refresh_consent_records(store: Store) -> dict[str, int]:
    """Count the store's consent records by policy and set the gauge; returns the counts."""
    counts = await count_consents_by_policy(store)
    record_consent_counts(counts)
    return counts
