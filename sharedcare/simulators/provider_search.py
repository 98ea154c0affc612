"""FHIR R4 search over the provider simulator's in-memory records (http://hl7.org/fhir/R4/search.html).

Supported, for every type: ``_id``, ``_count``, ``_offset`` (the paging cursor the simulator's own
``next`` links carry), ``_sort`` (``date``, ``-date``, ``_id``), ``_summary=count``; for clinical
types ``patient`` / ``subject`` (``{id}``, ``Patient/{id}`` or an absolute Patient URL), the
chained ``patient.identifier`` / ``subject:Patient.identifier`` (local or NHS number identifier;
also accepted on Patient itself, as an alias of ``_id``/``identifier``, so a federating client
can send the same patient parameter to every type),
``encounter``, ``date`` (and the R4 per-type aliases, with prefixes ``eq ne gt lt ge le sa eb
ap``), and the token parameters in :data:`TOKENS` (``system|code``, ``|code``, ``code`` or
``system|``; a comma means OR, a repeated parameter AND). Patient adds ``identifier``,
``gender`` and ``birthdate``.

Unknown parameters are ignored (and left out of the ``self`` link) unless the client sends
``Prefer: handling=strict``, when they are a 400 — the behaviour R4 search.html#errors asks for.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from sharedcare.simulators.clinical import when_of

Predicate = Callable[[dict[str, Any]], bool]

# Token search parameters: name -> the element holding the codes (R4 search parameter registry).
_CLINICAL_STATUS = {"status": "status"}
TOKENS: Final[dict[str, dict[str, str]]] = {
    "Patient": {"identifier": "identifier", "gender": "gender"},
    "Encounter": {"class": "class", "type": "type", "code": "type", **_CLINICAL_STATUS},
    "Condition": {
        "category": "category", "code": "code", "clinical-status": "clinicalStatus",
        "verification-status": "verificationStatus",
    },
    "Observation": {"category": "category", "code": "code", **_CLINICAL_STATUS},
    "MedicationRequest": {
        "category": "category", "code": "medicationCodeableConcept", "intent": "intent",
        **_CLINICAL_STATUS,
    },
    "MedicationStatement": {
        "category": "category", "code": "medicationCodeableConcept", **_CLINICAL_STATUS,
    },
    "AllergyIntolerance": {
        "category": "category", "code": "code", "criticality": "criticality",
        "clinical-status": "clinicalStatus", "type": "type",
    },
    "Immunization": {"vaccine-code": "vaccineCode", "code": "vaccineCode", **_CLINICAL_STATUS},
    "Procedure": {"category": "category", "code": "code", **_CLINICAL_STATUS},
    "DiagnosticReport": {"category": "category", "code": "code", **_CLINICAL_STATUS},
    "DocumentReference": {
        "category": "category", "type": "type", "code": "type", **_CLINICAL_STATUS,
    },
}  # fmt: skip
# Date parameters: ``date`` everywhere, plus the names R4 gives the same element.
DATES: Final[dict[str, frozenset[str]]] = {
    "Patient": frozenset({"birthdate"}),
    "Condition": frozenset({"date", "recorded-date"}),
    "MedicationRequest": frozenset({"date", "authoredon"}),
    "MedicationStatement": frozenset({"date", "effective"}),
}
PATIENT_PARAMS: Final = frozenset({"patient", "subject"})
CHAINED_PATIENT: Final = frozenset(
    {
        "patient.identifier",
        "subject.identifier",
        "patient:Patient.identifier",
        "subject:Patient.identifier",
    }
)
CONTROL: Final = frozenset({"_count", "_offset", "_sort", "_summary", "_format", "_total"})
_DATE = re.compile(
    r"^(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<H>\d{2}):(?P<M>\d{2})(?::(?P<S>\d{2})(?:\.\d+)?)?(?P<tz>Z|[+-]\d{2}:\d{2})?)?)?)?$"
)
_PREFIXES: Final = ("eq", "ne", "gt", "lt", "ge", "le", "sa", "eb", "ap")


class SearchError(ValueError):
    """A search the simulator cannot answer: the message says what to change (400)."""


@dataclass
class Query:
    """A parsed search: the patient (local id), filters, paging and the parameters used."""

    type: str
    patients: set[str] | None = None  # local ids; None: every patient
    filters: list[Predicate] = field(default_factory=list)
    count: int = 50
    offset: int = 0
    sort: str = "-date"
    summary_count: bool = False
    used: list[tuple[str, str]] = field(default_factory=list)  # for self/next links

    def matches(self, resource: dict[str, Any]) -> bool:
        return all(f(resource) for f in self.filters)


def parse(
    type_: str,
    params: list[tuple[str, str]],
    *,
    strict: bool,
    default_count: int,
    max_count: int,
    resolve_identifier: Callable[[str, str | None], str | None],
) -> Query:
    """Parse search parameters for ``type_``; raises :class:`SearchError` on bad input."""
    query = Query(type=type_, count=default_count)
    tokens = TOKENS.get(type_, {})
    dates = DATES.get(type_, frozenset({"date"}))
    for name, value in params:
        if name == "_count":
            query.count = min(_int(name, value), max_count)
        elif name == "_offset":
            query.offset = _int(name, value)
        elif name == "_sort":
            if value not in ("date", "-date", "_id"):
                raise SearchError("_sort must be date, -date or _id.")
            query.sort = value
            query.used.append((name, value))
        elif name == "_summary":
            if value != "count":
                if strict:
                    raise SearchError("Only _summary=count is supported.")
                continue
            query.summary_count = True
            query.used.append((name, value))
        elif name in ("_format", "_total"):
            continue
        elif name == "_id":
            query.filters.append(_id_filter(set(value.split(","))))
            query.used.append((name, value))
        elif name in PATIENT_PARAMS | CHAINED_PATIENT:  # on Patient too: an alias of _id
            local = _patient_id(name, value, resolve_identifier)
            query.patients = {local} if query.patients is None else query.patients & {local}
            query.used.append((name, value))
        elif type_ != "Patient" and name == "encounter":
            query.filters.append(_encounter_filter(f"Encounter/{value.rsplit('/', 1)[-1]}"))
            query.used.append((name, value))
        elif name in dates:
            query.filters.append(_date_filter(name, value))
            query.used.append((name, value))
        elif ":" not in name and name in tokens:
            query.filters.append(_token_filter(tokens[name], value))
            query.used.append((name, value))
        elif strict:
            known = sorted({*tokens, *dates, "_id", *CONTROL} | _patient_names(type_))
            raise SearchError(
                f"Unknown or unsupported search parameter {name!r} for {type_}; "
                f"this server supports: {', '.join(known)}."
            )
    if query.count < 0 or query.offset < 0:
        raise SearchError("_count and _offset must not be negative.")
    return query


def _id_filter(ids: set[str]) -> Predicate:
    return lambda r: r["id"] in ids


def _encounter_filter(reference: str) -> Predicate:
    return lambda r: (r.get("encounter") or {}).get("reference") == reference


def _patient_names(type_: str) -> set[str]:
    names = {*PATIENT_PARAMS, *CHAINED_PATIENT}
    return names if type_ == "Patient" else {*names, "encounter"}


def _int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SearchError(f"{name} must be a whole number, not {value!r}.") from None


def _patient_id(name: str, value: str, resolve: Callable[[str, str | None], str | None]) -> str:
    if "." in name.split(":")[0] or ":" in name:  # chained: patient.identifier=system|value
        system, bar, ident = value.rpartition("|")
        local = resolve(ident, system if bar else None)
        return local if local is not None else "\x00unknown"
    ref = value.split("?", 1)[0].rstrip("/")
    if "/" in ref:
        parts = ref.split("/")
        if len(parts) < 2 or parts[-2] != "Patient":
            raise SearchError(f"{name} must reference a Patient: {{id}} or Patient/{{id}}.")
        ref = parts[-1]
    if not ref:
        raise SearchError(f"{name} needs a Patient id.")
    return ref


# -- tokens ---------------------------------------------------------------------------------
def codes(value: Any) -> Iterator[tuple[str | None, str]]:
    """The (system, code) pairs in a CodeableConcept, Coding, Identifier, code or list of them."""
    if isinstance(value, str):
        yield None, value
    elif isinstance(value, list):
        for item in value:
            yield from codes(item)
    elif isinstance(value, dict):
        if "coding" in value:
            yield from codes(value["coding"])
        elif "code" in value:
            yield value.get("system"), value["code"]
        elif "value" in value:  # Identifier
            yield value.get("system"), value["value"]


def _token_filter(element: str, value: str) -> Predicate:
    wanted: list[tuple[str | None, str]] = []
    for part in value.split(","):
        head, bar, tail = part.rpartition("|")
        if not bar and not tail:
            raise SearchError("A token search needs a code: system|code, |code or code.")
        # "code": any system; "|code": no system; "system|": any code in the system
        wanted.append((head if bar else None, tail))

    def match(resource: dict[str, Any]) -> bool:
        found = list(codes(resource.get(element)))
        for system, code in wanted:
            for s, c in found:
                if (system is None or system == (s or "")) and (not code or code == c):
                    return True
        return False

    return match


# -- dates (search.html#date) -----------------------------------------------------------------
def date_range(value: str) -> tuple[datetime, datetime]:
    """The half-open UTC interval a FHIR date/dateTime denotes at its precision."""
    m = _DATE.match(value)
    if not m:
        raise SearchError(
            f"{value!r} is not a FHIR date: use YYYY, YYYY-MM, YYYY-MM-DD or a dateTime."
        )
    y, mo, d = int(m["y"]), int(m["m"] or 1), int(m["d"] or 1)
    try:
        tz = UTC
        if m["tz"] and m["tz"] != "Z":
            sign = 1 if m["tz"][0] == "+" else -1
            hh, mm = m["tz"][1:].split(":")
            tz = UTC if hh == mm == "00" else _offset(sign * (int(hh) * 60 + int(mm)))
        start = datetime(y, mo, d, int(m["H"] or 0), int(m["M"] or 0), int(m["S"] or 0), tzinfo=tz)
    except ValueError as exc:
        raise SearchError(f"{value!r} is not a valid date: {exc}.") from None
    if m["S"]:
        end = start + timedelta(seconds=1)
    elif m["M"]:
        end = start + timedelta(minutes=1)
    elif m["d"]:
        end = start + timedelta(days=1)
    elif m["m"]:
        end = start.replace(year=y + (mo == 12), month=mo % 12 + 1)
    else:
        end = start.replace(year=y + 1)
    return start.astimezone(UTC), end.astimezone(UTC)


def _offset(minutes: int) -> Any:
    from datetime import timezone

    return timezone(timedelta(minutes=minutes))


def _date_filter(name: str, raw: str) -> Predicate:
    prefix, value = ("eq", raw)
    if raw[:2] in _PREFIXES:
        prefix, value = raw[:2], raw[2:]
    s_start, s_end = date_range(value)
    if prefix == "ap":  # "approximately": widen by 10% of the distance from now (at least a day)
        slack = max(abs(datetime.now(UTC) - s_start) / 10, timedelta(days=1))
        s_start, s_end = s_start - slack, s_end + slack

    def match(resource: dict[str, Any]) -> bool:
        when = when_of(resource)
        if when is None:
            return False
        t_start = date_range(when[0])[0]
        t_end = date_range(when[1])[1]
        contained = s_start <= t_start and t_end <= s_end
        if prefix == "eq":
            return contained
        if prefix == "ne":
            return not contained
        if prefix == "gt":
            return t_end > s_end
        if prefix == "lt":
            return t_start < s_start
        if prefix == "ge":
            return t_end > s_end or contained
        if prefix == "le":
            return t_start < s_start or contained
        if prefix == "sa":
            return t_start >= s_end
        if prefix == "eb":
            return t_end <= s_start
        return t_start < s_end and s_start < t_end  # ap: overlaps the widened range

    del name
    return match


def sort_key(sort: str) -> Callable[[dict[str, Any]], Any]:
    """A key for ``sorted``; ``-date`` is applied with reverse=True by the caller."""
    if sort == "_id":
        return lambda r: r["id"]
    return lambda r: ((when_of(r) or ("",))[0], r["id"])
