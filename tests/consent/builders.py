"""Builders for consent tests: Consent records, provisions, clinical resources, contexts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sharedcare.consent import RequestContext

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
REASON = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
PARTICIPATION = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
TYPES = "http://hl7.org/fhir/resource-types"
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ODS = "https://fhir.nhs.uk/Id/ods-organization-code"


def consent(
    policy: str | None = "OPTIN",
    provision: dict[str, Any] | None = None,
    *,
    id: str = "c1",
    status: str = "active",
    scope: str = "patient-privacy",
    date_time: str | None = "2024-01-01",
) -> dict[str, Any]:
    """A patient-privacy Consent for Patient/p1."""
    body: dict[str, Any] = {
        "resourceType": "Consent",
        "id": id,
        "status": status,
        "scope": {"coding": [{"system": SCOPE, "code": scope}]},
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": "Patient/p1"},
    }
    if date_time:
        body["dateTime"] = date_time
    if policy:
        body["policyRule"] = {"coding": [{"system": ACT, "code": policy}]}
    if provision is not None:
        body["provision"] = provision
    return body


def provision(
    type: str | None = None,
    *,
    actors: list[tuple[str | None, str]] = (),  # type: ignore[assignment]
    purposes: tuple[str, ...] = (),
    labels: tuple[str, ...] = (),
    classes: tuple[str, ...] = (),
    codes: tuple[str, ...] = (),
    actions: tuple[str, ...] = (),
    period: tuple[str | None, str | None] | None = None,
    data: tuple[str, ...] = (),
    children: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    """A provision; actors are (role code or None, reference "Organization/x" or identifier value)."""
    p: dict[str, Any] = {}
    if type:
        p["type"] = type
    if period:
        p["period"] = {k: v for k, v in zip(("start", "end"), period, strict=True) if v}
    if actors:
        p["actor"] = []
        for role, who in actors:
            ref = {"reference": who} if "/" in who else {"identifier": {"system": ODS, "value": who}}
            actor: dict[str, Any] = {"reference": ref}
            if role:
                actor["role"] = {"coding": [{"system": PARTICIPATION, "code": role}]}
            p["actor"].append(actor)
    if actions:
        p["action"] = [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentaction", "code": a}]} for a in actions]
    if labels:
        p["securityLabel"] = [_coding(v) for v in labels]
    if purposes:
        p["purpose"] = [{"system": REASON, "code": v} for v in purposes]
    if classes:
        p["class"] = [{"system": TYPES, "code": v} for v in classes]
    if codes:
        p["code"] = [{"coding": [_coding(v)]} for v in codes]
    if data:
        p["data"] = [{"meaning": "instance", "reference": {"reference": v}} for v in data]
    if children:
        p["provision"] = list(children)
    return p


def _coding(value: str) -> dict[str, str]:
    system, _, code = value.rpartition("|")
    return {"system": system, "code": code}


def label(code: str) -> str:
    """A security label key: v3-Confidentiality for R/V/N..., v3-ActCode otherwise."""
    return f"{CONF}|{code}" if code in ("U", "L", "M", "N", "R", "V") else f"{ACT}|{code}"


def resource(rtype: str = "Observation", id: str = "r1", *, labels: tuple[str, ...] = (), code: str | None = None, **extra: Any) -> dict[str, Any]:
    """A clinical resource with optional security labels (codes, see ``label``) and a code."""
    body: dict[str, Any] = {"resourceType": rtype, "id": id, "meta": {"versionId": "1"}}
    if labels:
        body["meta"]["security"] = [_coding(label(c)) for c in labels]
    if code:
        concept = {"coding": [_coding(code)]}
        element = {
            "MedicationRequest": "medicationCodeableConcept",
            "Immunization": "vaccineCode",
            "DocumentReference": "type",
        }.get(rtype, "code")
        body[element] = concept
    body.update(extra)
    return body


def ctx(role: str | None = "R8000", purpose: str | None = "TREAT", org: str | None = "RR8", client: str = "portal", provider: Any = None) -> RequestContext:
    return RequestContext(client_id=client, user_role=role, organization=org, purpose=purpose, provider=provider)
