"""Validation of resources written to the hub's own store against the FHIR base definitions.

Uses ``fhir.resources``' R4B models: the package no longer ships 4.0.1 models, and R4B
(4.3.0) is structurally identical to R4 for every type the hub stores. Failures become a
422 OperationOutcome whose ``expression`` names the element (e.g. ``Patient.name[0].given``).
This runs only at the edge of the hub's own store, never on the aggregation path
(ARCHITECTURE, Decisions).
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from pydantic import ValidationError

from sharedcare.fhir.errors import FHIRError, Issue

ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")

# Required-binding codes the models accept as free strings; a wrong one is a client error
# a person can act on (hl7.org/fhir/R4/terminologies.html#required).
_REQUIRED_CODES: dict[tuple[str, str], frozenset[str]] = {
    ("Patient", "gender"): frozenset({"male", "female", "other", "unknown"}),
    ("Practitioner", "gender"): frozenset({"male", "female", "other", "unknown"}),
    ("Consent", "status"): frozenset(
        {"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}
    ),
    ("Subscription", "status"): frozenset({"requested", "active", "error", "off"}),
    ("Endpoint", "status"): frozenset(
        {"active", "suspended", "error", "off", "entered-in-error", "test"}
    ),
    ("DocumentReference", "status"): frozenset({"current", "superseded", "entered-in-error"}),
    ("Group", "type"): frozenset(
        {"person", "animal", "practitioner", "device", "medication", "substance"}
    ),
}


@lru_cache(maxsize=None)
def _model(resource_type: str) -> Any:
    return get_fhir_model_class(resource_type)


def _path(resource_type: str, loc: tuple[Any, ...]) -> str:
    out = resource_type
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and not part.startswith(("function-", "union[")):
            out += f".{part}"
    return out


def _message(err: dict[str, Any]) -> str:
    kind = err.get("type", "")
    if kind == "extra_forbidden":
        return "is not an element of this resource type"
    if kind == "missing":
        return "is required"
    return str(err.get("msg", "is invalid"))


def validate_resource(resource_type: str, resource: dict[str, Any]) -> None:
    """Raise a 422 FHIRError naming every invalid element of ``resource``."""
    issues: list[Issue] = []
    for (rtype, element), allowed in _REQUIRED_CODES.items():
        value = resource.get(element) if rtype == resource_type else None
        if value is not None and value not in allowed:
            issues.append(
                Issue(
                    "code-invalid",
                    f"{rtype}.{element}: {value!r} is not one of {', '.join(sorted(allowed))}",
                    expression=(f"{rtype}.{element}",),
                )
            )
    try:
        _model(resource_type).model_validate(resource)
    except ValidationError as exc:
        for err in exc.errors(include_url=False)[:20]:
            where = _path(resource_type, tuple(err.get("loc", ())))
            issues.append(
                Issue("structure", f"{where}: {_message(dict(err))}", expression=(where,))
            )
    except (TypeError, ValueError) as exc:  # the models raise these for some malformed input
        issues.append(Issue("structure", f"{resource_type}: {exc}"))
    if issues:
        raise FHIRError(422, issues)
