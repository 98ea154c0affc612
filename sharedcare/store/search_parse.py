"""Parse FHIR search parameters into a plan the SQL builder can run.

Follows hl7.org/fhir/R4/search.html: repeated parameters AND, comma-separated values OR
(``\\,`` escapes a comma), ``name:modifier``, date prefixes, and the result parameters
``_count``, ``_sort``, ``_total``, ``_include`` and ``_revinclude``. Unknown parameters
are an error unless the client sent ``Prefer: handling=lenient`` (search.html#errors).
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from sharedcare.fhir.errors import FHIRError, Issue
from sharedcare.store.indexing import date_range, normalize_string
from sharedcare.store.searchparams import OWN_TABLE_PARAMS, SearchParam

PREFIXES = ("eq", "ne", "lt", "gt", "le", "ge")
MODIFIERS = {
    "token": {"not", "missing"},
    "string": {"exact", "contains", "missing"},
    "reference": {"missing"},
    "date": {"missing"},
    "uri": {"missing"},
}
# _id and _lastUpdated are columns of `resources`; these are the modifiers they support.
COLUMN_MODIFIERS = {"_id": {"not", "missing"}, "_lastUpdated": {"missing"}}
# Parameters every client library may send that change nothing in a JSON-only server.
# `_totalMethod` is sent by fhirpy's count() (an Aidbox extension); totals here are always exact.
IGNORED = {"_format", "_pretty", "_totalMethod"}
RESULT_PARAMS = {"_count", "_sort", "_total", "_include", "_revinclude", "_cursor"}
# Prefixes of search.html#prefix this server does not implement (so they get a clear 400).
_UNSUPPORTED_PREFIXES = ("sa", "eb", "ap")
# A "+" in an unencoded query string arrives as a space: "2024-01-01T10:00:00 01:00".
_SPACE_OFFSET = re.compile(r"(T\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?) (\d{2}:\d{2})$")
_ESCAPE = re.compile(r"\\([\\,$|])")
_DIGITS = re.compile(r"[0-9]+")
# Cursor keys must fit a signed 64-bit column (PostgreSQL BIGINT) or the driver raises.
_MAX_KEY = 2**63 - 1


@dataclass(frozen=True, slots=True)
class Clause:
    """One AND-ed condition: a parameter, its modifier and the OR-ed values."""

    param: SearchParam | None  # None for _id / _lastUpdated (columns of `resources`)
    name: str
    modifier: str | None
    values: tuple[Any, ...]


@dataclass(slots=True)
class SearchPlan:
    rtype: str
    clauses: list[Clause] = field(default_factory=list)
    count: int = 50
    sort_desc: bool | None = None  # None: insertion order; else by _lastUpdated
    total: str = "accurate"
    includes: list[tuple[str, str, str | None]] = field(default_factory=list)
    revincludes: list[tuple[str, str]] = field(default_factory=list)
    cursor: tuple[str, datetime | None, int] | None = None
    echo: list[tuple[str, str]] = field(default_factory=list)  # params for self/next links
    warnings: list[Issue] = field(default_factory=list)


def _split_escaped(raw: str, sep: str, maxsplit: int = -1) -> list[str]:
    """Split on ``sep`` where it is not escaped by a backslash; pieces stay escaped."""
    if "\\" not in raw:  # nothing escaped (nearly every value): str.split is exact
        return raw.split(sep, maxsplit)
    parts: list[str] = []
    start = i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "\\":
            i += 2  # the escaped character is never a separator
            continue
        if ch == sep and maxsplit != len(parts):
            parts.append(raw[start:i])
            start = i + 1
        i += 1
    parts.append(raw[start:])
    return parts


def unescape(value: str) -> str:
    """Undo search.html#escaping: ``\\,`` ``\\|`` ``\\$`` ``\\\\``; other backslashes stay."""
    if "\\" not in value:
        return value
    return _ESCAPE.sub(r"\1", value)


def split_values(raw: str) -> list[str]:
    """Comma-separated values (OR), with escapes undone."""
    return [unescape(v) for v in _split_escaped(raw, ",")]


def parse_token(value: str) -> tuple[str | None, str | None]:
    """``code`` → (None, code) any system; ``s|c``; ``|c`` → ("", c) no system; ``s|`` → (s, None).

    ``value`` is one still-escaped value, so that ``\\|`` is not taken as the separator.
    """
    parts = _split_escaped(value, "|", 1)
    if len(parts) == 1:
        return None, unescape(value)
    system, code = (unescape(p) for p in parts)
    return system, code or None


def parse_date(value: str, name: str) -> tuple[str, datetime, datetime]:
    """(prefix, low, high) of one date search value; the range is ``[low, high)`` in naive UTC."""
    prefix = value[:2] if value[:2] in PREFIXES else "eq"
    raw = value[2:] if value[:2] in PREFIXES else value
    if value[:2] in _UNSUPPORTED_PREFIXES:
        raise FHIRError.of(
            400,
            "not-supported",
            f"{name}={value!r}: the prefix {value[:2]!r} is not supported; "
            f"use one of {', '.join(PREFIXES)}.",
        )
    raw = _SPACE_OFFSET.sub(r"\1+\2", raw)
    try:
        low, high = date_range(raw)
    except ValueError:
        raise _bad(
            f"{name}={value!r}: not a FHIR date; use an optional prefix "
            f"({', '.join(PREFIXES)}) and YYYY, YYYY-MM, YYYY-MM-DD or a full dateTime "
            f"such as 2024-01-31T09:00:00Z (URL-encode a '+' in a timezone offset as %2B)."
        ) from None
    return prefix, low, high


def encode_cursor(direction: str, last_updated: datetime | None, rid: int) -> str:
    raw = orjson.dumps([direction, last_updated.isoformat() if last_updated else None, rid])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(value: str) -> tuple[str, datetime | None, int]:
    try:
        direction, ts, rid = orjson.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        if direction not in ("after", "before") or rid.__class__ is not int:
            raise ValueError
        if not 0 <= rid <= _MAX_KEY:
            raise ValueError
        when = None if ts is None else datetime.fromisoformat(ts)
        if when is not None and when.tzinfo is not None:  # the server only issues naive UTC
            raise ValueError
        return direction, when, rid
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise _bad(
            "The _cursor value is not one this server issued; start the search again."
        ) from None


def _bad(message: str) -> FHIRError:
    return FHIRError.of(400, "invalid", message)


def parse_search(
    rtype: str,
    items: list[tuple[str, str]],
    params: dict[str, SearchParam],
    *,
    default_count: int,
    max_count: int,
    all_params: dict[str, dict[str, SearchParam]],
    lenient: bool = False,
) -> SearchPlan:
    """Turn query items into a :class:`SearchPlan`, or raise a 400 naming what is wrong."""
    plan = SearchPlan(rtype=rtype, count=default_count)
    for key, raw in items:
        if "\x00" in key or "\x00" in raw:  # PostgreSQL text cannot hold NUL: refuse it here
            raise _bad(f"Search parameter {key!r} contains a NUL character (%00); remove it.")
        name, _, modifier = key.partition(":")
        if name in IGNORED:
            continue
        if name in RESULT_PARAMS and modifier:
            hint = ""
            if modifier == "iterate":
                hint = " Only one level of _include/_revinclude is supported."
            raise FHIRError.of(
                400, "not-supported", f"{name} takes no modifier; {key!r} is not supported.{hint}"
            )
        if name == "_cursor":
            plan.cursor = _decode_cursor(raw)
            continue
        handled = _parse_result_param(plan, name, raw, max_count, all_params)
        if handled:
            plan.echo.append((key, raw))
            continue
        param: SearchParam | None
        if name in COLUMN_MODIFIERS:
            param = None
            kind = "token" if name == "_id" else "date"
            allowed = COLUMN_MODIFIERS[name]
        elif name in params:
            param = params[name]
            kind = param.type
            if kind not in MODIFIERS:
                raise FHIRError.of(
                    400,
                    "not-supported",
                    f"Search parameter {name!r} is of type {kind}, which this server does not search.",
                )
            allowed = MODIFIERS[kind]
        else:
            message = (
                f"Unknown search parameter {name!r} for {rtype}. Supported: "
                f"_id, _lastUpdated, {', '.join(sorted(params))}."
            )
            if lenient:
                plan.warnings.append(
                    Issue("not-supported", message + " It was ignored.", "warning")
                )
                continue
            raise FHIRError.of(400, "not-supported", message)
        mod = modifier or None
        if (
            mod
            and param is not None
            and param.type == "reference"
            and _is_type_modifier(param, mod)
        ):
            pass  # a type modifier, e.g. subject:Patient=123
        elif mod and mod not in allowed:
            supported = ", ".join(sorted(":" + m for m in allowed))
            if param is not None and param.type == "reference":
                supported += " and a target type such as :" + (param.targets or ("Patient",))[0]
            raise FHIRError.of(
                400,
                "not-supported",
                f"Modifier :{mod} is not supported on {kind} parameter {name!r}; supported: {supported}.",
            )
        values = _parse_values(name, kind, mod, raw)
        if name == "_id" and mod != "missing":  # ids have no system: keep the raw value
            values = tuple(unescape(v) for v in _split_escaped(raw, ",") if v)
        plan.clauses.append(Clause(param, name, mod, values))
        plan.echo.append((key, raw))
    return plan


def _is_type_modifier(param: SearchParam, modifier: str) -> bool:
    if param.targets:
        return modifier in param.targets
    return modifier[:1].isupper() and modifier.isalpha()  # a reference to any type


def _parse_values(name: str, kind: str, modifier: str | None, raw: str) -> tuple[Any, ...]:
    if modifier == "missing":
        if raw not in ("true", "false"):
            raise _bad(f"{name}:missing takes true or false, not {raw!r}.")
        return (raw == "true",)
    escaped = [v for v in _split_escaped(raw, ",") if v != ""]
    if not escaped:
        raise _bad(f"Search parameter {name!r} has no value; give one or leave the parameter out.")
    if kind == "token":
        return tuple(parse_token(v) for v in escaped)
    values = [unescape(v) for v in escaped]
    if kind == "string":
        return tuple(v if modifier == "exact" else normalize_string(v) for v in values)
    if kind == "date":
        return tuple(parse_date(v, name) for v in values)
    return tuple(values)


def _parse_result_param(
    plan: SearchPlan,
    name: str,
    raw: str,
    max_count: int,
    all_params: dict[str, dict[str, SearchParam]],
) -> bool:
    if name == "_count":
        if not _DIGITS.fullmatch(raw):
            raise _bad(f"_count must be a whole number from 0 to {max_count}, not {raw!r}.")
        # Larger values are capped (search.html#count); a huge one is not even converted.
        plan.count = max_count if len(raw) > 9 else min(int(raw), max_count)
        return True
    if name == "_sort":
        if raw not in ("_lastUpdated", "-_lastUpdated"):
            raise FHIRError.of(
                400,
                "not-supported",
                f"_sort={raw!r} is not supported; use _lastUpdated or -_lastUpdated.",
            )
        plan.sort_desc = raw.startswith("-")
        return True
    if name == "_total":
        if raw not in ("accurate", "none", "estimate"):
            raise _bad(f"_total must be accurate, estimate or none, not {raw!r}.")
        plan.total = "none" if raw == "none" else "accurate"
        return True
    if name in ("_include", "_revinclude"):
        source, _, rest = raw.partition(":")
        pname, _, target = rest.partition(":")
        if source in OWN_TABLE_PARAMS or target in OWN_TABLE_PARAMS:
            raise FHIRError.of(
                400,
                "not-supported",
                f"{name}={raw!r}: {source if source in OWN_TABLE_PARAMS else target} is searched "
                "on its own and joins into no other search.",
            )
        source_params = all_params.get(source, {})
        param = source_params.get(pname)
        if param is None or param.type != "reference":
            raise _bad(
                f"{name}={raw!r}: expected SourceType:referenceParameter[:TargetType] "
                f"naming a reference parameter of a supported type."
            )
        if name == "_include":
            if source != plan.rtype:
                raise _bad(f"_include={raw!r} must start with the searched type {plan.rtype}.")
            if target and param.targets and target not in param.targets:
                raise _bad(
                    f"_include={raw!r}: {source}:{pname} does not refer to {target}; "
                    f"it refers to {', '.join(param.targets)}."
                )
            plan.includes.append((source, pname, target or None))
        else:
            if (param.targets and plan.rtype not in param.targets) or (
                target and target != plan.rtype
            ):
                raise _bad(
                    f"_revinclude={raw!r}: {source}:{pname} cannot refer to the searched type {plan.rtype}."
                )
            plan.revincludes.append((source, pname))
        return True
    return False
