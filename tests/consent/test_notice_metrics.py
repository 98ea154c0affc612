"""What the consumer is told when data is withheld, and what operators can count."""

from __future__ import annotations

from pathlib import Path

import pytest
from consent.builders import NOW, consent, ctx, resource
from prometheus_client import REGISTRY

from sharedcare.consent import PolicySet, withheld_notice, withheld_outcome
from sharedcare.consent.metrics import (
    count_consents_by_policy,
    flush_decisions,
    record_consent_counts,
)


def test_withheld_notice_says_that_data_was_withheld_and_nothing_more() -> None:
    issue = withheld_notice(3)
    assert issue["severity"] == "warning"
    assert issue["code"] == "suppressed"  # R4 issue-type
    assert issue["details"]["coding"] == [
        {"system": "https://sharedcare.example.org/fhir/CodeSystem/issue", "code": "consent-withheld"}
    ]
    assert issue["diagnostics"].startswith("3 resources were withheld")
    outcome = withheld_outcome(1)
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["diagnostics"].startswith("1 resource was withheld")
    with pytest.raises(ValueError):
        withheld_notice(0)


def _value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_decisions_are_counted_by_type_and_rule() -> None:
    decider = PolicySet.default().decider(ctx(role="R8010"), [consent("OPTOUT")], now=NOW)
    flush_decisions()  # counts other tests left pending belong before, not in the difference
    before = (
        _value("sharedcare_consent_resources_tested_total", resource_type="Condition"),
        _value("sharedcare_consent_resources_withheld_total", resource_type="Condition", rule="consent"),
        _value("sharedcare_consent_resources_withheld_total", resource_type="Condition", rule="sensitive-withheld"),
        _value("sharedcare_consent_resources_tested_total", resource_type="<other>"),
    )
    decider.filter([resource("Condition", "a"), resource("Condition", "b"), resource("Condition", "c", labels=("HIV",)),
                    {"resourceType": "MadeUpThing", "id": "x"}])
    flush_decisions()
    after = (
        _value("sharedcare_consent_resources_tested_total", resource_type="Condition"),
        _value("sharedcare_consent_resources_withheld_total", resource_type="Condition", rule="consent"),
        _value("sharedcare_consent_resources_withheld_total", resource_type="Condition", rule="sensitive-withheld"),
        _value("sharedcare_consent_resources_tested_total", resource_type="<other>"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [3, 2, 1, 1]


def test_qualified_and_reviewed_releases_are_counted() -> None:
    decider = PolicySet.default().decider(ctx(purpose="ETREAT"), [consent("OPTOUT")], now=NOW)
    flush_decisions()  # counts other tests left pending belong before, not in the difference
    before = (
        _value("sharedcare_consent_resources_qualified_total", resource_type="Observation", rule="emergency-override"),
        _value("sharedcare_consent_reviews_total", rule="emergency-override"),
    )
    decider.filter([resource("Observation", "a"), resource("Observation", "b")])
    flush_decisions()
    after = (
        _value("sharedcare_consent_resources_qualified_total", resource_type="Observation", rule="emergency-override"),
        _value("sharedcare_consent_reviews_total", rule="emergency-override"),
    )
    assert [a - b for a, b in zip(after, before, strict=True)] == [2, 2]


async def test_consent_records_are_counted_by_policy(tmp_path: Path) -> None:
    """The census pages through the store's own search (SQLite here: no server, no fixtures)."""
    from sharedcare.store import migrate
    from sharedcare.store.db import Database
    from sharedcare.store.repository import Store

    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}")
    try:
        await migrate.upgrade(db)
        store = Store(db)
        records = [
            consent("OPTOUT", id="a"), consent("OPTOUT", id="b"), consent("OPTIN", id="c"),
            consent("OPTOUT", id="d", status="inactive"),  # not counted: inactive
            consent("OPTIN", id="e", scope="research"),  # not counted: not a privacy consent
        ]
        for record in records:
            body = {k: v for k, v in record.items() if k != "id"}
            await store.create(store.prepare("Consent", body))
        counts = await count_consents_by_policy(store, page_size=2)  # several pages
    finally:
        await db.close()
    assert counts == {"OPTIN": 1, "OPTINR": 0, "OPTOUT": 2, "OPTOUTE": 0, "other": 0, "none": 0}
    record_consent_counts(counts)
    assert _value("sharedcare_consent_records", policy="OPTOUT") == 2


def test_counts_reach_the_metrics_without_more_traffic() -> None:
    """Counts are batched (at most one write a second); a timer writes the last batch."""
    import time

    decider = PolicySet.default().decider(ctx(), [], now=NOW)
    before = _value("sharedcare_consent_resources_tested_total", resource_type="Immunization")
    decider.filter([resource("Immunization", "i1")])
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if _value("sharedcare_consent_resources_tested_total", resource_type="Immunization") == before + 1:
            break
        time.sleep(0.05)
    assert _value("sharedcare_consent_resources_tested_total", resource_type="Immunization") == before + 1


def test_counts_of_separately_decided_resources_add_up() -> None:
    """Resources decided one by one (here Bundles, never memoised) still count once each."""
    decider = PolicySet.default().decider(ctx(), [], now=NOW)
    bundles = [{"resourceType": "Bundle", "id": f"b{i}", "entry": [{"resource": resource("Encounter", "e")}]} for i in range(3)]
    before = _value("sharedcare_consent_resources_tested_total", resource_type="Bundle")
    decider.filter(bundles)
    flush_decisions()
    assert _value("sharedcare_consent_resources_tested_total", resource_type="Bundle") == before + 3
