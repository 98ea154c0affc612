"""The policy file: the shipped default loads, mistakes are refused naming the rule, and a
reload with a broken file keeps the policy in force."""

from __future__ import annotations

from pathlib import Path

import pytest
from consent.builders import NOW, consent, ctx, resource
from prometheus_client import REGISTRY

from sharedcare.consent import Decision, PolicyError, PolicySet, parse_policy

GOOD = """
version = "v1"
[[rule]]
id = "no-obs"
when.type = "Observation"
decision = "withhold"
"""

GOOD_V2 = """
version = "v2"
[[rule]]
id = "no-enc"
when.type = "Encounter"
decision = "withhold"
"""


def test_default_policy_loads_with_its_rules() -> None:
    policies = PolicySet.default()
    assert policies.version.startswith("sharedcare-default-")
    assert [r.id for r in policies.policy.rules] == [
        "very-restricted", "emergency-override", "sensitive-direct-care", "sensitive-withheld",
    ]
    assert len(policies.digest) == 64


def test_load_from_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(GOOD)
    policies = PolicySet.load(path)
    assert policies.version == "v1"
    assert policies.decider(ctx(), []).decide(resource("Observation")).rule == "no-obs"


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("version = ", "not valid TOML"),
        ("[[rule]]\nid='a'\ndecision='release'", "`version"),
        ('version="x"\nrules=[]', "unknown key(s) rules"),
        ('version="x"\n[[rule]]\nid="a"\ndecision="allow"', "rule 'a' (#1): decision must be release, withhold or qualify"),
        ('version="x"\n[[rule]]\nid="a"\ndecision="qualify"', "rule 'a' (#1): decision qualify needs labels"),
        ('version="x"\n[[rule]]\nid="a"\ndecision="release"\nlabels=["x|y"]', "rule 'a' (#1): labels are only added"),
        ('version="x"\n[[rule]]\nid="a"\ndecision="qualify"\nlabels=["nolabel"]', "rule 'a' (#1): label 'nolabel' is not defined"),
        ('version="x"\n[[rule]]\nid="a"\nwhen.purpos="TREAT"\ndecision="withhold"', "rule 'a' (#1): unknown key(s) purpos in when"),
        ('version="x"\n[[rule]]\nid="a"\nwhen.purpose="TRAET"\ndecision="withhold"', "rule 'a' (#1): when.purpose: TRAET is not a purpose-of-use code"),
        ('version="x"\n[[rule]]\nid="a"\nwhen.type="Observaton"\ndecision="withhold"', "rule 'a' (#1): when.type: not FHIR R4 resource types: Observaton"),
        ('version="x"\n[[rule]]\nid="a"\nwhen.label="HIV"\ndecision="withhold"', "rule 'a' (#1): when.label 'HIV' must be written system|code"),
        ('version="x"\n[[rule]]\nid="a"\nwhen.role="@clinical"\ndecision="withhold"', "rule 'a' (#1): when.role: set 'clinical' is not defined"),
        ('version="x"\n[[rule]]\nid="a"\nwhen.consent="denied"\ndecision="withhold"', "rule 'a' (#1): when.consent: denied is not one of"),
        ('version="x"\n[[rule]]\nid="a"\nwhen.role=[]\ndecision="withhold"', "rule 'a' (#1): when.role must be a string or a non-empty list"),
        ('version="x"\n[[rule]]\nid="a"\ndecision="withhold"\n[[rule]]\nid="a"\ndecision="release"', "rule #2: the id 'a' is used by an earlier rule"),
        ('version="x"\n[[rule]]\nid="consent"\ndecision="release"', "rule 'consent' (#1): id 'consent' is reserved"),
        ('version="x"\n[[rule]]\ndecision="release"', "rule #1: id is required"),
        ('version="x"\n[default]\ndecision="qualify"', "[default]: decision qualify needs labels"),
        ('version="x"\n[labels]\nx = { system = "s" }', "label 'x' needs a system and a code"),
        ('version="x"\n[sets]\nx = ["@y"]', "set 'x' refers to another set"),
    ],
)
def test_mistakes_are_refused_naming_the_rule(text: str, needle: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "region.toml")
    assert str(caught.value).startswith("region.toml: ")
    assert needle in str(caught.value)


def _reloads(outcome: str) -> float:
    return REGISTRY.get_sample_value("sharedcare_consent_policy_reloads_total", {"outcome": outcome}) or 0.0


def test_reload_puts_a_new_version_in_force(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(GOOD)
    policies = PolicySet.load(path)
    before = policies.decider(ctx(), [])
    path.write_text(GOOD_V2)
    ok = _reloads("ok")
    policies.reload()
    assert policies.version == "v2"
    assert _reloads("ok") == ok + 1
    after = policies.decider(ctx(), [])
    assert after.decide(resource("Encounter")).decision is Decision.WITHHOLD
    # A decider made before the reload finishes its response under the policy it began with.
    assert before.policy_version == "v1"
    assert before.decide(resource("Encounter")).decision is Decision.RELEASE


@pytest.mark.parametrize(
    ("broken", "needle"),
    [
        ("version = 'v2'\n[[rule]\n", "not valid TOML"),
        ('version = "v2"\n[[rule]]\nid = "bad-rule"\ndecision = "qualify"\n', "rule 'bad-rule' (#1): decision qualify needs labels"),
    ],
)
def test_reload_with_a_broken_file_keeps_the_policy(tmp_path: Path, broken: str, needle: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(GOOD)
    policies = PolicySet.load(path)
    path.write_text(broken)
    failed = _reloads("failed")
    with pytest.raises(PolicyError) as caught:
        policies.reload()
    assert needle in str(caught.value) and str(path) in str(caught.value)
    assert _reloads("failed") == failed + 1
    assert policies.version == "v1"
    assert policies.decider(ctx(), []).decide(resource("Observation")).rule == "no-obs"


def test_reload_with_the_file_gone_keeps_the_policy(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(GOOD)
    policies = PolicySet.load(path)
    path.unlink()
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        policies.reload()
    assert policies.version == "v1"


def test_load_of_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read the policy file"):
        PolicySet.load(tmp_path / "absent.toml")


def test_unless_with_only_request_conditions_drops_the_rule() -> None:
    text = """
version = "x"
[[rule]]
id = "obs-withheld-except-gp"
when.type = "Observation"
unless.organization = "GP1"
decision = "withhold"
"""
    policies = PolicySet.from_text(text)
    assert policies.decider(ctx(org="GP1"), [], now=NOW).decide(resource()).decision is Decision.RELEASE
    assert policies.decider(ctx(org="X"), [], now=NOW).decide(resource()).decision is Decision.WITHHOLD
    assert policies.decider(ctx(org="X"), [consent("OPTIN")], now=NOW).decide(resource()).decision is Decision.WITHHOLD
