"""FHIR R4 search parameter definitions, per concrete resource type.

The definitions are the official R4 ``SearchParameter`` resources, trimmed and vendored in
``data/search-parameters.json`` (see ``data/README.md``).  Many definitions are shared by
several resource types and carry a FHIRPath *union* expression
(``Patient.gender | Person.gender | ...``); this module splits those so each
:class:`SearchParam` only holds the part that applies to one type.
See http://hl7.org/fhir/R4/search.html#searchparameter and
http://hl7.org/fhir/R4/searchparameter-registry.html.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

import orjson
from fhirpathpy.models import models as _fhirpath_models

__all__ = ["HUB_TYPES", "OWN_TABLE_PARAMS", "SearchParam", "load_search_params", "split_union"]

HUB_TYPES: tuple[str, ...] = (
    "Patient",
    "Organization",
    "Practitioner",
    "PractitionerRole",
    "Endpoint",
    "Consent",
    "AuditEvent",
    "Subscription",
    "Group",
    "Provenance",
    "DocumentReference",
    "Binary",
)

# Types that a capability keeps in lean tables of its own instead of the store's resource and
# index tables, with the only parameters it searches (beside _id and _lastUpdated). Nothing
# joins them into other searches (_include/_revinclude). AuditEvent is the audit trail's
# (sharedcare.audit.trail): one row per event, at up to thousands of events a second.
OWN_TABLE_PARAMS: dict[str, frozenset[str]] = {
    "AuditEvent": frozenset(
        {"patient", "altid", "date", "subtype", "action", "outcome", "agent-name", "agent-role",
         "agent", "entity"}
    ),
}

# The store keeps these as real columns (search.html#id, search.html#lastUpdated).
_COLUMN_PARAMS = frozenset({"_id", "_lastUpdated"})
# Parameters defined on Resource/DomainResource apply to every type (search.html#all).
_ABSTRACT_BASES = ("Resource", "DomainResource")
_FIRST_IDENT = re.compile(r"\(*\s*([A-Za-z_][A-Za-z0-9_]*)")


@dataclass(frozen=True, slots=True)
class SearchParam:
    """One search parameter as it applies to one concrete resource type."""

    code: str  # e.g. "identifier"
    type: str  # "token" | "string" | "reference" | "date" | "uri"
    resource_type: str  # concrete type this instance applies to, e.g. "Patient"
    expression: str  # FHIRPath for this resource type only
    targets: tuple[str, ...]
    url: str


def split_union(expression: str) -> list[str]:
    """Split a FHIRPath expression on top-level ``|`` (not inside parens or quotes)."""
    parts: list[str] = []
    depth = 0
    quoted = False
    start = 0
    for i, ch in enumerate(expression):
        if quoted:
            if ch == "'" and expression[i - 1] != "\\":
                quoted = False
        elif ch == "'":
            quoted = True
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(expression[start:i].strip())
            start = i + 1
    parts.append(expression[start:].strip())
    return [p for p in parts if p]


@cache
def _definitions() -> tuple[dict[str, Any], ...]:
    """The vendored definitions, read once per process."""
    raw = resources.files(__package__).joinpath("data/search-parameters.json").read_bytes()
    return tuple(orjson.loads(raw))


@cache
def r4_resource_types() -> frozenset[str]:
    """Concrete R4 resource type names, from fhirpathpy's R4 model (type -> parent)."""
    parents: dict[str, str] = _fhirpath_models["r4"]["type2Parent"]

    def is_resource(name: str) -> bool:
        while name in parents:
            name = parents[name]
            if name == "Resource":
                return True
        return False

    return frozenset(t for t in parents if is_resource(t)) - {"DomainResource"}


def _parts_for(expression: str, rtype: str, bases: list[str]) -> list[str]:
    """The union members of ``expression`` that navigate from ``rtype``."""
    out: list[str] = []
    for part in split_union(expression):
        m = _FIRST_IDENT.match(part)
        head = m.group(1) if m else ""
        if head == rtype:
            out.append(part)
        elif head in _ABSTRACT_BASES:
            # Resource.meta.tag -> Patient.meta.tag: every path must start at the concrete type.
            out.append(re.sub(rf"\b{head}\.", f"{rtype}.", part))
        elif head[:1].islower() and len(bases) == 1:
            # A few R4 definitions omit the type (InsurancePlan: "name | alias").
            out.append(f"{rtype}.{part}")
    return out


def load_search_params(types: Iterable[str]) -> dict[str, dict[str, SearchParam]]:
    """type -> code -> SearchParam for the given resource types (cached file read).

    ``_id`` and ``_lastUpdated`` are left out because the store serves them from its own
    columns; ``_tag``, ``_profile``, ``_security`` and ``_source`` are included for every type.
    Raises ValueError for a name that is not an R4 resource type.
    """
    wanted = list(dict.fromkeys(types))
    unknown = [t for t in wanted if t not in r4_resource_types()]
    if unknown:
        raise ValueError(f"not FHIR R4 resource types: {', '.join(unknown)}")
    result: dict[str, dict[str, SearchParam]] = {t: {} for t in wanted}
    for d in _definitions():
        if d["code"] in _COLUMN_PARAMS:
            continue
        abstract = any(b in _ABSTRACT_BASES for b in d["base"])
        for rtype in wanted if abstract else (t for t in d["base"] if t in result):
            parts = _parts_for(d["expression"], rtype, d["base"])
            if not parts:
                continue
            result[rtype][d["code"]] = SearchParam(
                code=d["code"],
                type=d["type"],
                resource_type=rtype,
                expression=" | ".join(parts),
                targets=tuple(d.get("target") or ()),
                url=d["url"],
            )
    return result
