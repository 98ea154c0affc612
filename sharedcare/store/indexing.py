"""Extraction of search-index rows from FHIR resources, run on every write.

Each search parameter's FHIRPath expression is compiled once into a plain walk over the
resource's JSON (``Patient.name.given`` -> keys ``name``, ``given``), using the R4 element
model bundled with fhirpathpy to expand choice elements (``onset[x]``), apply type casts
and pick the value -> row conversion for the element's datatype.  Forms the walker does not
understand are evaluated with a compiled fhirpathpy expression instead (~100x slower).
Row rules follow http://hl7.org/fhir/R4/search.html (sections cited inline).
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import cache, lru_cache
from typing import Any

import fhirpathpy
from fhirpathpy.engine.nodes import ResourceNode
from fhirpathpy.models import models as _fhirpath_models

from sharedcare.store.searchparams import SearchParam, split_union

__all__ = [
    "FHIRPATH_OPTIONS",
    "IndexRows",
    "Indexer",
    "date_range",
    "normalize_string",
    "split_reference",
]

log = logging.getLogger(__name__)

TokenRow = tuple[str, str | None, str]
StringRow = tuple[str, str, str]
RefRow = tuple[str, str | None, str | None, str]
DateRow = tuple[str, datetime, datetime]
UriRow = tuple[str, str]


@dataclass(slots=True)
class IndexRows:
    """All index rows of one resource, one list per search parameter type."""

    tokens: list[TokenRow]  # (param code, system or None, code/value)
    strings: list[StringRow]  # (param code, normalized value, exact value)
    references: list[RefRow]  # (param code, target type, target id, raw reference)
    dates: list[DateRow]  # (param code, low inclusive, high exclusive), naive UTC
    uris: list[UriRow]  # (param code, value)


# --------------------------------------------------------------------------- values


def normalize_string(value: str) -> str:
    """Casefold, strip accents and collapse whitespace (search.html#string)."""
    if value.isascii():  # fast path: NFKD is the identity and there are no combining marks
        return " ".join(value.lower().split())
    decomposed = unicodedata.normalize("NFKD", value.casefold())
    return " ".join("".join(c for c in decomposed if not unicodedata.combining(c)).split())


_DATE = re.compile(
    r"(\d{4})(?:-(\d{2})(?:-(\d{2})(?:T(\d{2}):(\d{2})(?::(\d{2})(?:\.(\d+))?)?"
    r"(Z|[+-]\d{2}:\d{2})?)?)?)?",
    re.ASCII,  # \d must not accept other scripts' digits, which int() would happily parse
)
_DAY = timedelta(days=1)


def date_range(value: str) -> tuple[datetime, datetime]:
    """The implicit range ``[low, high)`` of a FHIR date/dateTime/instant, in naive UTC.

    Any precision from ``YYYY`` to fractional seconds; no timezone means UTC
    (search.html#date: "the date parameter ... has an implicit range").
    Raises ValueError on malformed or unrepresentable input (TypeError if not a str).
    """
    return _date_range(value)


@lru_cache(maxsize=65536)  # birth dates and timestamps repeat a lot across bulk loads
def _date_range(value: str) -> tuple[datetime, datetime]:
    m = _DATE.fullmatch(value)
    if m is None:
        raise ValueError(f"not a FHIR date: {value!r}")
    y, mo, d, h, mi, s, frac, tz = m.groups()
    year = int(y)
    try:
        if mo is None:
            low = datetime(year, 1, 1)
            return low, _next(lambda: datetime(year + 1, 1, 1))
        month = int(mo)
        if d is None:
            low = datetime(year, month, 1)
            return low, _next(lambda: datetime(year + (month == 12), month % 12 + 1, 1))
        if h is None:
            low = datetime(year, month, int(d))
            return low, _next(lambda: low + _DAY)
        # FHIR's time regex allows a leap second (:60); like POSIX time, fold it onto :59.
        sec = 59 if s == "60" else int(s or 0)
        micro = int(frac[:6].ljust(6, "0")) if frac else 0
        low = datetime(year, month, int(d), int(h), int(mi), sec, micro)
        if frac:
            width = timedelta(microseconds=10 ** (6 - min(len(frac), 6)))
        else:
            width = timedelta(seconds=1) if s else timedelta(minutes=1)
        high = _next(lambda: low + width)
        if tz and tz != "Z":
            sign = 1 if tz[0] == "+" else -1
            tzh, tzm = int(tz[1:3]), int(tz[4:6])
            if tzh > 14 or tzm > 59 or (tzh == 14 and tzm):  # R4 allows -14:00..+14:00
                raise ValueError(f"bad timezone offset in {value!r}")
            offset = sign * timedelta(hours=tzh, minutes=tzm)
            low -= offset  # may overflow: not representable as a naive UTC datetime
            if high < datetime.max:
                local_high = high
                high = _next(lambda: local_high - offset)
        return low, high
    except OverflowError as exc:
        raise ValueError(f"date out of range: {value!r}") from exc


def _next(make: Callable[[], datetime]) -> datetime:
    """The exclusive upper bound; past year 9999 it is datetime.max ("open-ended")."""
    try:
        return make()
    except (OverflowError, ValueError):
        return datetime.max


_REF = re.compile(
    r"(?:^|/)([A-Z][A-Za-z]+)/([A-Za-z0-9\-.]{1,64})(?:/_history/[A-Za-z0-9\-.]{1,64})?$"
)


@lru_cache(maxsize=65536)  # GP / organisation references repeat across patients
def split_reference(reference: str) -> tuple[str | None, str | None] | None:
    """(type, id) of a literal reference, (None, None) if opaque, None if not indexable.

    Handles ``Type/id``, absolute ``http://base/Type/id`` and ``/_history/n`` (history is
    dropped; search.html#reference).  ``#x`` (contained) is not indexed; ``urn:uuid:`` /
    ``urn:oid:`` and anything else unparsable is kept opaque so exact URL matches still work.
    """
    if not reference or reference[0] == "#":
        return None
    if reference.startswith("urn:"):
        return (None, None)
    m = _REF.search(reference)
    return (m.group(1), m.group(2)) if m else (None, None)


# ------------------------------------------------------------------ value -> rows
# A converter appends the rows for a list of values of one FHIR datatype to one row list.

Conv = Callable[[str, list[Any], list[Any]], None]


def _tok_coding(code: str, items: list[Any], out: list[Any]) -> None:
    for c in items:
        if c.__class__ is dict:
            v, system = c.get("code"), c.get("system")
            if v and v.__class__ is str:
                out.append((code, system if system.__class__ is str and system else None, v))


def _tok_concept(code: str, items: list[Any], out: list[Any]) -> None:
    for cc in items:  # search.html#token: a CodeableConcept matches on any of its codings
        if cc.__class__ is dict and (codings := cc.get("coding")):
            _tok_coding(code, codings, out)


def _tok_identifier(code: str, items: list[Any], out: list[Any]) -> None:
    for i in items:
        if i.__class__ is dict:
            v, system = i.get("value"), i.get("system")
            if v and v.__class__ is str:
                out.append((code, system if system.__class__ is str and system else None, v))


def _tok_contact(code: str, items: list[Any], out: list[Any]) -> None:
    for cp in items:  # search.html#token: ContactPoint matches on value only
        if cp.__class__ is dict:
            v = cp.get("value")
            if v and v.__class__ is str:
                out.append((code, None, v))


def _tok_primitive(code: str, items: list[Any], out: list[Any]) -> None:
    for v in items:
        if v.__class__ is str:
            if v:
                out.append((code, None, v))
        elif v.__class__ is bool:
            out.append((code, None, "true" if v else "false"))
        elif v.__class__ is int:
            out.append((code, None, str(v)))


def _str_primitive(code: str, items: list[Any], out: list[Any]) -> None:
    for v in items:
        if v.__class__ is str and v.strip():
            out.append((code, normalize_string(v), v))


_NAME_PARTS = ("family", "given", "prefix", "suffix", "text")
_ADDRESS_PARTS = ("line", "city", "district", "state", "postalCode", "country", "text")


def _str_parts(parts: tuple[str, ...]) -> Conv:
    def conv(code: str, items: list[Any], out: list[Any]) -> None:
        for item in items:  # search.html#string: HumanName / Address match on any part
            if item.__class__ is dict:
                for key in parts:
                    v = item.get(key)
                    if v is not None:
                        _str_primitive(code, v if v.__class__ is list else [v], out)

    return conv


def _ref_reference(code: str, items: list[Any], out: list[Any]) -> None:
    for r in items:
        if r.__class__ is dict:
            raw = r.get("reference")
            if raw and raw.__class__ is str and (split := split_reference(raw)) is not None:
                out.append((code, split[0], split[1], raw))


def _ref_canonical(code: str, items: list[Any], out: list[Any]) -> None:
    for v in items:
        if v and v.__class__ is str:
            out.append((code, None, None, v))


def _date_primitive(code: str, items: list[Any], out: list[Any]) -> None:
    for v in items:
        if v.__class__ is str:
            try:
                low, high = _date_range(v)
            except ValueError:
                continue  # bad data must not fail the write; it is simply not searchable
            out.append((code, low, high))


def _period_bounds(p: dict[str, Any]) -> tuple[datetime, datetime] | None:
    start, end = p.get("start"), p.get("end")
    if start is None and end is None:
        return None
    try:  # search.html#date: a missing start/end means the period is open on that side
        low = _date_range(start)[0] if start is not None else datetime.min
        high = _date_range(end)[1] if end is not None else datetime.max
    except (ValueError, TypeError):
        return None
    return (low, high) if low < high else None


def _date_period(code: str, items: list[Any], out: list[Any]) -> None:
    for p in items:
        if p.__class__ is dict and (bounds := _period_bounds(p)) is not None:
            out.append((code, *bounds))


def _date_timing(code: str, items: list[Any], out: list[Any]) -> None:
    # search.html#date: for Timing "only the outer limits matter" -> one row spanning the
    # events and repeat.boundsPeriod.
    for t in items:
        if t.__class__ is not dict:
            continue
        ranges: list[tuple[datetime, datetime]] = []
        events = t.get("event")
        for event in events if events.__class__ is list else ():
            try:
                ranges.append(_date_range(event))
            except (ValueError, TypeError):
                pass
        repeat = t.get("repeat")
        bounds = repeat.get("boundsPeriod") if repeat.__class__ is dict else None
        if bounds.__class__ is dict and (b := _period_bounds(bounds)) is not None:
            ranges.append(b)
        if ranges:
            out.append((code, min(r[0] for r in ranges), max(r[1] for r in ranges)))


def _uri_primitive(code: str, items: list[Any], out: list[Any]) -> None:
    for v in items:
        if v and v.__class__ is str:
            out.append((code, v))


_TEXT_TYPES = frozenset(
    {"string", "markdown", "code", "id", "uri", "url", "canonical", "oid", "uuid"}
)
_CONVERTERS: dict[str, dict[str, Conv]] = {
    "token": {
        "Coding": _tok_coding,
        "CodeableConcept": _tok_concept,
        "Identifier": _tok_identifier,
        "ContactPoint": _tok_contact,
        **dict.fromkeys(
            [*_TEXT_TYPES, "boolean", "integer", "positiveInt", "unsignedInt"], _tok_primitive
        ),
    },
    "string": {
        "HumanName": _str_parts(_NAME_PARTS),
        "Address": _str_parts(_ADDRESS_PARTS),
        **dict.fromkeys(_TEXT_TYPES, _str_primitive),
    },
    "reference": {
        "Reference": _ref_reference,
        **dict.fromkeys(("canonical", "uri", "url"), _ref_canonical),
    },
    "date": {
        **dict.fromkeys(("date", "dateTime", "instant"), _date_primitive),
        "Period": _date_period,
        "Timing": _date_timing,
    },
    "uri": dict.fromkeys(("uri", "url", "canonical", "oid", "uuid"), _uri_primitive),
}
_KIND = {"token": 0, "string": 1, "reference": 2, "date": 3, "uri": 4}
_CONTACT_SYSTEMS = frozenset({"phone", "fax", "email", "pager", "url", "sms", "other"})


def _shape(value: Any) -> str | None:
    """Best-guess FHIR datatype of an untyped fhirpathpy result (fallback path only)."""
    if value.__class__ is bool:
        return "boolean"
    if value.__class__ is int:
        return "integer"
    if value.__class__ is str:
        return "string"
    if value.__class__ is not dict:
        return None
    if "coding" in value:
        return "CodeableConcept"
    if "reference" in value:
        return "Reference"
    if "start" in value or "end" in value:
        return "Period"
    if "event" in value or "repeat" in value:
        return "Timing"
    if "family" in value or "given" in value or "prefix" in value or "suffix" in value:
        return "HumanName"
    if any(k in value for k in ("line", "city", "district", "state", "postalCode", "country")):
        return "Address"
    if "value" in value:
        return "ContactPoint" if value.get("system") in _CONTACT_SYSTEMS else "Identifier"
    if "code" in value:
        return "Coding"
    return None


# The datatype a bare string result stands for, per parameter type (fallback path only).
_STRING_AS = {
    "token": "string",
    "string": "string",
    "reference": "canonical",
    "date": "dateTime",
    "uri": "uri",
}


def _infer_converter(param_type: str) -> Conv:
    """A converter for values whose datatype is only known from their JSON shape."""
    table = _CONVERTERS[param_type]
    string_as = _STRING_AS[param_type]

    def conv(code: str, items: list[Any], out: list[Any]) -> None:
        for v in items:
            if param_type == "reference" and v.__class__ is dict and "resourceType" in v:
                if v.get("id"):  # e.g. Bundle.entry[0].resource yields the resource itself
                    rt, rid = v["resourceType"], v["id"]
                    out.append((code, rt, rid, f"{rt}/{rid}"))
                continue
            kind = _shape(v)
            fn = table.get(string_as if kind == "string" else kind) if kind else None
            if fn is not None:
                fn(code, [v], out)

    return conv


# ------------------------------------------------------------- FHIRPath -> walker

_R4 = _fhirpath_models["r4"]
_PATH2TYPE: dict[str, str] = _R4["path2Type"]  # "Patient.name" -> "HumanName"
_CHOICES: dict[str, list[str]] = _R4["choiceTypePaths"]  # "Patient.deceased" -> [...]
_ELSEWHERE: dict[str, str] = _R4["pathsDefinedElsewhere"]  # recursive backbone elements
_PARENT: dict[str, str] = _R4["type2Parent"]
_BACKBONE = "BackboneElement"
_PRIMITIVES = frozenset(t for t in _PATH2TYPE.values() if t[0].islower())

Step = str | Callable[[list[Any]], list[Any]]  # a JSON key, or a filter over the values


@cache
def _backbone_paths() -> frozenset[str]:
    """Element paths that have children but no datatype in the model: backbone elements."""
    out: set[str] = set()
    for path in _PATH2TYPE:
        parts = path.split(".")
        out.update(".".join(parts[:i]) for i in range(2, len(parts)))
    return frozenset(out)


def _norm_type(name: str) -> str:
    if name == "System.String":  # the model's type for id / url attributes
        return "string"
    lower = name[0].lower() + name[1:]
    return lower if lower in _PRIMITIVES else name


def _type_chain(ftype: str) -> list[str]:
    chain = [ftype]
    while (ftype := _PARENT.get(ftype, "")) != "":
        chain.append(ftype)
    return chain


def _is_a(ftype: str, target: str) -> bool:
    target = _norm_type(target).lower()
    return any(t.lower() == target for t in _type_chain(ftype))


def _child(path: str, ftype: str, name: str) -> list[tuple[str, str, str]] | None:
    """(JSON key, element path, datatype) for each variant of ``name`` under an element."""
    for base in [path, *(t for t in _type_chain(ftype) if t != path)]:
        cp = f"{base}.{name}"
        if cp in _ELSEWHERE:
            return [(name, _ELSEWHERE[cp], _BACKBONE)]
        if (t := _PATH2TYPE.get(cp)) is not None:
            return [(name, cp, _norm_type(t))]
        if choices := _CHOICES.get(cp):  # value[x] -> valueBoolean, valuePeriod, ...
            return [(name + c, cp + c, _norm_type(_PATH2TYPE.get(cp + c, c))) for c in choices]
        if cp in _backbone_paths():
            return [(name, cp, _BACKBONE)]
    return None


_ROOT = re.compile(r"\s*([A-Za-z_]\w*)")
_STEP = re.compile(
    r"""\s*\.\s*(?:
      where\(\s*resolve\(\)\s+is\s+(?P<resolve>[A-Za-z]\w*)\s*\)
    | where\(\s*(?P<wfield>[A-Za-z_]\w*)\s*=\s*'(?P<wval>[^'\\]*)'\s*\)
    | (?:as|ofType)\(\s*(?P<cast>[A-Za-z]\w*)\s*\)
    | (?P<field>[A-Za-z_]\w*)\b(?!\s*\()
    )""",
    re.VERBOSE,
)
_AS = re.compile(r"\s+as\s+([A-Za-z]\w*)\s*")
_EXISTS = re.compile(r"\s*(?P<p>[A-Za-z][\w.]*)\.exists\(\)\s+and\s+(?P=p)\s*!=\s*false\s*")


def _parse(expr: str, rtype: str) -> list[tuple[str, ...]] | None:
    """Ops for the handled subset (paths, casts, where(resolve() is T), where(f='x'))."""
    s = expr.strip()
    if s.startswith("("):
        depth = 0
        for close, ch in enumerate(s):
            depth += (ch == "(") - (ch == ")")
            if depth == 0:
                break
        if depth or (ops := _parse(s[1:close], rtype)) is None:
            return None
        rest = s[close + 1 :]
    else:
        m = _ROOT.match(s)
        if m is None or m.group(1) != rtype:
            return None
        ops, rest = [], s[m.end() :]
    pos = 0
    while (m := _STEP.match(rest, pos)) is not None:
        if m["resolve"]:
            ops.append(("resolve", m["resolve"]))
        elif m["wfield"]:
            ops.append(("where", m["wfield"], m["wval"]))
        elif m["cast"]:
            ops.append(("cast", m["cast"]))
        else:
            ops.append(("field", m["field"]))
        pos = m.end()
    if (m := _AS.fullmatch(rest, pos)) is not None:  # "Type.value as Period"
        ops.append(("cast", m[1]))
        pos = len(rest)
    return ops if not rest[pos:].strip() else None


def _resolves_to(rtype: str) -> Callable[[list[Any]], list[Any]]:
    """``where(resolve() is T)``: keep references whose literal target type is T."""

    def keep(items: list[Any]) -> list[Any]:
        out = []
        for r in items:
            raw = r.get("reference") if r.__class__ is dict else None
            if raw.__class__ is str and (split := split_reference(raw)) and split[0] == rtype:
                out.append(r)
        return out

    return keep


def _where_equals(field: str, literal: str) -> Callable[[list[Any]], list[Any]]:
    def keep(items: list[Any]) -> list[Any]:
        return [
            it
            for it in items
            if it.__class__ is dict and ((v := it.get(field)) == literal or v == [literal])
        ]

    return keep


def _compile(expr: str, rtype: str) -> list[tuple[tuple[Step, ...], str]] | None:
    """(steps from the resource root, datatype) per branch, or None if not handled."""
    ops = _parse(expr, rtype)
    if ops is None:
        return None
    states: list[tuple[tuple[Step, ...], str, str]] = [((), rtype, rtype)]
    for op in ops:
        nxt: list[tuple[tuple[Step, ...], str, str]] = []
        for steps, path, ftype in states:
            if op[0] == "field":
                if (kids := _child(path, ftype, op[1])) is None:
                    return None
                nxt.extend((steps + (key,), p, t) for key, p, t in kids)
            elif op[0] == "cast":
                if _is_a(ftype, op[1]):
                    nxt.append((steps, path, ftype))
            elif op[0] == "resolve":
                if ftype != "Reference":
                    return None
                nxt.append((steps + (_resolves_to(op[1]),), path, ftype))
            else:
                nxt.append((steps + (_where_equals(op[1], op[2]),), path, ftype))
        states = nxt
    return [(steps, ftype) for steps, _, ftype in states if steps]


def _walk(start: list[Any] | tuple[Any, ...], steps: tuple[Step, ...]) -> list[Any]:
    items: Any = start
    for step in steps:
        if step.__class__ is str:
            nxt: list[Any] = []
            for it in items:
                if it.__class__ is dict and (v := it.get(step)) is not None:
                    if v.__class__ is list:
                        nxt.extend(v)
                    else:
                        nxt.append(v)
            items = nxt
        else:
            items = step(items)  # type: ignore[operator]  # a filter callable
        if not items:
            return []
    return items if items.__class__ is list else list(items)


def _fp_resolve(inputs: list[Any]) -> list[Any]:
    """resolve() for fhirpathpy: a stub typed by the literal reference, enough for ``is T``."""
    out = []
    for item in inputs:
        raw = item.get("reference") if isinstance(item, dict) else item
        if isinstance(raw, str) and (split := split_reference(raw)) and split[0]:
            out.append(ResourceNode({"resourceType": split[0], "id": split[1]}, None))
    return out


FHIRPATH_OPTIONS: dict[str, Any] = {
    "userInvocationTable": {"resolve": {"fn": _fp_resolve, "arity": {0: []}}}
}
Getter = Callable[[dict[str, Any]], list[Any]]


def _fhirpathpy_getter(expr: str) -> Getter | None:
    try:
        compiled = fhirpathpy.compile(expr, model=_R4, options=FHIRPATH_OPTIONS)
    except Exception:  # fhirpathpy raises bare Exception on unsupported syntax
        log.warning("search expression not indexable: %s", expr, exc_info=True)
        return None

    def get(resource: dict[str, Any]) -> list[Any]:
        try:
            result = compiled(resource, {})
        except Exception:  # a bad value must not fail the write; it is just not indexed
            log.debug("fhirpathpy failed on %s", expr, exc_info=True)
            return []
        return [v if isinstance(v, (dict, str, bool, int, float)) else str(v) for v in result]

    return get


def _exists_not_false(branches: list[tuple[tuple[Step, ...], str]]) -> Getter:
    """``X.exists() and X != false`` (Patient.deceased): true iff X is present and not false."""

    def get(resource: dict[str, Any]) -> list[Any]:
        vals = [v for steps, _ in branches for v in _walk((resource,), steps)]
        return [bool(vals) and not (len(vals) == 1 and vals[0] is False)]

    return get


# ------------------------------------------------------------------------ Indexer

Entry = tuple[tuple[Step, ...], Conv, str, int]  # steps after the first key, conv, code, kind


@dataclass(slots=True)
class _TypePlan:
    by_key: dict[str, list[Entry]]  # first JSON key -> entries, so absent elements cost nothing
    always: list[tuple[Getter, Conv, str, int]]  # evaluated on the whole resource


class Indexer:
    """Compiles search parameters once; :meth:`extract` turns a resource into index rows.

    ``fallbacks`` lists, per resource type, the (code, expression) parts evaluated by
    fhirpathpy because the fast walker does not handle their form.
    """

    def __init__(self, params: dict[str, dict[str, SearchParam]]):
        self.fallbacks: dict[str, list[tuple[str, str]]] = {}
        self._plans = {rtype: self._plan(rtype, by_code) for rtype, by_code in params.items()}

    def _plan(self, rtype: str, by_code: dict[str, SearchParam]) -> _TypePlan:
        plan = _TypePlan({}, [])
        slow = self.fallbacks.setdefault(rtype, [])
        for sp in by_code.values():
            kind, table = _KIND[sp.type], _CONVERTERS[sp.type]
            for part in split_union(sp.expression):
                branches = _compile(part, rtype)
                if branches is not None:
                    for steps, ftype in branches:
                        # No converter means the datatype cannot match this parameter type
                        # (e.g. onsetAge for a date parameter): nothing to index.
                        if (conv := table.get(ftype)) is not None:
                            plan.by_key.setdefault(steps[0], []).append(  # type: ignore[arg-type]
                                (steps[1:], conv, sp.code, kind)
                            )
                    continue
                m = _EXISTS.fullmatch(part)
                if m and sp.type == "token" and (inner := _compile(m["p"], rtype)) is not None:
                    plan.always.append((_exists_not_false(inner), _tok_primitive, sp.code, kind))
                    continue
                slow.append((sp.code, part))
                if (getter := _fhirpathpy_getter(part)) is not None:
                    plan.always.append((getter, _infer_converter(sp.type), sp.code, kind))
        return plan

    def extract(self, resource: dict[str, Any]) -> IndexRows:
        """The deduplicated index rows of ``resource`` (never raises on bad element values)."""
        outs: tuple[list[Any], ...] = ([], [], [], [], [])
        plan = self._plans.get(resource.get("resourceType"))  # type: ignore[arg-type]
        if plan is not None:
            by_key = plan.by_key
            for key, value in resource.items():
                entries = by_key.get(key)
                if entries is None:
                    continue
                start = value if value.__class__ is list else (value,)
                for steps, conv, code, kind in entries:
                    items = _walk(start, steps) if steps else start
                    if items:
                        conv(code, items, outs[kind])  # type: ignore[arg-type]
            for getter, conv, code, kind in plan.always:
                if items := getter(resource):
                    conv(code, items, outs[kind])
        # Rows carry their param code, so deduplicating whole lists is per-parameter dedup.
        tokens, strings, refs, dates, uris = (
            list(dict.fromkeys(o)) if len(o) > 1 else o for o in outs
        )
        return IndexRows(tokens, strings, refs, dates, uris)

    def values(self, resource: dict[str, Any], code: str) -> list[Any]:
        """The raw values indexed for one parameter (for tests and diagnostics).

        This is the FHIRPath result, restricted to datatypes the parameter type can index
        (a date parameter over ``onset[x]`` skips ``onsetString``).
        """
        plan = self._plans.get(resource.get("resourceType"))  # type: ignore[arg-type]
        if plan is None:
            return []
        out: list[Any] = []
        for key, entries in plan.by_key.items():
            for steps, _, c, _ in entries:
                if c == code and (value := resource.get(key)) is not None:
                    start = value if value.__class__ is list else [value]
                    out.extend(v for v in _walk(start, steps) if v is not None)
        for getter, _, c, _ in plan.always:
            if c == code:
                out.extend(getter(resource))
        return out
