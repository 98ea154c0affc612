"""The policy file: TOML text in, checked rules out (no caches, no state).

Everything an operator can get wrong is refused with a message naming the file and the
rule at fault: unknown keys, undefined sets, misspelt purpose codes or resource types,
labels without a system, duplicate or reserved rule ids, qualify without labels.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sharedcare.consent.features import Key
from sharedcare.consent.model import (
    RESERVED_RULE_IDS,
    RULE_DEFAULT,
    Coding,
    Decision,
    Outcome,
    RequestContext,
)
from sharedcare.store.searchparams import r4_resource_types

DEFAULT_POLICY_FILE: Final = "default-policy.toml"
RULE_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SET_NAME_RE: Final = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
TOP_KEYS: Final = ("version", "description", "sets", "labels", "rule", "default")
RULE_KEYS: Final = ("id", "description", "decision", "labels", "review", "reason", "when", "unless")
DEFAULT_KEYS: Final = ("decision", "labels", "review", "reason")
REQUEST_KEYS: Final = {"role": "user_role", "organization": "organization", "purpose": "purpose", "client": "client_id"}
RESOURCE_KEYS: Final = ("type", "label", "code", "provider", "consent")
CONDITION_KEYS: Final = (*RESOURCE_KEYS, *REQUEST_KEYS)
CONSENT_VALUES: Final = ("deny", "permit", "none")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the rule at fault."""

    def __init__(self, message: str, *, source: str, rule: str | None = None):
        self.source = source
        self.rule = rule
        where = f"{source}: " if not rule else f"{source}: {rule}: " if rule.startswith("[") else f"{source}: rule {rule}: "
        super().__init__(where + message)


@dataclass(frozen=True, slots=True)
class Conditions:
    """The ``when`` (or ``unless``) table of a rule: all keys must hold, any value of each."""

    request: tuple[tuple[str, frozenset[str]], ...] = ()  # (RequestContext attribute, values)
    types: frozenset[str] | None = None
    labels: frozenset[Key] | None = None
    codes: frozenset[Key] | None = None
    providers: frozenset[str] | None = None
    consent: frozenset[str] | None = None

    def request_holds(self, ctx: RequestContext) -> bool:
        return all(getattr(ctx, attr) in values for attr, values in self.request)

    def resource_part(self) -> Conditions:
        return Conditions((), self.types, self.labels, self.codes, self.providers, self.consent)

    @property
    def has_resource_part(self) -> bool:
        return any(v is not None for v in (self.types, self.labels, self.codes, self.providers, self.consent))


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    outcome: Outcome
    when: Conditions
    unless: Conditions | None

    @property
    def overrides_consent(self) -> bool:
        """Whether the rule explicitly applies to resources the person's consent denies."""
        return self.when.consent is not None and "deny" in self.when.consent


@dataclass(frozen=True)
class PolicyText:
    """A checked policy file."""

    version: str
    description: str
    digest: str  # sha256 of the text
    rules: tuple[Rule, ...]
    default: Outcome


def _purposes() -> frozenset[str]:
    from sharedcare.iam.context import PURPOSES_OF_USE

    return PURPOSES_OF_USE


def read_policy(text: str, source: str = "<text>") -> PolicyText:
    """Parse and check policy TOML; PolicyError names the problem and the rule."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(f"not valid TOML: {exc}", source=source) from None
    _only(doc, TOP_KEYS, "the top level", source, None)
    version = doc.get("version")
    if not isinstance(version, str) or not version.strip():
        raise PolicyError('`version = "..."` is required (a string naming this revision)', source=source)
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise PolicyError("`description` must be a string", source=source)
    sets = _sets(doc.get("sets", {}), source)
    labels = _label_table(doc.get("labels", {}), source)
    raw_rules = doc.get("rule", [])
    if not isinstance(raw_rules, list):
        raise PolicyError("rules are written as [[rule]] tables", source=source)
    rules: list[Rule] = []
    seen: set[str] = set()
    for n, raw in enumerate(raw_rules, 1):
        rule = _rule(raw, n, sets, labels, source)
        if rule.id in seen:
            raise PolicyError(f"the id {rule.id!r} is used by an earlier rule; ids must be unique", source=source, rule=f"#{n}")
        seen.add(rule.id)
        rules.append(rule)
    default = _default(doc.get("default", {}), labels, source)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return PolicyText(version.strip(), description, digest, tuple(rules), default)


def _only(table: Any, allowed: Sequence[str], where: str, source: str, rule: str | None) -> None:
    if not isinstance(table, dict):
        raise PolicyError(f"{where} must be a table", source=source, rule=rule)
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise PolicyError(
            f"unknown key(s) {', '.join(unknown)} in {where}; allowed: {', '.join(allowed)}", source=source, rule=rule
        )


def _sets(raw: Any, source: str) -> dict[str, tuple[str, ...]]:
    if not isinstance(raw, dict):
        raise PolicyError("[sets] must be a table of name = [values]", source=source)
    out = {}
    for name, values in raw.items():
        if not SET_NAME_RE.match(name):
            raise PolicyError(f"set name {name!r} must start with a letter (letters, digits, _ and -)", source=source)
        values = [values] if isinstance(values, str) else values
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
            raise PolicyError(f"set {name!r} must be a non-empty list of strings", source=source)
        if any(v.startswith("@") for v in values):
            raise PolicyError(f"set {name!r} refers to another set; sets hold plain values only", source=source)
        out[name] = tuple(values)
    return out


def _coding(value: str, what: str, source: str, rule: str | None) -> Coding:
    system, sep, code = value.rpartition("|")
    if not sep or not system or not code:
        raise PolicyError(f"{what} {value!r} must be written system|code, e.g. "
                          "http://terminology.hl7.org/CodeSystem/v3-ActCode|HIV", source=source, rule=rule)
    return Coding(system, code)


def _label_table(raw: Any, source: str) -> dict[str, Coding]:
    if not isinstance(raw, dict):
        raise PolicyError("[labels] must be a table of name = { system, code, display }", source=source)
    out = {}
    for name, value in raw.items():
        where = f"label {name!r}"
        _only(value, ("system", "code", "display"), where, source, None)
        system, code, display = value.get("system"), value.get("code"), value.get("display")
        if not (isinstance(system, str) and system and isinstance(code, str) and code):
            raise PolicyError(f"{where} needs a system and a code", source=source)
        if display is not None and not isinstance(display, str):
            raise PolicyError(f"{where}: display must be a string", source=source)
        out[name] = Coding(system, code, display)
    return out


def _labels(raw: Any, table: dict[str, Coding], source: str, rule: str | None) -> tuple[Coding, ...]:
    raw = [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise PolicyError("labels must be a list of label names or system|code strings", source=source, rule=rule)
    out = []
    for value in raw:
        if value in table:
            out.append(table[value])
        elif "|" in value:
            out.append(_coding(value, "label", source, rule))
        else:
            raise PolicyError(f"label {value!r} is not defined in [labels] (and is not system|code)",
                              source=source, rule=rule)
    return tuple(dict.fromkeys(out))


def _decision(raw: Any, source: str, rule: str | None) -> Decision:
    try:
        return Decision(raw)
    except ValueError:
        raise PolicyError(f"decision must be release, withhold or qualify, not {raw!r}", source=source, rule=rule) from None


def _outcome(raw: dict[str, Any], rid: str, labels: dict[str, Coding], source: str, where: str | None) -> Outcome:
    decision = _decision(raw.get("decision"), source, where)
    codings = _labels(raw.get("labels", []), labels, source, where)
    if decision is Decision.QUALIFY and not codings:
        raise PolicyError("decision qualify needs labels (the security labels to add)", source=source, rule=where)
    if decision is not Decision.QUALIFY and codings:
        raise PolicyError(f"labels are only added by decision = qualify, not {decision.value}", source=source, rule=where)
    review = raw.get("review", False)
    reason = raw.get("reason", "")
    if not isinstance(review, bool):
        raise PolicyError("review must be true or false", source=source, rule=where)
    if not isinstance(reason, str):
        raise PolicyError("reason must be a string", source=source, rule=where)
    return Outcome(decision, rid, codings, review, reason)


def _rule(raw: Any, n: int, sets: dict[str, tuple[str, ...]], labels: dict[str, Coding], source: str) -> Rule:
    rid = raw.get("id") if isinstance(raw, dict) else None
    where = f"{rid!r} (#{n})" if isinstance(rid, str) else f"#{n}"
    _only(raw, RULE_KEYS, "the rule", source, where)
    if not isinstance(rid, str) or not RULE_ID_RE.match(rid):
        raise PolicyError("id is required: 1-64 letters, digits, '.', '_' or '-'", source=source, rule=where)
    if rid in RESERVED_RULE_IDS:
        raise PolicyError(f"id {rid!r} is reserved for the engine ({', '.join(sorted(RESERVED_RULE_IDS))})",
                          source=source, rule=where)
    if not isinstance(raw.get("description", ""), str):
        raise PolicyError("description must be a string", source=source, rule=where)
    outcome = _outcome(raw, rid, labels, source, where)
    when = _conditions(raw.get("when", {}), "when", sets, source, where)
    unless = _conditions(raw["unless"], "unless", sets, source, where) if "unless" in raw else None
    return Rule(rid, outcome, when, unless)


def _conditions(raw: Any, part: str, sets: dict[str, tuple[str, ...]], source: str, where: str) -> Conditions:
    _only(raw, CONDITION_KEYS, part, source, where)
    request: list[tuple[str, frozenset[str]]] = []
    values: dict[str, frozenset[Any]] = {}
    for key, value in raw.items():
        what = f"{part}.{key}"
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
            raise PolicyError(f"{what} must be a string or a non-empty list of strings", source=source, rule=where)
        expanded: list[str] = []
        for item in items:
            if item.startswith("@"):
                if item[1:] not in sets:
                    raise PolicyError(f"{what}: set {item[1:]!r} is not defined in [sets]", source=source, rule=where)
                expanded.extend(sets[item[1:]])
            else:
                expanded.append(item)
        values[key] = _check_values(key, expanded, what, source, where)
    for key, attr in REQUEST_KEYS.items():
        if key in values:
            request.append((attr, values[key]))
    return Conditions(
        request=tuple(request),
        types=values.get("type"),
        labels=values.get("label"),
        codes=values.get("code"),
        providers=values.get("provider"),
        consent=values.get("consent"),
    )


def _check_values(key: str, values: list[str], what: str, source: str, where: str) -> frozenset[Any]:
    if key == "type":
        unknown = sorted(set(values) - r4_resource_types())
        if unknown:
            raise PolicyError(f"{what}: not FHIR R4 resource types: {', '.join(unknown)}", source=source, rule=where)
    elif key in ("label", "code"):
        return frozenset(_coding(v, what, source, where).key for v in values)
    elif key == "consent":
        wrong = sorted(set(values) - set(CONSENT_VALUES))
        if wrong:
            raise PolicyError(f"{what}: {', '.join(wrong)} is not one of deny, permit, none", source=source, rule=where)
    elif key == "purpose":
        wrong = sorted(set(values) - _purposes())
        if wrong:
            raise PolicyError(
                f"{what}: {', '.join(wrong)} is not a purpose-of-use code a token can carry; known: "
                + ", ".join(sorted(_purposes())),
                source=source, rule=where,
            )
    return frozenset(values)


def _default(raw: Any, labels: dict[str, Coding], source: str) -> Outcome:
    _only(raw, DEFAULT_KEYS, "[default]", source, None)
    if not raw:
        return Outcome(Decision.RELEASE, RULE_DEFAULT)
    return _outcome({"decision": "release", **raw}, RULE_DEFAULT, labels, source, "[default]")
