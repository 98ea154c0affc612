"""SMART v1/v2 scope parsing, granting, and the interactions each FHIR request needs."""

from __future__ import annotations

import pytest

from sharedcare.iam.middleware import bundle_interactions, interactions
from sharedcare.iam.scopes import Grants, grant, parse_scope


@pytest.mark.parametrize(
    ("text", "resource", "permissions"),
    [
        ("system/Patient.read", "Patient", "rs"),  # v1
        ("system/Patient.write", "Patient", "cud"),
        ("system/*.*", "*", "cruds"),
        ("system/*.read", "*", "rs"),
        ("system/Observation.rs", "Observation", "rs"),  # v2
        ("system/Patient.cruds", "Patient", "cruds"),
        ("system/Patient.c", "Patient", "c"),
        ("system/Consent.cud", "Consent", "cud"),
        ("system/*.s", "*", "s"),
    ],
)
def test_valid_scopes(text: str, resource: str, permissions: str) -> None:
    scope = parse_scope(text)
    assert scope is not None
    assert (scope.resource, scope.permissions) == (resource, frozenset(permissions))


@pytest.mark.parametrize(
    "text",
    [
        "patient/Patient.read",  # not a backend-services context
        "user/Patient.rs",
        "system/Patient.sr",  # v2 letters out of order
        "system/Patient.rrs",
        "system/Patient.x",
        "system/Patient.",
        "system/patient.read",
        "system/Observation.rs?category=laboratory",  # granular scopes are not granted
        "sharedcare/admin",  # not a resource scope (granted separately)
        "openid",
        "",
    ],
)
def test_unsupported_scopes(text: str) -> None:
    assert parse_scope(text) is None


@pytest.mark.parametrize(
    ("requested", "allowed", "granted"),
    [
        ("system/Patient.read", "system/Patient.read", ["system/Patient.read"]),
        ("system/Patient.rs", "system/Patient.read", ["system/Patient.rs"]),  # v2 within v1
        ("system/Patient.r", "system/*.read", ["system/Patient.r"]),
        ("system/Patient.read system/Consent.read", "system/Patient.rs", ["system/Patient.read"]),
        ("system/Patient.write", "system/Patient.read", []),
        ("system/*.read", "system/Patient.read", []),  # wider than allowed
        ("system/*.read", "system/*.*", ["system/*.read"]),
        ("sharedcare/admin system/Endpoint.cruds", "system/*.* sharedcare/admin", ["sharedcare/admin", "system/Endpoint.cruds"]),
        ("sharedcare/admin", "system/*.*", []),
        ("system/Patient.read system/Patient.read", "system/Patient.read", ["system/Patient.read"]),
        ("", "system/*.*", []),
    ],
)
def test_grant_never_exceeds_what_is_allowed(requested: str, allowed: str, granted: list[str]) -> None:
    assert grant(requested, tuple(allowed.split())) == granted


def test_grants_combine_type_and_wildcard_scopes() -> None:
    grants = Grants.of(("system/Patient.c", "system/*.rs"))
    assert grants.allows("Patient", "c") and grants.allows("Consent", "r")
    assert not grants.allows("Consent", "c") and not grants.admin


@pytest.mark.parametrize(
    ("method", "path", "conditional", "needed"),
    [
        ("GET", "/fhir/Patient", False, [("Patient", "s")]),
        ("GET", "/fhir/Patient/1", False, [("Patient", "r")]),
        ("GET", "/fhir/Patient/1/_history/2", False, [("Patient", "r")]),
        ("GET", "/fhir/Patient/1/_history", False, [("Patient", "r")]),
        ("GET", "/fhir/Patient/_history", False, [("Patient", "s")]),
        ("POST", "/fhir/Patient/_search", False, [("Patient", "s")]),
        ("POST", "/fhir/Patient", False, [("Patient", "c")]),
        ("POST", "/fhir/Patient", True, [("Patient", "c"), ("Patient", "s")]),
        ("PUT", "/fhir/Patient/1", False, [("Patient", "u")]),
        ("DELETE", "/fhir/Patient/1", False, [("Patient", "d")]),
        ("GET", "/fhir/providers/RR8/Observation/9", False, [("Observation", "r")]),
        ("OPTIONS", "/fhir/Patient", False, [("Patient", "c"), ("Patient", "u"), ("Patient", "d")]),
    ],
)
def test_interactions_of_rest_requests(
    method: str, path: str, conditional: bool, needed: list[tuple[str, str]]
) -> None:
    assert interactions(method, path, conditional) == needed


def test_bundle_entries_are_each_checked() -> None:
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=x|1"}},
            {"request": {"method": "PUT", "url": "http://hub/fhir/Consent/c1"}},
            {"request": {"method": "GET", "url": "Organization?name=leeds"}},
            {"request": {"method": "DELETE", "url": "Group/g"}},
            {"request": "nonsense"},
        ],
    }
    assert bundle_interactions(bundle, "http://hub/fhir") == [
        ("Patient", "c"), ("Patient", "s"), ("Consent", "u"), ("Organization", "s"), ("Group", "d"),
    ]
