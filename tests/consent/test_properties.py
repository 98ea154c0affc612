"""Property tests: generated people, consent records, policies and resources.

* ``filter`` never lets a withheld resource out, loses nothing (released + withheld = input),
  never mutates its input, and equals ``decide`` applied resource by resource;
* the compiled engine (memos, request-level pruning) agrees with a naive, direct reading of
  the same consents and rules written here from the documented semantics;
* an opt-out is never released without a review flag, whatever the policy says.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from consent.builders import ACT, CONF, LOINC, NOW, SNOMED, consent, provision
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharedcare.consent import Decision, Outcome, PolicySet, Provider, RequestContext, with_labels
from sharedcare.consent.dates import date_range, period_span

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TYPES = ["Observation", "Condition", "MedicationRequest", "DocumentReference", "Encounter"]
LABELS = [f"{ACT}|HIV", f"{ACT}|PSY", f"{ACT}|ETH", f"{CONF}|R", f"{CONF}|V", f"{CONF}|N", f"{CONF}|M"]
CODES = [f"{SNOMED}|1", f"{SNOMED}|2", f"{SNOMED}|3", f"{LOINC}|7917-8"]
PROVIDER_NAMES = ["gp-1", "acute-1", "A81001"]
ROLES = ["R8000", "R8010", None]
PURPOSES = ["TREAT", "ETREAT", "HRESCH", "HPAYMT", None]
ORGS = ["RR8", "SC001", None]
PERIODS = {"expired": ("2020-01-01", "2024-12-31"), "current": ("2025-01-01", None), "future": ("2026-01-01", None)}
QUALIFY_LABEL = "https://example.org/labels|Q1"
BASE = {"OPTIN": "permit", "OPTINR": "permit", "OPTOUT": "deny", "OPTOUTE": "deny"}
RECIPIENT, SOURCE = {"PRCP", "IRCP"}, {"CST", "AUT"}
PRIMARY = {"Observation": "code", "Condition": "code", "MedicationRequest": "medicationCodeableConcept", "DocumentReference": "type"}


# -- generated resources -------------------------------------------------------------------
def _coding(key: str) -> dict[str, str]:
    system, _, code = key.rpartition("|")
    return {"system": system, "code": code}


@st.composite
def resources(draw: st.DrawFn) -> Any:
    if draw(st.integers(0, 19)) == 0:  # now and then, something that is not a resource
        return draw(st.sampled_from([None, {}, {"resourceType": 5}, {"resourceType": "Observation", "meta": "x"}]))
    rtype = draw(st.sampled_from(TYPES))
    body: dict[str, Any] = {"resourceType": rtype, "id": str(draw(st.integers(1, 6)))}
    labels: list[str] = draw(st.lists(st.sampled_from(LABELS), max_size=2, unique=True))
    with_meta: bool = draw(st.booleans())
    if labels or with_meta:
        body["meta"] = {"versionId": "1"}
        if labels:
            body["meta"]["security"] = [_coding(k) for k in labels]
    code = draw(st.none() | st.sampled_from(CODES))
    if code and rtype in PRIMARY:
        body[PRIMARY[rtype]] = {"coding": [_coding(code)], "text": "x"}
    reason = draw(st.none() | st.sampled_from(CODES))
    if reason and rtype in ("MedicationRequest", "Encounter"):
        body["reasonCode"] = [{"coding": [_coding(reason)]}]
    return body


# -- generated consents --------------------------------------------------------------------
def criteria() -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {},
        optional={
            "actors": st.lists(
                st.tuples(st.sampled_from([None, "CST", "PRCP"]), st.sampled_from([*PROVIDER_NAMES, "RR8", "Organization/gp-1"])),
                min_size=1, max_size=2,
            ),
            "purposes": st.lists(st.sampled_from(["TREAT", "ETREAT", "HRESCH", "HPAYMT"]), min_size=1, max_size=2).map(tuple),
            "labels": st.lists(st.sampled_from(LABELS), min_size=1, max_size=2).map(tuple),
            "classes": st.lists(st.sampled_from(TYPES), min_size=1, max_size=2).map(tuple),
            "codes": st.lists(st.sampled_from(CODES), min_size=1, max_size=2).map(tuple),
            "actions": st.lists(st.sampled_from(["access", "correct", "disclose"]), min_size=1, max_size=2).map(tuple),
            "data": st.lists(st.sampled_from([f"{t}/{i}" for t in TYPES[:2] for i in "12"]), min_size=1, max_size=2).map(tuple),
            "period": st.sampled_from(list(PERIODS.values())),
        },
    )


def provisions(depth: int) -> st.SearchStrategy[dict[str, Any]]:
    kind = st.sampled_from(["deny", "permit"]) if depth else st.sampled_from([None, "deny", "permit"])
    children = st.lists(provisions(depth + 1), max_size=2).map(tuple) if depth < 2 else st.just(())
    return st.builds(lambda t, c, ch: provision(t, children=ch, **c), kind, CRITERIA, children)


CRITERIA = criteria()
PROVISIONS = provisions(0)  # strategies are built once: building them per draw is slow


@st.composite
def consents(draw: st.DrawFn) -> list[dict[str, Any]]:
    out = []
    for i in range(draw(st.integers(0, 3))):
        out.append(consent(
            draw(st.sampled_from(["OPTIN", "OPTINR", "OPTOUT", "OPTOUTE", "OPTBOGUS"])),
            draw(st.none() | PROVISIONS),
            id=f"c{i}",
            status=draw(st.sampled_from(["active", "active", "inactive"])),
            date_time=draw(st.sampled_from([None, "2024-01-01", "2025-12-01"])),
        ))
    return out


# -- generated policies --------------------------------------------------------------------
@dataclass(frozen=True)
class GenRule:
    id: str
    when: dict[str, tuple[str, ...]]
    unless: dict[str, tuple[str, ...]] | None
    decision: str


CONDITION_POOLS = {
    "type": TYPES, "label": LABELS, "code": CODES, "provider": PROVIDER_NAMES,
    "consent": ["deny", "permit", "none"], "role": ["R8000", "R8010"], "organization": ["RR8", "SC001"],
    "purpose": ["TREAT", "ETREAT", "HRESCH", "HPAYMT"],
}


@st.composite
def conditions(draw: st.DrawFn) -> dict[str, tuple[str, ...]]:
    keys = draw(st.lists(st.sampled_from(list(CONDITION_POOLS)), max_size=3, unique=True))
    return {k: tuple(draw(st.lists(st.sampled_from(CONDITION_POOLS[k]), min_size=1, max_size=2, unique=True))) for k in keys}


CONDITIONS = conditions()
UNLESS = st.none() | CONDITIONS.filter(bool)


@st.composite
def policies(draw: st.DrawFn) -> tuple[list[GenRule], str]:
    rules = [
        GenRule(f"r{i}", draw(CONDITIONS), draw(UNLESS),
                draw(st.sampled_from(["release", "withhold", "qualify"])))
        for i in range(draw(st.integers(0, 6)))
    ]
    default = draw(st.sampled_from(["release", "withhold", "qualify"]))
    return rules + [GenRule("default", {}, None, default)], render(rules, default)


def _toml_list(values: tuple[str, ...]) -> str:
    return "[" + ", ".join(f'"{v}"' for v in values) + "]"


def render(rules: list[GenRule], default: str) -> str:
    parts = ['version = "generated"\n']
    for r in rules:
        parts.append(f'[[rule]]\nid = "{r.id}"\ndecision = "{r.decision}"\n')
        if r.decision == "qualify":
            parts.append(f'labels = ["{QUALIFY_LABEL}"]\n')
        for part, conds in (("when", r.when), ("unless", r.unless or {})):
            parts.extend(f"{part}.{k} = {_toml_list(v)}\n" for k, v in conds.items())
    parts.append(f'[default]\ndecision = "{default}"\n')
    if default == "qualify":
        parts.append(f'labels = ["{QUALIFY_LABEL}"]\n')
    return "".join(parts)


contexts = st.builds(
    lambda role, purpose, org: RequestContext("portal", role, org, purpose),
    st.sampled_from(ROLES), st.sampled_from(PURPOSES), st.sampled_from(ORGS),
)
source_providers = st.sampled_from([None, "gp-1", "acute-1", Provider.of("gp-1", "A81001")])


# -- a naive reading of the documented semantics (the oracle) ------------------------------
def _aliases(provider: Any) -> set[str] | None:
    if provider is None:
        return None
    return set(provider.aliases) if isinstance(provider, Provider) else {provider}


def _resource_keys(r: dict[str, Any]) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    labels = {(c["system"], c["code"]) for c in r.get("meta", {}).get("security", [])}
    codes = set()
    element = PRIMARY.get(r["resourceType"])
    for concept in ([r[element]] if element and element in r else []) + r.get("reasonCode", []):
        codes |= {(c["system"], c["code"]) for c in concept["coding"]}
    return labels, codes


def _matches(p: dict[str, Any], effect: str, c: RequestContext, r: dict[str, Any], provider: Any, *, root: bool) -> bool:
    labels, codes = _resource_keys(r)
    if not root and "period" in p and NOW not in period_span(p["period"]):
        return False
    if "purpose" in p and c.purpose not in {x["code"] for x in p["purpose"]}:
        return False
    if "action" in p and not {cc["coding"][0]["code"] for cc in p["action"]} & {"access", "disclose", "use"}:
        return False
    if "actor" in p:
        def hit(actor: dict[str, Any]) -> bool:
            role = actor.get("role", {}).get("coding", [{}])[0].get("code")
            ref = actor["reference"]
            key = ref["reference"].split("/")[-1] if "reference" in ref else ref["identifier"]["value"]
            if role in (None, *RECIPIENT) and key in {c.organization, c.client_id}:
                return True
            if role in (None, *SOURCE):
                aliases = _aliases(provider)
                return effect == "deny" if aliases is None else key in aliases
            return False
        if not any(hit(a) for a in p["actor"]):
            return False
    if "securityLabel" in p and not {(x["system"], x["code"]) for x in p["securityLabel"]} & labels:
        return False
    if "class" in p and r["resourceType"] not in {x["code"] for x in p["class"]}:
        return False
    if "code" in p and not {(cc["coding"][0]["system"], cc["coding"][0]["code"]) for cc in p["code"]} & codes:
        return False
    return "data" not in p or f"{r['resourceType']}/{r['id']}" in {d["reference"]["reference"] for d in p["data"]}


def _refine(p: dict[str, Any], effect: str, c: RequestContext, r: dict[str, Any], provider: Any) -> str:
    found = [
        _refine(child, child["type"], c, r, provider)
        for child in p.get("provision", [])
        if _matches(child, child["type"], c, r, provider, root=False)
    ]
    return "deny" if "deny" in found else "permit" if found else effect


def naive_consent(records: list[dict[str, Any]], c: RequestContext, r: dict[str, Any], provider: Any) -> str:
    effects = []
    for raw in records:
        if raw["status"] != "active" or ("dateTime" in raw and date_range(raw["dateTime"])[0] > NOW):
            continue
        rule = raw["policyRule"]["coding"][0]["code"]
        if rule not in BASE:
            effects.append("deny")  # unreadable: an opt-out
            continue
        base, root = BASE[rule], raw.get("provision")
        if root is None:
            effects.append(base)
            continue
        if "period" in root and NOW not in period_span(root["period"]):
            continue
        effect = root.get("type") or base
        effects.append(_refine(root, effect, c, r, provider) if _matches(root, effect, c, r, provider, root=True) else base)
    return "deny" if "deny" in effects else "permit" if "permit" in effects else "none"


def naive_outcome(rules: list[GenRule], records: list[dict[str, Any]], c: RequestContext, r: Any, provider: Any) -> tuple[str, str, bool]:
    if not isinstance(r, dict) or not isinstance(r.get("resourceType"), str) or not isinstance(r.get("meta", {}), dict):
        return ("withhold", "malformed", False)
    effect = naive_consent(records, c, r, provider)
    labels, codes = _resource_keys(r)
    aliases = _aliases(provider) or set()
    facts = {
        "type": {r["resourceType"]}, "label": {f"{s}|{k}" for s, k in labels}, "code": {f"{s}|{k}" for s, k in codes},
        "provider": aliases, "consent": {effect}, "role": {c.user_role}, "organization": {c.organization},
        "purpose": {c.purpose},
    }

    def holds(conds: dict[str, tuple[str, ...]]) -> bool:
        return all(facts[k] & set(v) for k, v in conds.items())

    for rule in rules[:-1]:
        if not holds(rule.when) or (rule.unless is not None and holds(rule.unless)):
            continue
        if effect == "deny" and rule.decision != "withhold":
            if "deny" not in rule.when.get("consent", ()):
                continue
            return (rule.decision, rule.id, True)
        return (rule.decision, rule.id, False)
    if effect == "deny":
        return ("withhold", "consent", False)
    return (rules[-1].decision, "default", False)


def _released(resource: Any, outcome: Outcome) -> Any:
    return resource if outcome.decision is Decision.RELEASE else with_labels(resource, outcome.labels)


# -- the properties ------------------------------------------------------------------------
@SETTINGS
@given(policy=policies(), records=consents(), context=contexts, items=st.lists(resources(), max_size=12), provider=source_providers)
def test_filter_lets_nothing_withheld_out_and_equals_decide(
    policy: tuple[list[GenRule], str], records: list[dict[str, Any]], context: RequestContext, items: list[Any], provider: Any
) -> None:
    _rules, text = policy
    snapshot = copy.deepcopy(items)
    result = PolicySet.from_text(text).decider(context, records, now=NOW).filter(items, provider, record=False)
    # Reference: every resource decided by a decider of its own (no memo shared with the others).
    outcomes = [PolicySet.from_text(text).decider(context, records, now=NOW).decide(r, provider) for r in items]
    withheld = [r for r, o in zip(items, outcomes, strict=True) if o.decision is Decision.WITHHOLD]

    assert result.released == [_released(r, o) for r, o in zip(items, outcomes, strict=True) if o.released]
    assert len(result.released) + result.withheld == len(items)
    assert result.withheld == len(withheld)
    assert result.qualified == sum(o.decision is Decision.QUALIFY for o in outcomes)
    assert not any(out is w for w in withheld for out in result.released)
    assert not any(w == out for w in withheld for out in result.released)
    assert items == snapshot  # nothing mutated
    assert [ref for ref, _ in result.reviewed] == [
        f"{r['resourceType']}/{r.get('id')}" for r, o in zip(items, outcomes, strict=True) if o.review
    ]
    # The consumer is told exactly when something was withheld.
    assert (result.notice() is not None) == bool(withheld)


@SETTINGS
@given(policy=policies(), records=consents(), context=contexts, items=st.lists(resources(), max_size=8), provider=source_providers)
def test_engine_agrees_with_a_naive_reading(
    policy: tuple[list[GenRule], str], records: list[dict[str, Any]], context: RequestContext, items: list[Any], provider: Any
) -> None:
    rules, text = policy
    policies_ = PolicySet.from_text(text)
    # The second decider reuses the person's compiled records and memo from the first.
    for decider in (policies_.decider(context, records, now=NOW), policies_.decider(context, records, now=NOW)):
        for r in items:
            outcome = decider.decide(r, provider)
            assert (outcome.decision.value, outcome.rule, outcome.review) == naive_outcome(rules, records, context, r, provider), r


@SETTINGS
@given(
    policy=policies() | st.just(([], "default")),
    extra=consents(),
    context=contexts,
    items=st.lists(resources(), max_size=10),
    opt_out=st.sampled_from(["OPTOUT", "OPTBOGUS"]),
)
def test_an_opt_out_is_never_released_without_review(
    policy: tuple[list[GenRule], str], extra: list[dict[str, Any]], context: RequestContext, items: list[Any], opt_out: str
) -> None:
    _rules, text = policy
    policies_ = PolicySet.default() if text == "default" else PolicySet.from_text(text)
    records = [consent(opt_out, id="out"), *extra]
    result = policies_.decider(context, records, now=NOW).filter(items, record=False)
    assert len(result.reviewed) == len(result.released)
    assert all(o.review and "Consent/out" in o.reason for _, o in result.reviewed)
