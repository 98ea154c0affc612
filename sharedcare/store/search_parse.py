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
from sharedcare.store.searchparams import SearchParam

PREFIXES = ("eq", "ne", "lt", "gt", "le", "ge")
MODIFIERS = {
    "token": {"not", "missing"},
    "string": {"exact", "contains", "missing"},
    "reference": {"missing"},
    "date": {"missing"},
    "uri": {"missing"},
}
# Parameters every client library may send that change nothing in a JSON-only server.
IGNORED = {"_format", "_pretty"}
_SPLIT_RE = re.compile(r"(?<!\\),")


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


def split_values(raw: str) -> list[str]:
    return [v.replace("\\,", ",") for v in _SPLIT_RE.split(raw)]


def parse_token(value: str) -> tuple[str | None, str | None]:
    """``code`` → (None, code) any system; ``s|c``; ``|c`` → ("", c) no system; ``s|`` → (s, None)."""
    if "|" not in value:
        return None, value
    system, code = value.split("|", 1)
    return system, code or None


def parse_date(value: str, name: str) -> tuple[str, datetime, datetime]:
    prefix = value[:2] if value[:2] in PREFIXES else "eq"
    raw = value[2:] if value[:2] in PREFIXES else value
    try:
        low, high = date_range(raw)
    except ValueError:
        raise _bad(
            f"{name}={value!r}: not a FHIR date; use an optional prefix "
            f"({', '.join(PREFIXES)}) and YYYY, YYYY-MM, YYYY-MM-DD or a full dateTime."
        ) from None
    return prefix, low, high


def encode_cursor(direction: str, last_updated: datetime | None, rid: int) -> str:
    raw = orjson.dumps([direction, last_updated.isoformat() if last_updated else None, rid])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(value: str) -> tuple[str, datetime | None, int]:
    try:
        direction, ts, rid = orjson.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
        if direction not in ("after", "before") or not isinstance(rid, int):
            raise ValueError
        return direction, datetime.fromisoformat(ts) if ts else None, rid
    except (ValueError, TypeError, orjson.JSONDecodeError):
        raise _bad("The _cursor value is not one this server issued; start the search again.") from None


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
        name, _, modifier = key.partition(":")
        if name in IGNORED:
            continue
        if name == "_cursor":
            plan.cursor = _decode_cursor(raw)
            continue
        handled = _parse_result_param(plan, name, raw, max_count, all_params)
        if handled:
            plan.echo.append((key, raw))
            continue
        if name in ("_id", "_lastUpdated"):
            param = None
            kind = "token" if name == "_id" else "date"
        elif name in params:
            param = params[name]
            kind = param.type
        else:
            message = (
                f"Unknown search parameter {name!r} for {rtype}. Supported: "
                f"_id, _lastUpdated, {', '.join(sorted(params))}."
            )
            if lenient:
                plan.warnings.append(Issue("not-supported", message + " It was ignored.", "warning"))
                continue
            raise FHIRError.of(400, "not-supported", message)
        mod = modifier or None
        if mod and param is not None and param.type == "reference" and mod in param.targets:
            pass  # a type modifier, e.g. subject:Patient=123
        elif mod and mod not in MODIFIERS[kind]:
            raise FHIRError.of(
                400,
                "not-supported",
                f"Modifier :{mod} is not supported on {kind} parameter {name!r}; "
                f"supported: {', '.join(sorted(':' + m for m in MODIFIERS[kind]))}.",
            )
        plan.clauses.append(Clause(param, name, mod, _parse_values(name, kind, mod, raw)))
        plan.echo.append((key, raw))
    return plan


def _parse_values(name: str, kind: str, modifier: str | None, raw: str) -> tuple[Any, ...]:
    if modifier == "missing":
        if raw not in ("true", "false"):
            raise _bad(f"{name}:missing takes true or false, not {raw!r}.")
        return (raw == "true",)
    values = [v for v in split_values(raw) if v != ""]
    if not values:
        raise _bad(f"Search parameter {name!r} has no value.")
    if kind == "token":
        return tuple(parse_token(v) for v in values)
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
        if not raw.isdigit():
            raise _bad(f"_count must be a whole number, not {raw!r}.")
        plan.count = min(int(raw), max_count)
        return True
    if name == "_sort":
        if raw not in ("_lastUpdated", "-_lastUpdated"):
            raise FHIRError.of(
                400, "not-supported", f"_sort={raw!r} is not supported; use _lastUpdated or -_lastUpdated."
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
            plan.includes.append((source, pname, target or None))
        else:
            plan.revincludes.append((source, pname))
        return True
    return False
