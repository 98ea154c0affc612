"""A provider's registration: parsed from a FHIR Patient and checked before anything is written.

Every refusal is a :class:`Refused` carrying the FHIRError the client sees (a 4xx
OperationOutcome naming the reason) and a short ``reason`` used as the metric label:

=======================  ======  ==============================================================
reason                   status  when
=======================  ======  ==============================================================
``malformed``            400     not a Patient; no local identifier, or more than one
``not_provider``         403     the caller is not a registered provider system
``foreign_system``       403     an identifier system the provider does not own (registry
                                 ``identifier_systems``)
``invalid_nhs_number``   422     the NHS number fails Modulus 11 (the message says why)
``missing_demographics`` 422     family or given name, birth date or gender missing or invalid
``conflict``             409     raised later by the index: e.g. one local id claimed for two
                                 NHS numbers
=======================  ======  ==============================================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Final

from sharedcare.fhir.errors import FHIRError
from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM, explain_invalid, normalise_nhs_number
from sharedcare.pix.tracing import Demographics
from sharedcare.registry.model import System

__all__ = ["REASONS", "Refused", "Registration", "parse_registration", "parse_token"]

REASONS: Final = (
    "malformed",
    "not_provider",
    "foreign_system",
    "invalid_nhs_number",
    "missing_demographics",
    "conflict",
)
GENDERS: Final = frozenset({"male", "female", "other", "unknown"})
_DATE_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])$")
_MAX_VALUE = 255


class Refused(Exception):
    """A registration refused before (or instead of) any write."""

    def __init__(self, reason: str, error: FHIRError):
        super().__init__(str(error))
        self.reason = reason
        self.error = error


def refuse(
    reason: str, status: int, code: str, message: str, expression: str | None = None
) -> Refused:
    return Refused(
        reason, FHIRError.of(status, code, message, expression=expression, details_code=reason)
    )


@dataclass(frozen=True, slots=True)
class Registration:
    """What one provider says about one of its patients."""

    provider: str
    system: str
    value: str
    nhs_number: str | None
    demographics: Demographics


def parse_token(text: str, what: str = "identifier") -> tuple[str, str]:
    """``system|value`` → (system, value); both parts required."""
    system, bar, value = text.partition("|")
    if not bar or not system or not value:
        raise refuse(
            "malformed",
            400,
            "invalid",
            f"{what} must be 'system|value' with both parts, e.g. "
            "https://fhir.example.org/Id/patient|12345; got {text!r}.",
        )
    return system, value


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def parse_registration(
    body: Any, provider: System, *, url_identifier: tuple[str, str] | None = None
) -> Registration:
    """The registration ``body`` makes for ``provider``; :class:`Refused` when it cannot be accepted."""
    if not isinstance(body, dict) or body.get("resourceType") != "Patient":
        raise refuse("malformed", 400, "invalid", "The body must be a FHIR Patient resource.")
    identifiers = body.get("identifier") or []
    if not isinstance(identifiers, list) or not all(isinstance(i, dict) for i in identifiers):
        raise refuse(
            "malformed",
            400,
            "invalid",
            "Patient.identifier must be a list of Identifiers.",
            "Patient.identifier",
        )
    nhs_values = [i.get("value") for i in identifiers if i.get("system") == NHS_NUMBER_SYSTEM]
    local = [
        (i.get("system"), i.get("value"))
        for i in identifiers
        if i.get("system") != NHS_NUMBER_SYSTEM
    ]
    if url_identifier is not None and url_identifier not in local:
        local.append(url_identifier)
    for system, value in local:
        if not isinstance(system, str) or not system or not isinstance(value, str) or not value:
            raise refuse(
                "malformed",
                400,
                "invalid",
                "Every identifier needs a system and a value.",
                "Patient.identifier",
            )
        if len(system) > _MAX_VALUE or len(value) > _MAX_VALUE:
            raise refuse(
                "malformed",
                400,
                "invalid",
                f"Identifier systems and values are at most {_MAX_VALUE} characters.",
            )
    foreign = sorted({s for s, _ in local if s not in provider.identifier_systems})
    if foreign:
        owned = ", ".join(provider.identifier_systems) or "none registered"
        raise refuse(
            "foreign_system",
            403,
            "forbidden",
            f"{provider.client_id} does not own the identifier system {foreign[0]}; it may register "
            f"identifiers only in its own systems ({owned}). Ask the hub operator to add the system "
            "to your registry entry if it is yours.",
            "Patient.identifier",
        )
    if len(local) != 1:
        raise refuse(
            "malformed",
            400,
            "invalid",
            "A registration carries exactly one local identifier (in a system you own) plus, where "
            f"known, the NHS number ({NHS_NUMBER_SYSTEM}); found {len(local)} local identifiers.",
            "Patient.identifier",
        )
    if len(nhs_values) > 1:
        raise refuse(
            "malformed",
            400,
            "invalid",
            "A registration carries at most one NHS number.",
            "Patient.identifier",
        )
    nhs_number: str | None = None
    if nhs_values:
        problem = explain_invalid(nhs_values[0])
        if problem is not None:
            raise refuse(
                "invalid_nhs_number",
                422,
                "invalid",
                f"Invalid NHS number: {problem}",
                "Patient.identifier",
            )
        nhs_number = normalise_nhs_number(str(nhs_values[0]))
    demographics = Demographics.from_patient(body)
    missing = [
        label
        for label, value in (
            ("name.family", demographics.family),
            ("name.given", demographics.given),
            ("birthDate", demographics.birth_date),
            ("gender", demographics.gender),
        )
        if not _text(value)
    ]
    if missing:
        raise refuse(
            "missing_demographics",
            422,
            "required",
            "A registration needs the person's family name, given name, birth date and gender "
            f"(postcode where known); missing: {', '.join(missing)}.",
        )
    birth = str(demographics.birth_date).strip()
    if not _DATE_RE.match(birth):
        raise refuse(
            "missing_demographics",
            422,
            "value",
            f"birthDate must be a full date YYYY-MM-DD, not {birth!r}.",
            "Patient.birthDate",
        )
    gender = str(demographics.gender).strip()
    if gender not in GENDERS:
        raise refuse(
            "missing_demographics",
            422,
            "value",
            f"gender must be one of male, female, other, unknown; not {gender!r}.",
            "Patient.gender",
        )
    postcode = _text(demographics.postcode)
    for label, value, limit in (
        ("family", demographics.family, 200),
        ("given", demographics.given, 200),
        ("postcode", postcode, 16),
    ):
        if value is not None and len(str(value)) > limit:
            raise refuse(
                "missing_demographics", 422, "value", f"{label} is longer than {limit} characters."
            )
    system, value = local[0]
    return Registration(
        provider=provider.client_id,
        system=str(system),
        value=str(value),
        nhs_number=nhs_number,
        demographics=Demographics(
            family=_text(demographics.family),
            given=_text(demographics.given),
            birth_date=birth,
            gender=gender,
            postcode=postcode,
        ),
    )
