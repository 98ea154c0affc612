"""Checks a Consent record must pass before the hub stores it.

The decision engine fails closed on anything it cannot read (an unreadable record counts
as a full opt-out), so these checks exist to tell the person or system writing a record,
up front and precisely, what the hub would not honour as written. Every failure is a 422
OperationOutcome with the FHIRPath of the offending element.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from sharedcare.consent.dates import DateError, date_range, period_span
from sharedcare.consent.model import (
    CONSENT_ACTION,
    CONSENT_SCOPE,
    RESOURCE_TYPES,
    V3_ACT_CODE,
    V3_ACT_REASON,
    RequestContext,
)
from sharedcare.consent.records import (
    MAX_DEPTH,
    POLICY_RULE_BASE,
    ConsentRecordError,
    compile_record,
    is_privacy_consent,
)
from sharedcare.fhir.errors import FHIRError
from sharedcare.store.searchparams import r4_resource_types

STATUSES: Final = ("draft", "proposed", "active", "rejected", "inactive", "entered-in-error")
ACTIONS: Final = ("collect", "access", "correct", "disclose", "use")
CRITERIA: Final = ("actor", "action", "securityLabel", "purpose", "class", "code", "data", "period")


def _fail(message: str, expression: str) -> FHIRError:
    return FHIRError.of(422, "processing", message, expression=expression)


def check_consent_record(resource: Any) -> None:
    """Raise a 422 :class:`FHIRError` naming the problem if the hub cannot honour this Consent."""
    if not isinstance(resource, dict) or resource.get("resourceType") != "Consent":
        raise _fail("Expected a Consent resource.", "resourceType")
    status = resource.get("status")
    if status not in STATUSES:
        raise _fail(f"Consent.status must be one of {', '.join(STATUSES)}, not {status!r}.", "Consent.status")
    if not is_privacy_consent(resource):
        raise _fail(
            f"This hub keeps privacy consents only: Consent.scope must have the coding "
            f"{CONSENT_SCOPE}|patient-privacy.",
            "Consent.scope",
        )
    if not resource.get("category"):
        raise _fail("Consent.category is required (R4: 1..*), e.g. LOINC 59284-0 'Patient Consent'.", "Consent.category")
    patient = (resource.get("patient") or {}).get("reference")
    if not isinstance(patient, str) or "Patient/" not in patient:
        raise _fail("Consent.patient must reference the person it is about (Patient/<id>).", "Consent.patient")
    _check_policy_rule(resource)
    if resource.get("dateTime") is not None:
        _date(resource["dateTime"], "Consent.dateTime")
    root = resource.get("provision")
    if root is not None:
        if not isinstance(root, dict):
            raise _fail("Consent.provision must be an object.", "Consent.provision")
        _check_provision(root, "Consent.provision", depth=0)
        _check_not_ambiguous(resource, root)
    try:  # the engine's own reading is the last word
        compile_record({**resource, "status": "active"}, RequestContext(client_id="check"), datetime.now(UTC))
    except (ConsentRecordError, DateError, KeyError, TypeError, AttributeError) as exc:
        raise _fail(f"The consent cannot be interpreted: {exc}.", "Consent") from None


def _check_policy_rule(resource: dict[str, Any]) -> None:
    codings = (resource.get("policyRule") or {}).get("coding") or []
    known = ", ".join(sorted(POLICY_RULE_BASE))
    ours = [c for c in codings if isinstance(c, dict) and c.get("system") == V3_ACT_CODE]
    if not ours:
        raise _fail(
            f"Consent.policyRule must carry a coding from {V3_ACT_CODE}: one of {known} "
            "(OPTOUT: share nothing; OPTIN/OPTINR: share, with the provisions as exceptions).",
            "Consent.policyRule",
        )
    code = ours[0].get("code")
    if code not in POLICY_RULE_BASE:
        raise _fail(f"Unknown policyRule {code!r}; this hub knows {known}.", "Consent.policyRule")


def _date(value: Any, expression: str) -> None:
    try:
        date_range(value)
    except DateError as exc:
        raise _fail(str(exc), expression) from None


def _codings(values: Any, expression: str, what: str) -> list[dict[str, Any]]:
    if not isinstance(values, list):
        raise _fail(f"{expression} must be a list.", expression)
    for i, c in enumerate(values):
        if not isinstance(c, dict) or not isinstance(c.get("code"), str) or not c["code"]:
            raise _fail(f"Each {what} needs a code.", f"{expression}[{i}]")
    return values


def _concept_codings(values: Any, expression: str, what: str) -> list[dict[str, Any]]:
    if not isinstance(values, list):
        raise _fail(f"{expression} must be a list.", expression)
    out = []
    for i, cc in enumerate(values):
        codings = cc.get("coding") if isinstance(cc, dict) else None
        if not codings:
            raise _fail(f"Each {what} needs at least one coding (text alone cannot be matched).", f"{expression}[{i}]")
        out.extend(_codings(codings, f"{expression}[{i}].coding", what))
    return out


def _check_provision(p: dict[str, Any], path: str, *, depth: int) -> None:
    from sharedcare.iam.context import PURPOSES_OF_USE

    if depth > MAX_DEPTH:
        raise _fail(f"Provisions may be nested at most {MAX_DEPTH} levels deep.", path)
    kind = p.get("type")
    if kind is None and depth > 0:
        raise _fail("A nested provision needs type deny or permit (R4: required in nested rules).", f"{path}.type")
    if kind is not None and kind not in ("deny", "permit"):
        raise _fail(f"provision.type must be deny or permit, not {kind!r}.", f"{path}.type")
    if p.get("period") is not None:
        try:
            period_span(p["period"])
        except DateError as exc:
            raise _fail(str(exc), f"{path}.period") from None
    if p.get("dataPeriod") is not None:
        raise _fail(
            "provision.dataPeriod is not supported by this hub; withhold by category, code or "
            "specific resource (data) instead.",
            f"{path}.dataPeriod",
        )
    for i, c in enumerate(_codings(p.get("purpose", []), f"{path}.purpose", "purpose")):
        if c.get("system") not in (None, V3_ACT_REASON) or c["code"] not in PURPOSES_OF_USE:
            raise _fail(
                f"Purpose {c.get('system')}|{c['code']} is not a purpose of use a request can carry; use "
                f"{V3_ACT_REASON} with one of {', '.join(sorted(PURPOSES_OF_USE))}.",
                f"{path}.purpose[{i}]",
            )
    for c in _concept_codings(p.get("action", []), f"{path}.action", "action"):
        if c.get("system") not in (None, CONSENT_ACTION) or c["code"] not in ACTIONS:
            raise _fail(f"Action codes come from {CONSENT_ACTION}: {', '.join(ACTIONS)}.", f"{path}.action")
    for i, actor in enumerate(p.get("actor") or []):
        ref = actor.get("reference") if isinstance(actor, dict) else None
        if not isinstance(ref, dict) or not (ref.get("reference") or (ref.get("identifier") or {}).get("value")):
            raise _fail(
                "Each actor needs reference.reference (e.g. Organization/<id>) or reference.identifier "
                "(e.g. the ODS code or the provider system's client id).",
                f"{path}.actor[{i}].reference",
            )
    for i, c in enumerate(_codings(p.get("securityLabel", []), f"{path}.securityLabel", "security label")):
        if not c.get("system"):
            raise _fail("Each security label needs a system (e.g. v3-ActCode for HIV, PSY).", f"{path}.securityLabel[{i}]")
    for i, c in enumerate(_codings(p.get("class", []), f"{path}.class", "class")):
        if c.get("system") not in (None, RESOURCE_TYPES):
            raise _fail(f"provision.class supports resource types only ({RESOURCE_TYPES}).", f"{path}.class[{i}]")
        if c["code"] not in r4_resource_types():
            raise _fail(f"{c['code']!r} is not a FHIR R4 resource type.", f"{path}.class[{i}]")
    for c in _concept_codings(p.get("code", []), f"{path}.code", "code"):
        if not c.get("system"):
            raise _fail("Each provision.code coding needs a system (e.g. http://snomed.info/sct).", f"{path}.code")
    for i, d in enumerate(p.get("data") or []):
        ref = ((d or {}).get("reference") or {}).get("reference")
        if d.get("meaning") != "instance" or not isinstance(ref, str) or ref.count("/") < 1:
            raise _fail(
                "provision.data supports meaning 'instance' with a literal reference (Type/id) only.",
                f"{path}.data[{i}]",
            )
    for i, child in enumerate(p.get("provision") or []):
        if not isinstance(child, dict):
            raise _fail("Each nested provision must be an object.", f"{path}.provision[{i}]")
        _check_provision(child, f"{path}.provision[{i}]", depth=depth + 1)


def _check_not_ambiguous(resource: dict[str, Any], root: dict[str, Any]) -> None:
    """A root provision whose effect equals the base policy's changes nothing: OPTOUT with a
    deny provision still withholds everything, OPTIN with a permit one still shares
    everything. That is never what the author meant ("opt out of these only", "share only
    these"), so say which policyRule expresses it."""
    codings = (resource.get("policyRule") or {}).get("coding") or []
    rule = next((c.get("code") for c in codings if c.get("system") == V3_ACT_CODE), None)
    base = POLICY_RULE_BASE.get(rule or "")
    if base is None or root.get("type", base) != base or not any(root.get(k) for k in CRITERIA if k != "period"):
        return
    if base == "deny":
        message = (
            f"policyRule {rule} denies all sharing, so a deny provision with criteria under it "
            "withholds everything, not only what it names. To withhold only some data (named "
            "providers, categories, purposes) use policyRule OPTIN with provision.type deny."
        )
    else:
        message = (
            f"policyRule {rule} permits all sharing, so a permit provision with criteria under it "
            "shares everything, not only what it names. To share only some data (named recipients, "
            "purposes) use policyRule OPTOUT with provision.type permit."
        )
    raise _fail(message, "Consent.provision")
