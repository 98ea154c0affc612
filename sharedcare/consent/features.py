"""What the engine reads from a resource: its type, security labels and codes.

Security labels are ``meta.security`` codings (hl7.org/fhir/R4/security-labels.html).

"Codes" are the codings of the elements that say what a resource is about, per type below.
``reasonCode`` is included where R4 has it, because a reason ("HIV", "termination of
pregnancy") is as sensitive as a diagnosis. A type not in the table contributes its
``code`` element when it has one. Only codings are compared (system and code), never text.

=========================  =======================================================
Type                       Elements whose codings are the resource's codes
=========================  =======================================================
AllergyIntolerance         code
Appointment                serviceType, reasonCode
CarePlan                   category
CareTeam                   category
ClinicalImpression         code
Communication              category, reasonCode
Composition                type, category
Condition                  code
DiagnosticReport           code
DocumentReference          type, category
Encounter                  type, reasonCode
EpisodeOfCare              type
FamilyMemberHistory        condition.code (each condition), reasonCode
Flag                       code
Immunization               vaccineCode, reasonCode
ImagingStudy               procedureCode, reasonCode
MedicationAdministration   medicationCodeableConcept, reasonCode
MedicationDispense         medicationCodeableConcept
MedicationRequest          medicationCodeableConcept, reasonCode
MedicationStatement        medicationCodeableConcept, reasonCode
Observation                code
Procedure                  code, reasonCode
QuestionnaireResponse      (none)
ServiceRequest             code, reasonCode
Specimen                   type
*any other type*           code
=========================  =======================================================
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

# (element, is a list of CodeableConcept); CodeableConcept otherwise.
CodePaths = tuple[tuple[str, bool], ...]
_REASON: Final = ("reasonCode", True)

CODE_PATHS: Final[Mapping[str, CodePaths]] = {
    "AllergyIntolerance": (("code", False),),
    "Appointment": (("serviceType", True), _REASON),
    "CarePlan": (("category", True),),
    "CareTeam": (("category", True),),
    "ClinicalImpression": (("code", False),),
    "Communication": (("category", True), _REASON),
    "Composition": (("type", False), ("category", True)),
    "Condition": (("code", False),),
    "DiagnosticReport": (("code", False),),
    "DocumentReference": (("type", False), ("category", True)),
    "Encounter": (("type", True), _REASON),
    "EpisodeOfCare": (("type", True),),
    "FamilyMemberHistory": (_REASON,),  # condition[].code is read specially
    "Flag": (("code", False),),
    "Immunization": (("vaccineCode", False), _REASON),
    "ImagingStudy": (("procedureCode", True), _REASON),
    "MedicationAdministration": (("medicationCodeableConcept", False), _REASON),
    "MedicationDispense": (("medicationCodeableConcept", False),),
    "MedicationRequest": (("medicationCodeableConcept", False), _REASON),
    "MedicationStatement": (("medicationCodeableConcept", False), _REASON),
    "Observation": (("code", False),),
    "Procedure": (("code", False), _REASON),
    "QuestionnaireResponse": (),
    "ServiceRequest": (("code", False), _REASON),
    "Specimen": (("type", False),),
}
DEFAULT_CODE_PATHS: Final[CodePaths] = (("code", False),)

# code -> the systems it is relevant in (None: any system). Built once per decider from the
# codes its rules and consents mention, so a resource's irrelevant codings cost one dict miss.
Relevant = dict[str, frozenset[str | None]]
Key = tuple[str | None, str]


def relevant_index(keys: Iterable[Key]) -> Relevant:
    out: dict[str, set[str | None]] = {}
    for system, code in keys:
        out.setdefault(code, set()).add(system)
    return {code: frozenset(systems) for code, systems in out.items()}


def pick(codings: Any, relevant: Relevant) -> tuple[Key, ...]:
    """The relevant (system, code) pairs among ``codings`` (a list of Coding dicts).

    Raises TypeError/AttributeError on malformed input; the caller withholds such resources.
    """
    out: tuple[Key, ...] = ()
    for coding in codings:
        code = coding.get("code")
        systems = relevant.get(code) if code.__class__ is str else None
        if systems is not None:
            system = coding.get("system")
            if system in systems:
                out += ((system, code),)
            if None in systems and system is not None:
                out += ((None, code),)
    return out


def resource_codes(resource: Mapping[str, Any], rtype: str, relevant: Relevant) -> tuple[Key, ...]:
    """The relevant codes of ``resource`` (see the table in this module's docstring)."""
    out: tuple[Key, ...] = ()
    for element, many in CODE_PATHS.get(rtype, DEFAULT_CODE_PATHS):
        value = resource.get(element)
        if not value:
            continue
        if many:
            for concept in value:
                codings = concept.get("coding")
                if codings:
                    out += pick(codings, relevant)
        else:
            codings = value.get("coding")
            if codings:
                out += pick(codings, relevant)
    if rtype == "FamilyMemberHistory":
        for condition in resource.get("condition") or ():
            codings = (condition.get("code") or {}).get("coding")
            if codings:
                out += pick(codings, relevant)
    return out
