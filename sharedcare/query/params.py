"""What a federated search asks for: the resource type, the person, the parameters to forward.

The person is named one of these ways (hl7.org/fhir/R4/search.html#chaining for the
chained forms):

- ``patient.identifier=https://fhir.nhs.uk/Id/nhs-number|{n}`` (also ``patient:Patient.identifier``);
- ``subject:Patient.identifier=https://fhir.nhs.uk/Id/nhs-number|{n}``;
- ``patient=Patient/{hub person id}`` (also ``patient={id}``, ``subject=Patient/{id}``,
  ``subject:Patient={id}``).

Every other parameter must be an R4 search parameter of the type (with any modifier), or
``_id``, ``_lastUpdated``, ``_sort``, ``_count``; it is forwarded to each provider as given.
``_format`` and ``_pretty`` are ignored. Anything else is a 400 naming what is supported,
unless ``Prefer: handling=lenient`` asks for it to be ignored with a warning.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache

from sharedcare.fhir.errors import FHIRError, Issue, bad_request
from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM, explain_invalid
from sharedcare.store.searchparams import HUB_TYPES, load_search_params, r4_resource_types

WAIT_HEADERS = ("x-provider-wait-time", "yhcr-provider-wait-time")
IGNORED = frozenset({"_format", "_pretty"})
RESULT_PARAMS = frozenset({"_id", "_lastUpdated", "_sort", "_count"})
_IDENTIFIER_FORMS = frozenset(
    {"patient.identifier", "patient:Patient.identifier", "subject:Patient.identifier"}
)
_REFERENCE_FORMS = frozenset({"patient", "subject", "subject:Patient", "patient:Patient"})
# Types the hub answers from its own store even though providers hold them too: federated
# only when the person is named by NHS number (see the README, "Federated query").
SHARED_TYPES = frozenset({"DocumentReference"})


@cache
def federated_types() -> frozenset[str]:
    """Clinical types searched by patient that the hub does not own, plus the shared ones."""
    params = load_search_params(sorted(r4_resource_types()))
    out = set()
    for rtype, codes in params.items():
        patient = codes.get("patient")
        subject = codes.get("subject")
        if (patient and "Patient" in patient.targets) or (subject and "Patient" in subject.targets):
            out.add(rtype)
    return frozenset(out - set(HUB_TYPES)) | SHARED_TYPES


@cache
def _codes(rtype: str) -> frozenset[str]:
    return frozenset(load_search_params([rtype])[rtype])


@cache
def uses_patient_param(rtype: str) -> bool:
    """Whether providers should be asked ``patient=`` (else ``subject=``) for this type."""
    return "patient" in _codes(rtype)


@dataclass(slots=True)
class Search:
    """A parsed federated search."""

    rtype: str
    nhs_number: str | None = None
    person_id: str | None = None
    forward: list[tuple[str, str]] = field(default_factory=list)
    count: int | None = None
    warnings: list[Issue] = field(default_factory=list)
    cursor: str | None = None

    @property
    def by_nhs_number(self) -> bool:
        return self.nhs_number is not None


def is_federated(rtype: str, items: list[tuple[str, str]]) -> bool:
    """Whether a search of ``rtype`` goes to the providers (else to the hub's own store)."""
    if rtype not in federated_types():
        return False
    if rtype in SHARED_TYPES:
        # The store pages its own searches with a _cursor too; ours are JWS (three parts).
        return any(k in _IDENTIFIER_FORMS for k, _ in items) or any(
            k == "_cursor" and v.count(".") == 2 for k, v in items
        )
    return True


def parse_search(
    rtype: str, items: list[tuple[str, str]], *, lenient: bool, max_count: int
) -> Search:
    """The federated search ``items`` describe, or a 400 the consumer can act on."""
    search = Search(rtype)
    known = _codes(rtype)
    unsupported: list[str] = []
    selectors: list[tuple[str, str]] = []
    for key, value in items:
        if key in IGNORED:
            continue
        if key == "_cursor":
            search.cursor = value
        elif key in _IDENTIFIER_FORMS or key in _REFERENCE_FORMS:
            selectors.append((key, value))
        elif key == "_count":
            search.count = _count(value, max_count)
        elif key in RESULT_PARAMS or key.split(":", 1)[0] in known:
            search.forward.append((key, value))
        else:
            unsupported.append(key)
    if unsupported:
        message = (
            f"Unsupported search parameter(s) for a federated {rtype} search: "
            f"{', '.join(sorted(set(unsupported)))}. Supported: the person (patient.identifier, "
            f"subject:Patient.identifier or patient), {', '.join(sorted(RESULT_PARAMS))}, and the "
            f"{rtype} search parameters: {', '.join(sorted(known))}."
        )
        if not lenient:
            raise bad_request(message, code="not-supported")
        search.warnings.append(
            Issue("not-supported", message + " They were ignored.", severity="warning")
        )
    if search.cursor is not None:
        return search  # a next link carries everything else
    if not selectors:
        raise bad_request(
            f"A federated {rtype} search must name one person: "
            f"patient.identifier={NHS_NUMBER_SYSTEM}|{{NHS number}}, "
            f"subject:Patient.identifier=... or patient=Patient/{{id}}.",
            code="required",
        )
    if len(selectors) > 1 or "," in selectors[0][1]:
        raise bad_request(
            "A federated search names exactly one person (one patient parameter, one value)."
        )
    key, value = selectors[0]
    if key in _IDENTIFIER_FORMS:
        system, bar, number = value.partition("|")
        if not bar or system != NHS_NUMBER_SYSTEM:
            raise bad_request(
                f"{key} must be {NHS_NUMBER_SYSTEM}|{{NHS number}} (the hub finds people by NHS number).",
                expression=key,
            )
        number = number.replace(" ", "")
        problem = explain_invalid(number)
        if problem:
            raise bad_request(f"{key}: {problem}", expression=key)
        search.nhs_number = number
    else:
        ref = value.strip()
        if key in ("patient", "subject") and "/" in ref:
            kind, _, ref = ref.partition("/")
            if kind != "Patient":
                raise bad_request(
                    f"{key} must reference a Patient (Patient/{{id}}).", expression=key
                )
        if not ref or "/" in ref or len(ref) > 64:
            raise bad_request(f"{key} must be Patient/{{hub person id}}.", expression=key)
        search.person_id = ref
    return search


def _count(value: str, max_count: int) -> int:
    if not value.isdigit():
        raise bad_request(
            f"_count must be a non-negative integer, not {value!r}.", expression="_count"
        )
    return min(int(value), max_count)


def provider_wait(headers: Mapping[str, str], default_ms: int, cap_ms: int) -> float:
    """The per-provider wait in seconds: the header override (capped) or the default."""
    for name in WAIT_HEADERS:
        raw = headers.get(name)
        if raw is None:
            continue
        text = raw.strip()
        if not text.isdigit() or int(text) <= 0:
            raise FHIRError.of(
                400,
                "invalid",
                f"{name} must be a whole number of milliseconds greater than 0, not {raw!r}.",
            )
        return min(int(text), cap_ms) / 1000
    return min(default_ms, cap_ms) / 1000
