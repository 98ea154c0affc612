"""The vendored R4 search parameter definitions and their per-type split."""

from __future__ import annotations

import dataclasses
import json
from importlib import resources

import pytest

from sharedcare.store.searchparams import (
    HUB_TYPES,
    SearchParam,
    load_search_params,
    split_union,
)

META_PARAMS = {"_tag": "tag", "_profile": "profile", "_security": "security", "_source": "source"}


def _vendored() -> list[dict]:
    raw = resources.files("sharedcare.store").joinpath("data/search-parameters.json").read_text()
    return json.loads(raw)


def test_vendored_file_is_trimmed_and_sorted() -> None:
    data = _vendored()
    assert len(data) == 1292
    assert [d["url"] for d in data] == sorted(d["url"] for d in data)
    for d in data:
        assert list(d) == ["url", "code", "base", "type", "expression", "target"]
        assert d["type"] in {"token", "string", "reference", "date", "uri"}
        assert d["expression"]
        assert isinstance(d["base"], list) and isinstance(d["target"], list)
    codes = {d["code"] for d in data if "Resource" in d["base"]}
    assert codes == {"_id", "_lastUpdated", "_tag", "_profile", "_security", "_source"}


def test_every_hub_type_is_loaded_with_meta_params_and_without_column_params() -> None:
    params = load_search_params(HUB_TYPES)
    assert tuple(params) == HUB_TYPES
    for rtype, by_code in params.items():
        assert "_id" not in by_code and "_lastUpdated" not in by_code
        for code, element in META_PARAMS.items():
            sp = by_code[code]
            assert sp.expression == f"{rtype}.meta.{element}"
            assert sp.resource_type == rtype
        for code, sp in by_code.items():
            assert sp.code == code
            for part in split_union(sp.expression):
                assert part.lstrip("(").startswith(f"{rtype}."), (code, part)


@pytest.mark.parametrize(
    ("rtype", "code", "type_", "expression"),
    [
        ("Patient", "identifier", "token", "Patient.identifier"),
        ("Patient", "gender", "token", "Patient.gender"),
        ("Patient", "birthdate", "date", "Patient.birthDate"),
        ("Patient", "email", "token", "Patient.telecom.where(system='email')"),
        ("Patient", "death-date", "date", "(Patient.deceased as dateTime)"),
        ("Practitioner", "family", "string", "Practitioner.name.family"),
        ("Consent", "patient", "reference", "Consent.patient"),
        ("Consent", "date", "date", "Consent.dateTime"),
        (
            "DocumentReference",
            "patient",
            "reference",
            "DocumentReference.subject.where(resolve() is Patient)",
        ),
        (
            "DocumentReference",
            "identifier",
            "token",
            "DocumentReference.masterIdentifier | DocumentReference.identifier",
        ),
        (
            "AuditEvent",
            "patient",
            "reference",
            (
                "AuditEvent.agent.who.where(resolve() is Patient)"
                " | AuditEvent.entity.what.where(resolve() is Patient)"
            ),
        ),
        (
            "Group",
            "value",
            "token",
            "(Group.characteristic.value as CodeableConcept) | (Group.characteristic.value as boolean)",
        ),
        ("Organization", "name", "string", "Organization.name | Organization.alias"),
        ("Subscription", "url", "uri", "Subscription.channel.endpoint"),
    ],
)
def test_union_expressions_are_split_per_type(
    rtype: str, code: str, type_: str, expression: str
) -> None:
    sp = load_search_params([rtype])[rtype][code]
    assert (sp.type, sp.expression) == (type_, expression)


def test_targets_and_url() -> None:
    sp = load_search_params(["Patient"])["Patient"]["general-practitioner"]
    assert sp.targets == ("Practitioner", "Organization", "PractitionerRole")
    assert sp.url == "http://hl7.org/fhir/SearchParameter/Patient-general-practitioner"
    assert load_search_params(["Patient"])["Patient"]["gender"].targets == ()


def test_binary_only_has_resource_level_params() -> None:
    assert set(load_search_params(["Binary"])["Binary"]) == set(META_PARAMS)


def test_untyped_expressions_are_prefixed() -> None:
    # R4's InsurancePlan-name is "name | alias", without the type.
    sp = load_search_params(["InsurancePlan"])["InsurancePlan"]["name"]
    assert sp.expression == "InsurancePlan.name | InsurancePlan.alias"


def test_unknown_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="Patients"):
        load_search_params(["Patient", "Patients"])


def test_results_are_independent_copies() -> None:
    first = load_search_params(["Patient"])
    first["Patient"].clear()
    assert load_search_params(["Patient"])["Patient"]


def test_search_param_is_frozen() -> None:
    sp = load_search_params(["Patient"])["Patient"]["gender"]
    assert isinstance(sp, SearchParam)
    with pytest.raises(dataclasses.FrozenInstanceError):
        sp.code = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("expression", "parts"),
    [
        ("A.b", ["A.b"]),
        ("A.b | B.c", ["A.b", "B.c"]),
        ("(A.b as X) | (B.c as Y)", ["(A.b as X)", "(B.c as Y)"]),
        ("(A.b | A.c).where(d='x|y') | B", ["(A.b | A.c).where(d='x|y')", "B"]),
        ("  ", []),
    ],
)
def test_split_union(expression: str, parts: list[str]) -> None:
    assert split_union(expression) == parts
