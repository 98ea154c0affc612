"""Tables of (policy, consents, context, resource) -> decision, under the shipped default policy
unless a case brings its own policy text."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest
from consent.builders import (
    ACT,
    NOW,
    SNOMED,
    consent,
    ctx,
    provision,
    resource,
)

from sharedcare.consent import Decision, PolicySet, Provider, RequestContext

R, W, Q = Decision.RELEASE, Decision.WITHHOLD, Decision.QUALIFY
DEFAULT = PolicySet.default()
HIV_CODE = f"{SNOMED}|86406008"


@dataclass
class Case:
    id: str
    consents: list[dict[str, Any]]
    resource: dict[str, Any]
    expected: tuple[Decision, str]
    context: RequestContext = field(default_factory=ctx)
    provider: Any = None
    review: bool = False
    policy: str | None = None  # TOML text; None: the default policy

    def decide(self) -> Any:
        policies = PolicySet.from_text(self.policy) if self.policy else DEFAULT
        return policies.decider(self.context, self.consents, now=NOW).decide(self.resource, self.provider)


def cases(*items: Case) -> Any:
    return pytest.mark.parametrize("case", items, ids=[c.id for c in items])


OPTOUT = consent("OPTOUT")
GP_OPTOUT = consent("OPTIN", provision("deny", actors=[("CST", "gp-1")]))


@cases(
    Case("no consent: released", [], resource(), (R, "default")),
    Case("opt-out entire", [OPTOUT], resource(), (W, "consent")),
    Case("opt-out entire, explicit deny provision", [consent("OPTOUT", provision("deny"))], resource(), (W, "consent")),
    Case("opt-out entire withholds every type", [OPTOUT], resource("Patient"), (W, "consent")),
    Case("opt-in alone changes nothing", [consent("OPTIN")], resource(), (R, "default")),
    Case("inactive opt-out is ignored", [consent("OPTOUT", status="inactive")], resource(), (R, "default")),
    Case("opt-out of another scope is ignored", [consent("OPTOUT", scope="research")], resource(), (R, "default")),
    Case("unreadable consent counts as opt-out", [consent("OPTWHAT")], resource(), (W, "consent")),
    Case("deny among several records wins", [consent("OPTIN", id="a"), consent("OPTOUT", id="b")], resource(), (W, "consent")),
)
def test_opt_out_entire(case: Case) -> None:
    outcome = case.decide()
    assert (outcome.decision, outcome.rule) == case.expected
    assert outcome.review is case.review


@cases(
    Case("named provider's data withheld", [GP_OPTOUT], resource(), (W, "consent"), provider="gp-1"),
    Case("other providers' data released", [GP_OPTOUT], resource(), (R, "default"), provider="acute-1"),
    Case("provider from the context", [GP_OPTOUT], resource(), (W, "consent"), context=ctx(provider="gp-1")),
    Case("unknown source fails closed", [GP_OPTOUT], resource(), (W, "consent"), provider=None),
    Case(
        "named by Organization reference, matched on any alias",
        [consent("OPTIN", provision("deny", actors=[(None, "Organization/org-gp-1")]))],
        resource(),
        (W, "consent"),
        provider=Provider.of("gp-1", "A81001", "org-gp-1"),
    ),
    Case(
        "named by ODS code, other provider released",
        [consent("OPTIN", provision("deny", actors=[(None, "A81001")]))],
        resource(),
        (R, "default"),
        provider=Provider.of("acute-1", "RR8", "org-acute"),
    ),
    Case(
        "recipient organisation named (PRCP): that organisation gets nothing",
        [consent("OPTIN", provision("deny", actors=[("PRCP", "RR8")]))],
        resource(),
        (W, "consent"),
        context=ctx(org="RR8"),
        provider="acute-1",
    ),
    Case(
        "recipient organisation named (PRCP): others still see it",
        [consent("OPTIN", provision("deny", actors=[("PRCP", "RR8")]))],
        resource(),
        (R, "default"),
        context=ctx(org="RXX"),
        provider="acute-1",
    ),
)
def test_opt_out_named_provider(case: Case) -> None:
    outcome = case.decide()
    assert (outcome.decision, outcome.rule) == case.expected


WITHHOLD_PSY = consent("OPTIN", provision("deny", labels=(f"{ACT}|PSY",)))
WITHHOLD_DOCS = consent("OPTIN", provision("deny", classes=("DocumentReference",)))
WITHHOLD_HIV_CODE = consent("OPTIN", provision("deny", codes=(HIV_CODE,)))


@cases(
    # Policy alone would qualify PSY for a clinician; the consent denies it, so the
    # qualifying rule cannot apply and the next applicable rule (a withhold) decides.
    Case("sensitive label named: withheld", [WITHHOLD_PSY], resource(labels=("PSY",)), (W, "sensitive-withheld")),
    Case("label not present: released", [WITHHOLD_PSY], resource(labels=("N",)), (R, "default")),
    Case(
        "other label named: withheld by consent",
        [consent("OPTIN", provision("deny", labels=("http://terminology.hl7.org/CodeSystem/v3-Confidentiality|M",)))],
        resource(labels=("M",)),
        (W, "consent"),
    ),
    Case("type named: withheld", [WITHHOLD_DOCS], resource("DocumentReference"), (W, "consent")),
    Case("other type: released", [WITHHOLD_DOCS], resource("Observation"), (R, "default")),
    Case("code named: withheld", [WITHHOLD_HIV_CODE], resource("Condition", code=HIV_CODE), (W, "consent")),
    Case(
        "code named in a reason: withheld",
        [WITHHOLD_HIV_CODE],
        resource("MedicationRequest", reasonCode=[{"coding": [{"system": SNOMED, "code": "86406008"}]}]),
        (W, "consent"),
    ),
    Case("other code: released", [WITHHOLD_HIV_CODE], resource("Condition", code=f"{SNOMED}|44054006"), (R, "default")),
    Case("same code, other system: released", [WITHHOLD_HIV_CODE], resource("Condition", code="http://other|86406008"), (R, "default")),
    Case(
        "criteria are AND-ed: type and label both needed",
        [consent("OPTIN", provision("deny", classes=("Observation",), labels=(f"{ACT}|PSY",)))],
        resource("Condition", labels=("PSY",)),
        (Q, "sensitive-direct-care"),
    ),
    Case(
        "specific resource (data) withheld",
        [consent("OPTIN", provision("deny", data=("Observation/r1",)))],
        resource("Observation", "r1"),
        (W, "consent"),
    ),
    Case(
        "specific resource (data): others released",
        [consent("OPTIN", provision("deny", data=("Observation/r1",)))],
        resource("Observation", "r2"),
        (R, "default"),
    ),
    Case(
        "nested exception: category withheld except one code",
        [consent("OPTIN", provision("deny", classes=("Observation",), children=(provision("permit", codes=(f"{SNOMED}|1",)),)))],
        resource("Observation", code=f"{SNOMED}|1"),
        (R, "default"),
    ),
    Case(
        "nested exception: rest of the category still withheld",
        [consent("OPTIN", provision("deny", classes=("Observation",), children=(provision("permit", codes=(f"{SNOMED}|1",)),)))],
        resource("Observation", code=f"{SNOMED}|2"),
        (W, "consent"),
    ),
    Case(
        "action other than disclosure does not restrict release",
        [consent("OPTIN", provision("deny", actions=("correct",)))],
        resource(),
        (R, "default"),
    ),
)
def test_withhold_by_category(case: Case) -> None:
    outcome = case.decide()
    assert (outcome.decision, outcome.rule) == case.expected


NO_RESEARCH = consent("OPTIN", provision("deny", purposes=("HRESCH",)))
ONLY_TREATMENT = consent("OPTOUT", provision("permit", purposes=("TREAT", "ETREAT")))


@cases(
    Case("purpose denied: withheld", [NO_RESEARCH], resource(), (W, "consent"), context=ctx(purpose="HRESCH")),
    Case("other purpose: released", [NO_RESEARCH], resource(), (R, "default"), context=ctx(purpose="TREAT")),
    Case("opt-out except treatment: treatment sees it", [ONLY_TREATMENT], resource(), (R, "default")),
    Case("opt-out except treatment: payment does not", [ONLY_TREATMENT], resource(), (W, "consent"), context=ctx(purpose="HPAYMT")),
    Case("no purpose in the request: a purpose exception cannot apply", [ONLY_TREATMENT], resource(), (W, "consent"), context=ctx(purpose=None)),
)
def test_purpose_restriction(case: Case) -> None:
    outcome = case.decide()
    assert (outcome.decision, outcome.rule) == case.expected


@cases(
    Case("expired opt-out no longer applies", [consent("OPTOUT", provision(period=("2020-01-01", "2024-12-31")))], resource(), (R, "default")),
    Case("future opt-out does not apply yet", [consent("OPTOUT", provision(period=("2026-01-01", None)))], resource(), (R, "default")),
    Case("opt-out within its period applies", [consent("OPTOUT", provision(period=("2025-01-01", "2025-12-31")))], resource(), (W, "consent")),
    Case("period end date lasts the whole day", [consent("OPTOUT", provision(period=(None, "2025-06-01")))], resource(), (W, "consent")),
    Case("period end as an instant", [consent("OPTOUT", provision(period=(None, "2025-06-01T11:59:59Z")))], resource(), (R, "default")),
    Case("consent dated in the future is not in force", [consent("OPTOUT", date_time="2025-07-01")], resource(), (R, "default")),
    Case("consent dated today is in force", [consent("OPTOUT", date_time="2025-06-01T09:00:00+01:00")], resource(), (W, "consent")),
    Case(
        "nested rule outside its period does not apply",
        [consent("OPTOUT", provision(children=(provision("permit", period=("2020-01-01", "2020-12-31")),)))],
        resource(),
        (W, "consent"),
    ),
)
def test_validity_period(case: Case) -> None:
    outcome = case.decide()
    assert (outcome.decision, outcome.rule) == case.expected


NO_OVERRIDE_POLICY = """
version = "no-override"
[[rule]]
id = "sensitive"
when.label = "http://terminology.hl7.org/CodeSystem/v3-ActCode|HIV"
decision = "withhold"
"""

RELEASE_OVERRIDE_POLICY = """
version = "release-override"
[[rule]]
id = "break-glass"
when.consent = "deny"
when.purpose = "ETREAT"
decision = "release"
"""


@cases(
    Case("clinician in an emergency: overridden, flagged", [OPTOUT], resource(), (Q, "emergency-override"), context=ctx(purpose="ETREAT"), review=True),
    Case("non-clinical role in an emergency: withheld", [OPTOUT], resource(), (W, "consent"), context=ctx(role="R8010", purpose="ETREAT")),
    Case("clinician, ordinary treatment: withheld", [OPTOUT], resource(), (W, "consent"), context=ctx(purpose="TREAT")),
    Case("policy without an override: withheld", [OPTOUT], resource(), (W, "consent"), context=ctx(purpose="ETREAT"), policy=NO_OVERRIDE_POLICY),
    Case(
        "override by release is still flagged for review",
        [OPTOUT], resource(), (R, "break-glass"), context=ctx(purpose="ETREAT"), review=True, policy=RELEASE_OVERRIDE_POLICY,
    ),
    Case(
        "person's own emergency exception: released without review",
        [consent("OPTOUT", provision(children=(provision("permit", purposes=("ETREAT",)),)))],
        resource(), (R, "default"), context=ctx(purpose="ETREAT"),
    ),
    Case("very restricted data is not overridden", [OPTOUT], resource(labels=("V",)), (W, "very-restricted"), context=ctx(purpose="ETREAT")),
)
def test_emergency_override(case: Case) -> None:
    outcome = case.decide()
    assert (outcome.decision, outcome.rule) == case.expected
    assert outcome.review is case.review
    if case.review:
        assert "Consent/c1" in outcome.reason  # the audit can say whose opt-out was overridden


@cases(
    Case("clinician, direct care: qualified", [], resource(labels=("HIV",)), (Q, "sensitive-direct-care")),
    Case("clinician, emergency: qualified", [], resource(labels=("PSY",)), (Q, "sensitive-direct-care"), context=ctx(purpose="ETREAT")),
    Case("clerical role: withheld", [], resource(labels=("HIV",)), (W, "sensitive-withheld"), context=ctx(role="R8010")),
    Case("no role: withheld", [], resource(labels=("SDV",)), (W, "sensitive-withheld"), context=ctx(role=None)),
    Case("clinician, payment purpose: withheld", [], resource(labels=("STD",)), (W, "sensitive-withheld"), context=ctx(purpose="HPAYMT")),
    Case("restricted (R) to a clinician for care: qualified", [], resource(labels=("R",)), (Q, "sensitive-direct-care")),
    Case("restricted (R) for research: withheld", [], resource(labels=("R",)), (W, "sensitive-withheld"), context=ctx(purpose="HRESCH")),
    Case("normal (N) label: released", [], resource(labels=("N",)), (R, "default"), context=ctx(role="R8010")),
    Case("very restricted (V): withheld even for care", [], resource(labels=("V",)), (W, "very-restricted")),
    Case("label without its system does not count as sensitive", [], resource(meta={"security": [{"code": "HIV"}]}), (R, "default"), context=ctx(role="R8010")),
)
def test_sensitive_categories(case: Case) -> None:
    outcome = case.decide()
    assert (outcome.decision, outcome.rule) == case.expected


RULES_POLICY = """
version = "rules"
[sets]
admin = ["R8010"]
[[rule]]
id = "no-audit"
when.type = "AuditEvent"
decision = "withhold"
[[rule]]
id = "gp-release-all"
when.organization = "RR8"
decision = "release"
[[rule]]
id = "admin-no-obs"
when.role = "@admin"
when.type = "Observation"
unless.purpose = "ETREAT"
decision = "withhold"
[[rule]]
id = "lab-embargo"
when.provider = "lab-1"
when.code = "http://loinc.org|7917-8"
decision = "withhold"
[default]
decision = "qualify"
labels = ["http://terminology.hl7.org/CodeSystem/v3-ActCode|NORDSCLCD"]
"""


@cases(
    Case("first matching rule decides", [], resource("AuditEvent"), (W, "no-audit"), context=ctx(org="RR8"), policy=RULES_POLICY),
    Case("a release rule cannot bypass an opt-out", [OPTOUT], resource(), (W, "consent"), context=ctx(org="RR8"), policy=RULES_POLICY),
    Case("unless: the exception holds", [], resource(), (Q, "default"), context=ctx(role="R8010", org="X", purpose="ETREAT"), policy=RULES_POLICY),
    Case("unless: the exception does not hold", [], resource(), (W, "admin-no-obs"), context=ctx(role="R8010", org="X"), policy=RULES_POLICY),
    Case("provider and code rule", [], resource(code="http://loinc.org|7917-8"), (W, "lab-embargo"), context=ctx(org="X"), provider="lab-1", policy=RULES_POLICY),
    Case("provider and code rule, other provider", [], resource(code="http://loinc.org|7917-8"), (Q, "default"), context=ctx(org="X"), provider="gp-1", policy=RULES_POLICY),
    Case("provider rule, provider unknown", [], resource(code="http://loinc.org|7917-8"), (Q, "default"), context=ctx(org="X"), policy=RULES_POLICY),
    Case("default decision can qualify", [], resource(), (Q, "default"), context=ctx(org="X"), policy=RULES_POLICY),
)
def test_policy_rules(case: Case) -> None:
    outcome = case.decide()
    assert (outcome.decision, outcome.rule) == case.expected


@pytest.mark.parametrize(
    "bad",
    [None, "Observation", [], {}, {"resourceType": 7}, {"resourceType": "Observation", "meta": "x"},
     {"resourceType": "Observation", "meta": {"security": {"code": "HIV"}}},
     {"resourceType": "Observation", "meta": {"security": ["HIV"]}}],
    ids=repr,
)
def test_malformed_resources_are_withheld(bad: Any) -> None:
    outcome = DEFAULT.decider(ctx(), [], now=NOW).decide(bad)
    assert (outcome.decision, outcome.rule) == (W, "malformed")


def test_qualification_labels_without_mutating_input() -> None:
    hiv = resource("Condition", "c1", labels=("HIV",))
    plain = resource("Observation", "o1")
    before = copy.deepcopy([hiv, plain])
    result = DEFAULT.decider(ctx(), [], now=NOW).filter([hiv, plain], record=False)
    assert [hiv, plain] == before  # inputs untouched, meta.security included
    labelled, same = result.released
    assert same is plain  # released as-is: no copy
    assert labelled is not hiv and labelled["meta"] is not hiv["meta"]
    codes = [(c["system"], c["code"]) for c in labelled["meta"]["security"]]
    assert codes == [
        (f"{ACT}", "HIV"),
        (f"{ACT}", "NORDSCLCD"),
        ("http://terminology.hl7.org/CodeSystem/v3-ActReason", "TREAT"),
    ]
    assert {k: v for k, v in labelled.items() if k != "meta"} == {k: v for k, v in hiv.items() if k != "meta"}
    assert (result.withheld, result.qualified, result.review) == (0, 1, False)


def test_qualified_label_already_present_is_not_repeated() -> None:
    hiv = resource("Condition", "c1", labels=("HIV", "NORDSCLCD"))
    result = DEFAULT.decider(ctx(), [], now=NOW).filter([hiv], record=False)
    codes = [c["code"] for c in result.released[0]["meta"]["security"]]
    assert codes == ["HIV", "NORDSCLCD", "TREAT"]


def test_filter_counts_reviews_and_tells_the_consumer() -> None:
    people = [resource("Observation", "o1"), resource("Condition", "c1", labels=("V",)), resource("Encounter", "e1")]
    decider = DEFAULT.decider(ctx(purpose="ETREAT"), [OPTOUT], now=NOW)
    result = decider.filter(people, record=False)
    assert (len(result.released), result.withheld, result.qualified) == (2, 1, 2)
    assert result.review
    assert [ref for ref, _ in result.reviewed] == ["Observation/o1", "Encounter/e1"]
    assert all(o.rule == "emergency-override" and o.review for _, o in result.reviewed)
    notice = result.notice()
    assert notice is not None and notice["issue"][0]["code"] == "suppressed"
    assert "c1" not in str(notice) and "Condition" not in str(notice)
    assert decider.consent_refs == ("Consent/c1",)
    assert decider.policy_version == DEFAULT.version
    assert DEFAULT.decider(ctx(), [], now=NOW).filter([resource()], record=False).notice() is None


def test_reused_records_follow_the_clock() -> None:
    """A person's compiled records are reused across requests only while no period or
    dateTime boundary passes."""
    from datetime import datetime, timedelta

    policies = PolicySet.from_text('version = "t"')
    records = [
        consent("OPTOUT", provision(period=("2025-01-01", "2025-06-30")), id="ends"),
        consent("OPTOUT", id="later", date_time="2025-09-01"),
    ]
    expected = [
        (NOW, W),  # first record in force
        (datetime(2025, 7, 1, tzinfo=NOW.tzinfo), R),  # it ended; the second not yet begun
        (NOW, W),  # back in June (a caller's explicit time): in force again
        (datetime(2025, 9, 1, tzinfo=NOW.tzinfo), W),  # the second began
        (datetime(2025, 9, 1, tzinfo=NOW.tzinfo) - timedelta(microseconds=1), R),
    ]
    for at, decision in expected:
        assert policies.decider(ctx(), records, now=at).decide(resource()).decision is decision, at


def test_resources_inside_resources_are_decided_too() -> None:
    """A withheld resource must not leave inside another (contained, or a Bundle entry)."""
    decider = DEFAULT.decider(ctx(role="R8010"), [], now=NOW)
    hiv = resource("Observation", "inner", labels=("HIV",))
    report = resource("DiagnosticReport", "dr1", contained=[hiv])
    bundle = {"resourceType": "Bundle", "id": "b1", "type": "collection",
              "entry": [{"resource": resource("Encounter", "e1")}, {"resource": hiv}]}
    for outer in (report, bundle):
        outcome = decider.decide(outer)
        assert (outcome.decision, outcome.rule) == (W, "sensitive-withheld")
        assert "carries a resource that is withheld" in outcome.reason
    clean = {"resourceType": "Bundle", "id": "b2", "entry": [{"resource": resource("Encounter", "e1")}, {"request": {"method": "GET"}}]}
    assert decider.decide(clean).decision is R
    # For a clinician the inner HIV result qualifies the container, which then carries the labels.
    result = DEFAULT.decider(ctx(), [], now=NOW).filter([report], record=False)
    assert result.qualified == 1
    assert "NORDSCLCD" in [c["code"] for c in result.released[0]["meta"]["security"]]
    deep: dict[str, Any] = resource("Observation", "d0")
    for i in range(3000):
        deep = {"resourceType": "Bundle", "id": f"d{i}", "entry": [{"resource": deep}]}
    assert decider.decide(deep).rule == "malformed"
