"""Validation of resources written to the hub's own store against the FHIR R4 base definitions.

Two passes, both producing a 422 OperationOutcome whose ``expression`` names the element
(e.g. ``Patient.name[0].given``):

1. A walk of the JSON against the R4 (4.0.1) element model that ``fhirpathpy`` ships: every
   element must exist in R4, primitives must have the JSON type FHIR JSON prescribes
   (``"active": "yes"`` is not a boolean, ``"3"`` is not an integer), no ``null`` outside
   arrays, no empty objects or arrays, dates and instants in FHIR format, and the codes of
   common required bindings. The stored body is the client's JSON, so what the models
   below would silently coerce must be refused here.
2. ``fhir.resources``' R4B pydantic models, for cardinality, required elements, choice
   types and the rest of the structure: the package no longer ships 4.0.1 models.

R4 vs R4B for the hub's 12 types: every R4 element path of these types, and of the data
types they use, exists in the R4B models (checked element by element). The one R4 construct
R4B lacks is ``Extension.valueMeta``; :func:`_for_r4b` hides it from the R4B models (pass 1
has checked it against R4). R4B-only constructs (e.g. ``Extension.valueCodeableReference``)
are refused by pass 1, so what is stored is R4.

This runs only at the edge of the hub's own store, never on the aggregation path
(ARCHITECTURE, Decisions).
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any

from fhir.resources.R4B import get_fhir_model_class
from fhirpathpy.models import models as _fhirpath_models
from pydantic import ValidationError

from sharedcare.fhir.errors import FHIRError, Issue
from sharedcare.store.searchparams import r4_resource_types

ID_RE = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
_MAX_ISSUES = 20

_R4 = _fhirpath_models["r4"]
_PATH_TYPE: dict[str, str] = _R4["path2Type"]
_CHOICES: dict[str, list[str]] = _R4["choiceTypePaths"]
_ELSEWHERE: dict[str, str] = _R4["pathsDefinedElsewhere"]

# Required-binding codes the models accept as free strings; a wrong one is a client error
# a person can act on (hl7.org/fhir/R4/terminologies.html#required). Keyed by R4 element
# path: a data type's path (``ContactPoint.system``) applies wherever the type is used.
_GENDER = frozenset({"male", "female", "other", "unknown"})
_REQUIRED_CODES: dict[str, frozenset[str]] = {
    "Patient.gender": _GENDER,
    "Patient.contact.gender": _GENDER,
    "Patient.link.type": frozenset({"replaced-by", "replaces", "refer", "seealso"}),
    "Practitioner.gender": _GENDER,
    "Consent.status": frozenset({"draft", "proposed", "active", "rejected", "inactive", "entered-in-error"}),
    "Consent.provision.type": frozenset({"deny", "permit"}),
    "Subscription.status": frozenset({"requested", "active", "error", "off"}),
    "Subscription.channel.type": frozenset({"rest-hook", "websocket", "email", "sms", "message"}),
    "Endpoint.status": frozenset({"active", "suspended", "error", "off", "entered-in-error", "test"}),
    "DocumentReference.status": frozenset({"current", "superseded", "entered-in-error"}),
    "DocumentReference.docStatus": frozenset({"preliminary", "final", "amended", "entered-in-error"}),
    "DocumentReference.relatesTo.code": frozenset({"replaces", "transforms", "signs", "appends"}),
    "Group.type": frozenset({"person", "animal", "practitioner", "device", "medication", "substance"}),
    "AuditEvent.action": frozenset({"C", "R", "U", "D", "E"}),
    "AuditEvent.outcome": frozenset({"0", "4", "8", "12"}),
    "Provenance.entity.role": frozenset({"derivation", "revision", "quotation", "source", "removal"}),
    "ContactPoint.system": frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"}),
    "ContactPoint.use": frozenset({"home", "work", "temp", "old", "mobile"}),
    "HumanName.use": frozenset({"usual", "official", "temp", "nickname", "anonymous", "old", "maiden"}),
    "Identifier.use": frozenset({"usual", "official", "temp", "secondary", "old"}),
    "Address.use": frozenset({"home", "work", "temp", "old", "billing"}),
    "Address.type": frozenset({"postal", "physical", "both"}),
    "Narrative.status": frozenset({"generated", "extensions", "additional", "empty"}),
}

# hl7.org/fhir/R4/datatypes.html: the regular expressions of the date/time primitives.
_YEAR = r"([0-9]([0-9]([0-9][1-9]|[1-9]0)|[1-9]00)|[1-9]000)"
_TIME = r"([01][0-9]|2[0-3]):[0-5][0-9]:([0-5][0-9]|60)(\.[0-9]+)?"
_ZONE = r"(Z|(\+|-)((0[0-9]|1[0-3]):[0-5][0-9]|14:00))"
_MONTH, _DAY = r"(0[1-9]|1[0-2])", r"(0[1-9]|[1-2][0-9]|3[0-1])"
_FORMATS: dict[str, tuple[re.Pattern[str], str]] = {
    "date": (re.compile(rf"{_YEAR}(-{_MONTH}(-{_DAY})?)?"), "YYYY, YYYY-MM or YYYY-MM-DD"),
    "dateTime": (
        re.compile(rf"{_YEAR}(-{_MONTH}(-{_DAY}(T{_TIME}{_ZONE})?)?)?"),
        "YYYY, YYYY-MM, YYYY-MM-DD or YYYY-MM-DDThh:mm:ss with a time zone (Z or +hh:mm)",
    ),
    "instant": (
        re.compile(rf"{_YEAR}-{_MONTH}-{_DAY}T{_TIME}{_ZONE}"),
        "YYYY-MM-DDThh:mm:ss[.sss] with a time zone (Z or +hh:mm)",
    ),
    "time": (re.compile(_TIME), "hh:mm:ss"),
}
_PRIMITIVES = frozenset(
    {
        "base64Binary", "boolean", "canonical", "code", "date", "dateTime", "decimal", "id",
        "instant", "integer", "markdown", "oid", "positiveInt", "string", "time", "unsignedInt",
        "uri", "url", "uuid", "xhtml", "System.String",
    }
)
_INTEGERS = frozenset({"integer", "positiveInt", "unsignedInt"})
_JSON_NAMES = {bool: "a boolean", int: "a number", float: "a number", str: "a string", dict: "an object", list: "an array"}


@cache
def _model(resource_type: str) -> Any:
    return get_fhir_model_class(resource_type)


@cache
def _backbones() -> frozenset[str]:
    """Model paths that are backbone elements (``Patient.contact``): prefixes of other paths."""
    out: set[str] = set()
    for path in (*_PATH_TYPE, *_CHOICES):
        parts = path.split(".")
        out.update(".".join(parts[:i]) for i in range(2, len(parts)))
    return frozenset(out)


@cache
def _element(model_path: str, key: str) -> tuple[str, str] | None:
    """(element model path, FHIR type) of JSON property ``key`` under ``model_path``.

    The type is a primitive (``boolean``), a complex type (``HumanName``), ``Resource``,
    or ``"backbone"`` with the element model path to continue from. None: not in R4.
    """
    path = f"{model_path}.{key}"
    if path in _ELSEWHERE:
        return _ELSEWHERE[path], "backbone"
    if path in _PATH_TYPE:
        return path, _PATH_TYPE[path]
    if path in _backbones():
        return path, "backbone"
    for i in range(1, len(key)):
        if key[i].isupper() and f"{model_path}.{key[:i]}" in _CHOICES:
            suffix = key[i:]
            for choice in _CHOICES[f"{model_path}.{key[:i]}"]:
                if choice == suffix:
                    lower = suffix[0].lower() + suffix[1:]
                    return path, lower if lower in _PRIMITIVES else suffix
            return None
    return None




class _Walker:
    """Pass 1: the JSON against the R4 element model (see the module docstring)."""

    def __init__(self) -> None:
        self.issues: dict[str, Issue] = {}
        self.r4_only = False  # an R4 construct the R4B models lack (Extension.valueMeta)

    def add(self, where: str, code: str, message: str) -> None:
        if len(self.issues) < _MAX_ISSUES:
            self.issues.setdefault(where, Issue(code, f"{where}: {message}", expression=(where,)))

    def resource(self, value: Any, where: str) -> None:
        if not isinstance(value, dict):
            self.add(where, "structure", f"must be a JSON object holding a resource, not {_json_name(value)}.")
            return
        rtype = value.get("resourceType")
        if rtype not in r4_resource_types():
            self.add(f"{where}.resourceType", "structure", f"{rtype!r} is not an R4 resource type.")
            return
        self.complex(value, rtype, where, skip=("resourceType",))

    def complex(self, value: dict[str, Any], model_path: str, where: str, skip: tuple[str, ...] = ()) -> None:
        if not value:
            self.add(where, "structure", "must not be an empty object; leave the element out.")
        for key, item in value.items():
            if key in skip:
                continue
            if key.startswith("_") and len(key) > 1:  # a primitive's id/extensions (json.html#primitive)
                if _element(model_path, key[1:]) is None:
                    self.add(f"{where}.{key}", "structure", f"{key[1:]!r} is not an element of R4 {model_path}.")
                continue
            found = _element(model_path, key)
            if found is None:
                self.add(f"{where}.{key}", "structure", f"is not an element of R4 {model_path}.")
                continue
            path, ftype = found
            if path == "Extension.valueMeta":
                self.r4_only = True
            self.value(item, path, ftype, f"{where}.{key}", top=True)

    def value(self, item: Any, path: str, ftype: str, where: str, *, top: bool) -> None:
        if isinstance(item, list) and top:
            if not item:
                self.add(where, "structure", "must not be an empty array; leave the element out.")
            for i, each in enumerate(item):
                # null is allowed in arrays of primitives, paired with a "_name" array.
                if each is not None or ftype not in _PRIMITIVES:
                    self.value(each, path, ftype, f"{where}[{i}]", top=False)
            return
        if item is None:
            self.add(where, "structure", "is null; FHIR JSON leaves absent elements out.")
        elif ftype == "Resource":
            self.resource(item, where)
        elif ftype in _PRIMITIVES:
            self.primitive(item, path, ftype, where)
        elif not isinstance(item, dict):
            self.add(where, "structure", f"must be a JSON object ({ftype}), not {_json_name(item)}.")
        else:
            self.complex(item, path if ftype == "backbone" else ftype, where)

    def primitive(self, item: Any, path: str, ftype: str, where: str) -> None:
        if ftype == "boolean":
            ok, wanted = isinstance(item, bool), "true or false"
        elif ftype in _INTEGERS:
            ok, wanted = isinstance(item, int) and not isinstance(item, bool), "a JSON whole number"
        elif ftype == "decimal":
            ok, wanted = isinstance(item, int | float) and not isinstance(item, bool), "a JSON number"
        else:
            ok, wanted = isinstance(item, str), "a JSON string"
        if not ok:
            self.add(where, "structure", f"must be {wanted} (FHIR {ftype}), not {_json_name(item)} {_show(item)}.")
            return
        if ftype in _FORMATS:
            pattern, hint = _FORMATS[ftype]
            if not pattern.fullmatch(item):
                self.add(where, "value", f"{_show(item)} is not a valid FHIR {ftype}; use {hint}.")
                return
        allowed = _REQUIRED_CODES.get(path)
        if allowed is not None and item not in allowed:
            self.add(where, "code-invalid", f"{_show(item)} is not one of {', '.join(sorted(allowed))}.")


def _json_name(value: Any) -> str:
    return "null" if value is None else _JSON_NAMES.get(type(value), type(value).__name__)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
        return "is not an element of this resource type."
    if kind == "missing":
        return "is required."
    message = str(err.get("msg", "is invalid")).removeprefix("Value error, ")
    given = err.get("input")
    if isinstance(given, str | int | float) and not isinstance(given, bool) and kind != "missing":
        message += f" (got {_show(given)})"
    return message


def _for_r4b(value: Any) -> Any:
    """A copy without ``Extension.valueMeta`` (R4-only; checked by pass 1) for the R4B models."""
    if isinstance(value, dict):
        if "url" in value and "valueMeta" in value:
            value = {**value, "valueString": "valueMeta"}
            del value["valueMeta"]
        return {k: _for_r4b(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_for_r4b(v) for v in value]
    return value


def validate_resource(resource_type: str, resource: dict[str, Any]) -> None:
    """Raise a 422 FHIRError naming every invalid element of ``resource`` (at most 20)."""
    walker = _Walker()
    walker.complex(resource, resource_type, resource_type, skip=("resourceType",))
    issues = walker.issues
    try:
        _model(resource_type).model_validate(_for_r4b(resource) if walker.r4_only else resource)
    except ValidationError as exc:
        for err in exc.errors(include_url=False):
            where = _path(resource_type, tuple(err.get("loc", ())))
            # pass 1 already said something more precise about this element or its parent
            if any(where == seen or where.startswith((seen + ".", seen + "[")) for seen in issues):
                continue
            if len(issues) >= _MAX_ISSUES:
                break
            message = _message(dict(err))
            code = "required" if err.get("type") == "missing" or "is required" in message else "structure"
            issues[where] = Issue(code, f"{where}: {message}", expression=(where,))
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        # the models raise these for some malformed input (e.g. an unknown contained type)
        if not issues:
            issues[resource_type] = Issue("structure", f"{resource_type}: not a valid resource ({exc!r}).")
    if issues:
        raise FHIRError(422, list(issues.values()))
