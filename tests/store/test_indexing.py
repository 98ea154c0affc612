"""Index-row extraction: value rules, every hub type, and the fast walker vs fhirpathpy."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import fhirpathpy
import orjson
import pytest
from fhirpathpy.models import models
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharedcare.store.indexing import (
    FHIRPATH_OPTIONS,
    Indexer,
    IndexRows,
    date_range,
    normalize_string,
    split_reference,
)
from sharedcare.store.searchparams import HUB_TYPES, SearchParam, load_search_params

PARAMS = load_search_params(HUB_TYPES)
INDEXER = Indexer(PARAMS)
NHS = "https://fhir.nhs.uk/Id/nhs-number"
ODS = "https://fhir.nhs.uk/Id/ods-organization-code"
SNOMED = "http://snomed.info/sct"
MIN, MAX = datetime.min, datetime.max


def dt(*args: int) -> datetime:
    return datetime(*args)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("value", "low", "high"),
    [
        ("2024", dt(2024, 1, 1), dt(2025, 1, 1)),
        ("2024-02", dt(2024, 2, 1), dt(2024, 3, 1)),
        ("2024-12", dt(2024, 12, 1), dt(2025, 1, 1)),
        ("2024-02-29", dt(2024, 2, 29), dt(2024, 3, 1)),
        ("2024-12-31", dt(2024, 12, 31), dt(2025, 1, 1)),
        ("2024-02-29T10:15", dt(2024, 2, 29, 10, 15), dt(2024, 2, 29, 10, 16)),
        ("2024-02-29T10:15Z", dt(2024, 2, 29, 10, 15), dt(2024, 2, 29, 10, 16)),
        ("2024-02-29T10:15:30", dt(2024, 2, 29, 10, 15, 30), dt(2024, 2, 29, 10, 15, 31)),
        ("2024-02-29T10:15:30Z", dt(2024, 2, 29, 10, 15, 30), dt(2024, 2, 29, 10, 15, 31)),
        (
            "2024-02-29T10:15:30.5Z",
            dt(2024, 2, 29, 10, 15, 30, 500000),
            dt(2024, 2, 29, 10, 15, 30, 600000),
        ),
        (
            "2024-02-29T10:15:30.123+01:00",
            dt(2024, 2, 29, 9, 15, 30, 123000),
            dt(2024, 2, 29, 9, 15, 30, 124000),
        ),
        (
            "2024-01-01T00:00:00.123456789Z",
            dt(2024, 1, 1, 0, 0, 0, 123456),
            dt(2024, 1, 1, 0, 0, 0, 123457),
        ),
        ("2024-02-29T23:30:00-05:00", dt(2024, 3, 1, 4, 30), dt(2024, 3, 1, 4, 30, 1)),
        ("2024-03-01T00:30+14:00", dt(2024, 2, 29, 10, 30), dt(2024, 2, 29, 10, 31)),
        ("2024-03-01T00:30:00+00:00", dt(2024, 3, 1, 0, 30), dt(2024, 3, 1, 0, 30, 1)),
        ("2016-12-31T23:59:60Z", dt(2016, 12, 31, 23, 59, 59), dt(2017, 1, 1)),  # leap second
        ("9999-12-31T23:59:59Z", dt(9999, 12, 31, 23, 59, 59), MAX),
        ("9999-12-31T23:59:59-01:00", None, None),
        ("9999", dt(9999, 1, 1), MAX),
        ("0001-01-01", dt(1, 1, 1), dt(1, 1, 2)),
    ],
)
def test_date_range(value: str, low: datetime | None, high: datetime | None) -> None:
    if low is None:  # shifted past 9999-12-31: not representable
        with pytest.raises(ValueError):
            date_range(value)
    else:
        assert date_range(value) == (low, high)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "24",
        "abcd",
        " 2024",
        "2024 ",
        "20240101",
        "0000",
        "2024-13",
        "2024-00",
        "2024-02-30",
        "2023-02-29",
        "2024-1-01",
        "2024-01-01T25:00",
        "2024-01-01T10",
        "2024-01-01T10:61",
        "2024-01-01 10:00",
        "2024-01-01Z",
        "2024Z",
        "2024-01-01T10:00:00+15:00",
        "2024-01-01T10:00:00+14:30",
        "2024-01-01T10:00:00+0100",
        "2024-01-01T10:00:00.Z",
        "2024-01-01T10:00:61Z",
        "9999-12-31T23:00:00-05:00",
        "٢٠٢٤",  # Arabic-Indic digits
    ],
)
def test_date_range_rejects(value: str) -> None:
    with pytest.raises(ValueError):
        date_range(value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Ménard", "menard"),
        ("  Jane \t  Anne\n", "jane anne"),
        ("ÉLODIE", "elodie"),
        ("Zoë", "zoe"),
        ("Straße", "strasse"),
        ("İstanbul", "istanbul"),
        ("ﬁsh", "fish"),
        ("O'Brien-Smith", "o'brien-smith"),
        ("LS1\u00a06AE", "ls1 6ae"),
        ("", ""),
    ],
)
def test_normalize_string(value: str, expected: str) -> None:
    assert normalize_string(value) == expected


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("Patient/123", ("Patient", "123")),
        ("Patient/123/_history/4", ("Patient", "123")),
        ("https://hub.example.org/fhir/Organization/Y1.2-3", ("Organization", "Y1.2-3")),
        ("http://x/fhir/Patient/9/_history/2", ("Patient", "9")),
        ("urn:uuid:3fdc72f4-a11d-4a9d-9a83-cd7ab5dd3ae7", (None, None)),
        ("urn:oid:1.2.3", (None, None)),
        ("not a reference", (None, None)),
        ("#contained", None),
        ("", None),
    ],
)
def test_split_reference(reference: str, expected: Any) -> None:
    assert split_reference(reference) == expected


# ------------------------------------------------------------------ hub resources

THO = "http://terminology.hl7.org/CodeSystem/"


def coding(system: str, code: str) -> dict[str, str]:
    return {"system": system, "code": code}


def cc(system: str, code: str) -> dict[str, Any]:
    return {"coding": [coding(system, code)]}


def ref(reference: str) -> dict[str, str]:
    return {"reference": reference}


PATIENT: dict[str, Any] = {
    "resourceType": "Patient",
    "id": "p1",
    "meta": {
        "profile": ["https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"],
        "tag": [coding("https://sharedcare.example/tags", "imported")],
        "source": "https://gp.example/fhir",
    },
    "identifier": [{"system": NHS, "value": "9000000009"}],
    "active": True,
    "name": [{"use": "official", "family": "Ménard", "given": ["Jane", "Anne"], "prefix": ["Mrs"]}],
    "gender": "female",
    "birthDate": "1974-12-25",
    "address": [
        {
            "use": "home",
            "line": ["1 Trevelyan Square", "Boar Lane"],
            "city": "Leeds",
            "postalCode": "LS1 6AE",
            "country": "GB",
        }
    ],
    "telecom": [
        {"system": "phone", "value": "01632 960587", "use": "home"},
        {"system": "email", "value": "jane@example.org"},
    ],
    "communication": [{"language": cc("urn:ietf:bcp:47", "en-GB")}],
    "generalPractitioner": [ref("Organization/Y12345")],
    "managingOrganization": ref("Organization/Y12345"),
    "link": [{"other": ref("Patient/p0"), "type": "replaces"}],
}

RESOURCES: dict[str, dict[str, Any]] = {
    "Patient": PATIENT,
    "Organization": {
        "resourceType": "Organization",
        "identifier": [{"system": ODS, "value": "Y12345"}],
        "active": True,
        "type": [cc(THO + "organization-type", "prov")],
        "name": "Leeds Road Surgery",
        "alias": ["LRS"],
        "address": [{"city": "Leeds", "postalCode": "LS2 7UE"}],
        "partOf": ref("Organization/ICB1"),
        "endpoint": [ref("Endpoint/e1")],
    },
    "Practitioner": {
        "resourceType": "Practitioner",
        "identifier": [{"system": "https://fhir.hl7.org.uk/Id/gmc-number", "value": "C1234567"}],
        "active": True,
        "name": [{"family": "Okafor", "given": ["Chidi"], "prefix": ["Dr"]}],
        "telecom": [{"system": "email", "value": "c.okafor@nhs.net"}],
        "gender": "male",
        "communication": [cc("urn:ietf:bcp:47", "en")],
    },
    "PractitionerRole": {
        "resourceType": "PractitionerRole",
        "active": True,
        "period": {"start": "2020-04-01"},
        "practitioner": ref("Practitioner/pr1"),
        "organization": ref("Organization/Y12345"),
        "code": [cc(SNOMED, "62247001")],
        "specialty": [cc(SNOMED, "394814009")],
        "telecom": [{"system": "phone", "value": "0113 496 0000"}],
        "endpoint": [ref("Endpoint/e1")],
    },
    "Endpoint": {
        "resourceType": "Endpoint",
        "identifier": [{"system": "https://sharedcare.example/endpoints", "value": "gp-y12345"}],
        "status": "active",
        "connectionType": coding(THO + "endpoint-connection-type", "hl7-fhir-rest"),
        "name": "Leeds Road Surgery FHIR API",
        "managingOrganization": ref("Organization/Y12345"),
        "payloadType": [cc("http://hl7.org/fhir/resource-types", "Patient")],
        "address": "https://gp.example/fhir",
    },
    "Consent": {
        "resourceType": "Consent",
        "status": "active",
        "scope": cc(THO + "consentscope", "patient-privacy"),
        "category": [cc("http://loinc.org", "59284-0")],
        "patient": ref("Patient/p1"),
        "dateTime": "2024-03-01T10:00:00Z",
        "performer": [ref("Patient/p1")],
        "organization": [ref("Organization/Y12345")],
        "provision": {
            "type": "deny",
            "period": {"start": "2024-03-01", "end": "2025-02-28"},
            "actor": [
                {"role": cc(THO + "v3-RoleClass", "PROV"), "reference": ref("Organization/ORG2")}
            ],
            "action": [cc(THO + "consentaction", "access")],
            "purpose": [coding(THO + "v3-ActReason", "TREAT")],
            "data": [{"meaning": "related", "reference": ref("DocumentReference/d1")}],
        },
    },
    "AuditEvent": {
        "resourceType": "AuditEvent",
        "type": coding(THO + "audit-event-type", "rest"),
        "subtype": [coding("http://hl7.org/fhir/restful-interaction", "read")],
        "action": "R",
        "recorded": "2024-05-01T12:30:45.123+01:00",
        "outcome": "0",
        "agent": [
            {
                "who": ref("Practitioner/pr1"),
                "name": "Dr Chidi Okafor",
                "requestor": True,
                "network": {"address": "10.0.0.1", "type": "2"},
                "policy": ["https://sharedcare.example/policy/direct-care"],
            }
        ],
        "source": {"site": "sharedcare-hub", "observer": ref("Device/hub")},
        "entity": [{"what": ref("Patient/p1"), "type": coding(THO + "audit-entity-type", "1")}],
    },
    "Subscription": {
        "resourceType": "Subscription",
        "status": "active",
        "contact": [{"system": "email", "value": "ops@gp.example"}],
        "reason": "Notify GP of new documents",
        "criteria": "DocumentReference?patient=Patient/p1",
        "channel": {
            "type": "rest-hook",
            "endpoint": "https://gp.example/notify",
            "payload": "application/fhir+json",
        },
    },
    "Group": {
        "resourceType": "Group",
        "identifier": [{"system": "https://sharedcare.example/groups", "value": "g1"}],
        "type": "person",
        "actual": True,
        "code": cc(SNOMED, "44054006"),
        "managingEntity": ref("Organization/Y12345"),
        "characteristic": [
            {"code": cc(SNOMED, "73211009"), "valueBoolean": True, "exclude": False}
        ],
        "member": [{"entity": ref("Patient/p1")}, {"entity": ref("Patient/p2")}],
    },
    "Provenance": {
        "resourceType": "Provenance",
        "target": [ref("Patient/p1/_history/3"), ref("Consent/c1")],
        "occurredDateTime": "2024-03-01",
        "recorded": "2024-03-01T10:00:01Z",
        "agent": [{"who": ref("Organization/Y12345")}],
        "entity": [{"role": "source", "what": ref("DocumentReference/d0")}],
    },
    "DocumentReference": {
        "resourceType": "DocumentReference",
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": "urn:oid:1.2.3.4"},
        "status": "current",
        "type": cc(SNOMED, "373942005"),
        "subject": ref("Patient/p1"),
        "date": "2024-04-02T09:00:00+01:00",
        "author": [ref("Practitioner/pr1")],
        "custodian": ref("Organization/Y12345"),
        "description": "Discharge summary",
        "content": [{"attachment": {"contentType": "application/pdf", "url": "Binary/b1"}}],
        "context": {
            "encounter": [ref("Encounter/e9")],
            "period": {"start": "2024-03-28", "end": "2024-04-01"},
        },
    },
    "Binary": {
        "resourceType": "Binary",
        "meta": {"security": [coding(THO + "v3-Confidentiality", "R")]},
        "contentType": "application/pdf",
        "data": "JVBERi0=",
    },
}


def _rows(rtype: str) -> IndexRows:
    return INDEXER.extract(RESOURCES[rtype])


def test_every_hub_type_has_a_sample() -> None:
    assert set(RESOURCES) == set(HUB_TYPES)


CONSENT_ACTION = THO + "consentaction"
ACT_REASON = THO + "v3-ActReason"
CONNECTION = THO + "endpoint-connection-type"
UK_CORE = "https://fhir.hl7.org.uk/StructureDefinition/UKCore-Patient"
ORG = ("Organization", "Y12345", "Organization/Y12345")
P1 = ("Patient", "p1", "Patient/p1")
T, S, R, D, U = "tokens", "strings", "references", "dates", "uris"

# The rows a user searches by, per hub type (search.html#token, #string, #reference, #date, #uri)
EXPECTED_ROWS = [
    ("Patient", T, ("identifier", NHS, "9000000009")),
    ("Patient", T, ("gender", None, "female")),
    ("Patient", T, ("active", None, "true")),
    ("Patient", T, ("email", None, "jane@example.org")),
    ("Patient", T, ("phone", None, "01632 960587")),
    ("Patient", T, ("telecom", None, "01632 960587")),
    ("Patient", T, ("language", "urn:ietf:bcp:47", "en-GB")),
    ("Patient", T, ("_tag", "https://sharedcare.example/tags", "imported")),
    ("Patient", T, ("deceased", None, "false")),
    ("Patient", S, ("family", "menard", "Ménard")),
    ("Patient", S, ("given", "jane", "Jane")),
    ("Patient", S, ("given", "anne", "Anne")),
    ("Patient", S, ("name", "menard", "Ménard")),
    ("Patient", S, ("name", "mrs", "Mrs")),
    ("Patient", S, ("address", "boar lane", "Boar Lane")),
    ("Patient", S, ("address-city", "leeds", "Leeds")),
    ("Patient", S, ("address-postalcode", "ls1 6ae", "LS1 6AE")),
    ("Patient", D, ("birthdate", dt(1974, 12, 25), dt(1974, 12, 26))),
    ("Patient", R, ("organization", *ORG)),
    ("Patient", R, ("general-practitioner", *ORG)),
    ("Patient", R, ("link", "Patient", "p0", "Patient/p0")),
    ("Patient", U, ("_profile", UK_CORE)),
    ("Patient", U, ("_source", "https://gp.example/fhir")),
    ("Organization", T, ("identifier", ODS, "Y12345")),
    ("Organization", S, ("name", "leeds road surgery", "Leeds Road Surgery")),
    ("Organization", S, ("name", "lrs", "LRS")),  # alias
    ("Organization", R, ("partof", "Organization", "ICB1", "Organization/ICB1")),
    ("Organization", R, ("endpoint", "Endpoint", "e1", "Endpoint/e1")),
    ("Practitioner", S, ("family", "okafor", "Okafor")),
    ("Practitioner", T, ("communication", "urn:ietf:bcp:47", "en")),
    ("PractitionerRole", R, ("practitioner", "Practitioner", "pr1", "Practitioner/pr1")),
    ("PractitionerRole", T, ("role", SNOMED, "62247001")),
    ("PractitionerRole", D, ("date", dt(2020, 4, 1), MAX)),  # open-ended period
    ("PractitionerRole", T, ("phone", None, "0113 496 0000")),
    ("Endpoint", T, ("status", None, "active")),
    ("Endpoint", T, ("connection-type", CONNECTION, "hl7-fhir-rest")),
    ("Endpoint", T, ("payload-type", "http://hl7.org/fhir/resource-types", "Patient")),
    ("Endpoint", R, ("organization", *ORG)),
    ("Consent", R, ("patient", *P1)),
    ("Consent", R, ("consentor", *P1)),
    ("Consent", R, ("actor", "Organization", "ORG2", "Organization/ORG2")),
    ("Consent", R, ("data", "DocumentReference", "d1", "DocumentReference/d1")),
    ("Consent", D, ("period", dt(2024, 3, 1), dt(2025, 3, 1))),
    ("Consent", D, ("date", dt(2024, 3, 1, 10), dt(2024, 3, 1, 10, 0, 1))),
    ("Consent", T, ("action", CONSENT_ACTION, "access")),
    ("Consent", T, ("purpose", ACT_REASON, "TREAT")),
    ("Consent", T, ("status", None, "active")),
    (
        "AuditEvent",
        D,
        ("date", dt(2024, 5, 1, 11, 30, 45, 123000), dt(2024, 5, 1, 11, 30, 45, 124000)),
    ),
    ("AuditEvent", R, ("agent", "Practitioner", "pr1", "Practitioner/pr1")),
    ("AuditEvent", R, ("entity", *P1)),
    ("AuditEvent", R, ("source", "Device", "hub", "Device/hub")),
    ("AuditEvent", T, ("action", None, "R")),
    ("AuditEvent", T, ("subtype", "http://hl7.org/fhir/restful-interaction", "read")),
    ("AuditEvent", T, ("site", None, "sharedcare-hub")),
    ("AuditEvent", S, ("agent-name", "dr chidi okafor", "Dr Chidi Okafor")),
    ("AuditEvent", S, ("address", "10.0.0.1", "10.0.0.1")),
    ("AuditEvent", U, ("policy", "https://sharedcare.example/policy/direct-care")),
    ("Subscription", T, ("status", None, "active")),
    ("Subscription", T, ("type", None, "rest-hook")),
    ("Subscription", T, ("payload", None, "application/fhir+json")),
    ("Subscription", T, ("contact", None, "ops@gp.example")),
    (
        "Subscription",
        S,
        (
            "criteria",
            "documentreference?patient=patient/p1",
            "DocumentReference?patient=Patient/p1",
        ),
    ),
    ("Subscription", U, ("url", "https://gp.example/notify")),
    ("Group", T, ("actual", None, "true")),
    ("Group", T, ("type", None, "person")),
    ("Group", T, ("characteristic", SNOMED, "73211009")),
    ("Group", T, ("value", None, "true")),  # valueBoolean via "as boolean"
    ("Group", T, ("exclude", None, "false")),
    ("Provenance", R, ("target", "Patient", "p1", "Patient/p1/_history/3")),
    ("Provenance", R, ("target", "Consent", "c1", "Consent/c1")),
    ("Provenance", R, ("entity", "DocumentReference", "d0", "DocumentReference/d0")),
    ("Provenance", D, ("when", dt(2024, 3, 1), dt(2024, 3, 2))),
    ("Provenance", D, ("recorded", dt(2024, 3, 1, 10, 0, 1), dt(2024, 3, 1, 10, 0, 2))),
    ("DocumentReference", R, ("subject", *P1)),
    ("DocumentReference", R, ("patient", *P1)),
    ("DocumentReference", R, ("encounter", "Encounter", "e9", "Encounter/e9")),
    ("DocumentReference", T, ("type", SNOMED, "373942005")),
    ("DocumentReference", T, ("identifier", "urn:ietf:rfc:3986", "urn:oid:1.2.3.4")),
    ("DocumentReference", T, ("contenttype", None, "application/pdf")),
    ("DocumentReference", D, ("date", dt(2024, 4, 2, 8), dt(2024, 4, 2, 8, 0, 1))),
    ("DocumentReference", D, ("period", dt(2024, 3, 28), dt(2024, 4, 2))),
    ("DocumentReference", U, ("location", "Binary/b1")),
    ("DocumentReference", S, ("description", "discharge summary", "Discharge summary")),
]


@pytest.mark.parametrize(("rtype", "kind", "row"), EXPECTED_ROWS)
def test_hub_rows(rtype: str, kind: str, row: tuple[Any, ...]) -> None:
    assert row in getattr(_rows(rtype), kind)


@pytest.mark.parametrize(
    ("rtype", "code", "rows"),
    [
        ("Patient", "email", [("email", None, "jane@example.org")]),  # where(system='email')
        # patient = agent.who or entity.what *that is a Patient*: the Practitioner is left out
        ("AuditEvent", "patient", [("patient", *P1)]),
        ("Provenance", "patient", [("patient", "Patient", "p1", "Patient/p1/_history/3")]),
        ("Group", "member", [("member", *P1), ("member", "Patient", "p2", "Patient/p2")]),
    ],
)
def test_hub_rows_exactly(rtype: str, code: str, rows: list[tuple[Any, ...]]) -> None:
    extracted = _rows(rtype)
    every = extracted.tokens + extracted.strings + extracted.references + extracted.dates
    assert [r for r in every if r[0] == code] == rows


def test_binary_rows() -> None:
    security = THO + "v3-Confidentiality"
    assert _rows("Binary") == IndexRows([("_security", security, "R")], [], [], [], [])


# -------------------------------------------------------------- value edge cases


def _patient(**fields: Any) -> IndexRows:
    return INDEXER.extract({"resourceType": "Patient", **fields})


def test_choice_elements_and_deceased() -> None:
    rows = _patient(deceasedDateTime="2023-06-01T08:00:00Z")
    assert ("death-date", dt(2023, 6, 1, 8), dt(2023, 6, 1, 8, 0, 1)) in rows.dates
    assert ("deceased", None, "true") in rows.tokens
    rows = _patient(deceasedBoolean=True)
    assert ("deceased", None, "true") in rows.tokens and not rows.dates


def test_rows_are_deduplicated() -> None:
    ident = {"system": NHS, "value": "9000000009"}
    rows = _patient(identifier=[ident, dict(ident)], name=[{"given": ["Ann", "Ann"]}])
    assert rows.tokens.count(("identifier", NHS, "9000000009")) == 1
    assert rows.strings.count(("given", "ann", "Ann")) == 1


@pytest.mark.parametrize(
    ("reference", "row"),
    [
        ("Organization/o1", ("organization", "Organization", "o1", "Organization/o1")),
        (
            "https://x.example/fhir/Organization/o1/_history/2",
            (
                "organization",
                "Organization",
                "o1",
                "https://x.example/fhir/Organization/o1/_history/2",
            ),
        ),
        (
            "urn:uuid:0b8b1c8e-2d6f-4f4e-9d5c-3f1a1c2b3d4e",
            ("organization", None, None, "urn:uuid:0b8b1c8e-2d6f-4f4e-9d5c-3f1a1c2b3d4e"),
        ),
        ("#org", None),
    ],
)
def test_reference_forms(reference: str, row: Any) -> None:
    refs = _patient(managingOrganization={"reference": reference}).references
    assert refs == ([row] if row else [])


def test_bad_values_are_skipped_not_raised() -> None:
    rows = _patient(
        birthDate="25/12/1974",
        deceasedDateTime=12,
        name=[{"family": None, "given": [None, "Jo", 3]}, "junk"],
        identifier=[{"system": NHS}, {"value": ""}, 7],
        telecom={"value": "x"},
        managingOrganization={"display": "no reference"},
        generalPractitioner=[{"reference": 5}],
        meta={"tag": "not-a-list", "profile": [None]},
    )
    assert rows.dates == []
    assert ("given", "jo", "Jo") in rows.strings
    assert [t for t in rows.tokens if t[0] == "identifier"] == []
    assert ("telecom", None, "x") in rows.tokens
    assert rows.references == [] and rows.uris == []


def test_periods() -> None:
    role = {"resourceType": "PractitionerRole"}
    extract = INDEXER.extract
    assert extract({**role, "period": {"end": "2020"}}).dates == [("date", MIN, dt(2021, 1, 1))]
    assert extract({**role, "period": {}}).dates == []
    assert extract({**role, "period": {"start": "bad"}}).dates == []
    assert extract({**role, "period": {"start": "2021", "end": "2020"}}).dates == []


def test_unknown_resource_type_has_no_rows() -> None:
    rows = INDEXER.extract({"resourceType": "Observation", "status": "final"})
    assert rows == IndexRows([], [], [], [], [])


def test_hub_types_need_no_fhirpathpy_fallback() -> None:
    assert INDEXER.fallbacks == {t: [] for t in HUB_TYPES}


def test_unhandled_forms_fall_back_to_fhirpathpy() -> None:
    params = {
        "first-family": SearchParam(
            "first-family", "string", "Patient", "Patient.name.first().family", (), "urn:test:1"
        ),
        "gp-org": SearchParam(
            "gp-org",
            "reference",
            "Patient",
            "Patient.generalPractitioner.where(resolve() is Organization).first()",
            (),
            "urn:test:2",
        ),
    }
    indexer = Indexer({"Patient": params})
    assert len(indexer.fallbacks["Patient"]) == 2
    rows = indexer.extract(
        {
            "resourceType": "Patient",
            "name": [{"family": "Ménard"}, {"family": "Other"}],
            "generalPractitioner": [
                {"reference": "Practitioner/x"},
                {"reference": "Organization/y"},
            ],
        }
    )
    assert rows.strings == [("first-family", "menard", "Ménard")]
    assert rows.references == [("gp-org", "Organization", "y", "Organization/y")]


def test_bundle_composition_falls_back() -> None:
    indexer = Indexer(load_search_params(["Bundle"]))
    assert {code for code, _ in indexer.fallbacks["Bundle"]} == {"composition", "message"}
    bundle = {
        "resourceType": "Bundle",
        "type": "document",
        "entry": [{"resource": {"resourceType": "Composition", "id": "c1"}}],
    }
    assert ("composition", "Composition", "c1", "Composition/c1") in indexer.extract(
        bundle
    ).references


# ----------------------------------------------------------------------- properties


@st.composite
def fhir_datetimes(draw: st.DrawFn) -> str:
    """FHIR date / dateTime / instant strings at every precision, with and without zones."""
    day = draw(st.dates())
    precision = draw(st.sampled_from(["y", "m", "d", "min", "s", "frac"]))
    if precision in ("y", "m", "d"):
        return day.isoformat()[: {"y": 4, "m": 7, "d": 10}[precision]]
    out = f"{day.isoformat()}T{draw(st.integers(0, 23)):02d}:{draw(st.integers(0, 59)):02d}"
    if precision in ("s", "frac"):
        out += f":{draw(st.integers(0, 60)):02d}"
    if precision == "frac":
        out += "." + draw(st.text("0123456789", min_size=1, max_size=9))
    tz = draw(st.sampled_from(["", "Z", "+", "-"]))
    if tz in ("+", "-"):
        hours = draw(st.integers(0, 14))
        tz += f"{hours:02d}:{0 if hours == 14 else draw(st.integers(0, 59)):02d}"
    return out + tz


@given(fhir_datetimes())
def test_date_range_is_a_nonempty_naive_range(value: str) -> None:
    try:
        low, high = date_range(value)
    except ValueError:
        # Only a timezone shift before year 1 / after 9999 is unrepresentable.
        assert value[:4] in ("0001", "9999") and value[-6] in "+-"
        return
    assert low < high
    assert low.tzinfo is None and high.tzinfo is None
    if "T" not in value:  # a date: the range starts at midnight of its first day
        y, m, d = (value.split("-") + ["01", "01"])[:3]
        assert low == datetime(int(y), int(m), int(d))


R4 = models["r4"]
_texts = st.text(
    st.characters(codec="utf-8", exclude_categories=("Cs", "Cc")), min_size=1, max_size=12
)
_refs = st.sampled_from(
    [
        "Patient/p1",
        "Organization/o1",
        "Practitioner/pr1",
        "PractitionerRole/r1",
        "http://x.example/fhir/Patient/p2/_history/1",
        "urn:uuid:6e8f1b7e-0000-4000-8000-000000000001",
        "#contained",
        "RelatedPerson/rp1",
    ]
)
_codings = st.fixed_dictionaries(
    {}, optional={"system": st.sampled_from([SNOMED, NHS]), "code": _texts}
)


def _opt(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({}, optional=fields)


def _lists(elements: st.SearchStrategy[Any]) -> st.SearchStrategy[list[Any]]:
    return st.lists(elements, min_size=1, max_size=3)


_patient_elements = st.fixed_dictionaries(
    {"resourceType": st.just("Patient")},
    optional={
        "identifier": _lists(_opt(system=st.sampled_from([NHS, ODS]), value=_texts)),
        "active": st.booleans(),
        "name": _lists(
            _opt(
                family=_texts,
                given=_lists(_texts),
                prefix=_lists(_texts),
                suffix=_lists(_texts),
                text=_texts,
                use=st.just("official"),
            )
        ),
        "telecom": _lists(
            _opt(
                system=st.sampled_from(["phone", "email", "fax", "url"]),
                value=_texts,
                use=st.just("home"),
            )
        ),
        "gender": st.sampled_from(["male", "female", "other", "unknown"]),
        "birthDate": fhir_datetimes(),
        "address": _lists(
            _opt(
                line=_lists(_texts),
                city=_texts,
                district=_texts,
                state=_texts,
                postalCode=_texts,
                country=_texts,
                use=st.just("home"),
            )
        ),
        "communication": _lists(
            st.fixed_dictionaries({"language": _opt(coding=_lists(_codings), text=_texts)})
        ),
        "generalPractitioner": _lists(_opt(reference=_refs, display=_texts)),
        "managingOrganization": _opt(reference=_refs),
        "link": _lists(
            st.fixed_dictionaries({"other": _opt(reference=_refs), "type": st.just("seealso")})
        ),
        "meta": _opt(
            tag=_lists(_codings),
            security=_lists(_codings),
            profile=_lists(st.just("http://x/StructureDefinition/p")),
            source=_texts,
        ),
    },
)


# deceased[x] is a choice: at most one of its variants may be present.
patients = st.tuples(
    _patient_elements,
    st.one_of(
        st.just({}),
        st.builds(lambda b: {"deceasedBoolean": b}, st.booleans()),
        st.builds(lambda d: {"deceasedDateTime": d}, fhir_datetimes()),
    ),
).map(lambda pair: {**pair[0], **pair[1]})


def _canon(values: list[Any]) -> set[bytes]:
    # A set: FHIRPath's "|" deduplicates while the walker may repeat a value; rows are
    # deduplicated anyway.
    return {orjson.dumps(v, option=orjson.OPT_SORT_KEYS) for v in values}


def _assert_walker_agrees(resource: dict[str, Any]) -> None:
    rtype = resource["resourceType"]
    for code, sp in PARAMS[rtype].items():
        expected = fhirpathpy.evaluate(resource, sp.expression, model=R4, options=FHIRPATH_OPTIONS)
        assert _canon(INDEXER.values(resource, code)) == _canon(expected), (code, sp.expression)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(patients)
def test_fast_walker_agrees_with_fhirpathpy_for_patient(patient: dict[str, Any]) -> None:
    _assert_walker_agrees(patient)


@pytest.mark.parametrize("rtype", HUB_TYPES)
def test_fast_walker_agrees_with_fhirpathpy_for_hub_samples(rtype: str) -> None:
    _assert_walker_agrees(RESOURCES[rtype])
