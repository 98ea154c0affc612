"""A person's consent records, compiled for one request (hl7.org/fhir/R4/consent.html).

Reading of R4 Consent (patient-privacy scope), as applied here:

* A record counts while ``status`` is ``active``, its ``dateTime`` has come, and ``now`` is
  inside the root ``provision.period`` (the record's validity period).
* ``policyRule`` is the base policy: ``OPTOUT``/``OPTOUTE`` deny sharing, ``OPTIN``/``OPTINR``
  permit it (v3-ActCode ActConsentDirective codes).
* The root provision is an exception to that base: when its criteria hold, its ``type``
  (or, without one, the base) applies; otherwise the base does. Nested provisions are
  exceptions to their parent, each with its own ``type``; among matching siblings deny wins.
* Criteria in one provision are AND-ed, values within one criterion OR-ed: ``period`` (when
  the rule applies), ``purpose`` (the request's purpose of use), ``action`` (only access,
  disclose and use concern release), ``actor`` (recipient roles IRCP/PRCP/... match the
  requesting organisation or client; custodian/author roles CST/AUT/... match the resource's
  source provider; no role matches either), ``securityLabel``, ``class`` (resource types),
  ``code`` and ``data`` (``meaning = instance`` references).
* Criteria the engine cannot evaluate (``dataPeriod``, ``data`` with another meaning,
  ``class`` outside http://hl7.org/fhir/resource-types, an actor without a usable reference,
  an unknown source provider) fail closed: a deny provision is taken to match, a permit
  provision is taken not to. A record that cannot be read at all counts as a full opt-out.
* Across records, deny wins: one record denying a resource withholds it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sharedcare.consent.dates import DateError, date_range, period_span
from sharedcare.consent.features import Key
from sharedcare.consent.model import (
    CONSENT_SCOPE,
    RESOURCE_TYPES,
    V3_ACT_CODE,
    Provider,
    RequestContext,
)

DENY: Final = "deny"
PERMIT: Final = "permit"
POLICY_RULE_BASE: Final = {"OPTIN": PERMIT, "OPTINR": PERMIT, "OPTOUT": DENY, "OPTOUTE": DENY}
RELEASE_ACTIONS: Final = frozenset({"access", "disclose", "use"})
# v3 ParticipationType / RoleClass codes: who receives the data vs who holds or wrote it.
RECIPIENT_ROLES: Final = frozenset({"IRCP", "PRCP", "REFT", "TRC", "NOT", "CALLBCK", "DELEGATEE"})
SOURCE_ROLES: Final = frozenset({"CST", "AUT", "INF", "ENT", "PRF", "PPRF", "SPRF", "RESP", "AUTHEN", "LA"})
MAX_DEPTH: Final = 8

# (type, relevant labels, relevant codes, source provider aliases or None, "Type/id" or None)
Features = tuple[str, tuple[Key, ...], tuple[Key, ...], frozenset[str] | None, str | None]


class ConsentRecordError(ValueError):
    """A consent record that cannot be interpreted."""

    def __init__(self, message: str, expression: str | None = None):
        super().__init__(message)
        self.expression = expression


@dataclass(frozen=True, slots=True)
class Node:
    """One provision after the request-level criteria held; resource-level ones remain."""

    effect: str
    types: frozenset[str] | None = None
    labels: frozenset[Key] | None = None
    codes: frozenset[Key] | None = None
    data: frozenset[str] | None = None
    sources: frozenset[str] | None = None
    children: tuple[Node, ...] = ()

    def matches(self, f: Features) -> bool:
        if self.types is not None and f[0] not in self.types:
            return False
        if self.labels is not None and self.labels.isdisjoint(f[1]):
            return False
        if self.codes is not None and self.codes.isdisjoint(f[2]):
            return False
        if self.data is not None and f[4] not in self.data:
            return False
        if self.sources is not None:
            if f[3] is None:  # source unknown: fail closed
                return self.effect == DENY
            if self.sources.isdisjoint(f[3]):
                return False
        return True

    def refine(self, f: Features) -> str:
        """This node's effect, or the effect of the exceptions below it that match."""
        found = [c.refine(f) for c in self.children if c.matches(f)]
        if DENY in found:
            return DENY
        return PERMIT if found else self.effect

    def walk(self) -> Iterable[Node]:
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True, slots=True)
class Record:
    """One consent record in force for this request."""

    ref: str
    policy: str
    base: str | None
    root: Node | None  # None: no provision, or its request-level criteria do not hold
    problem: str | None = None  # set when unreadable: the record then denies everything

    def effect(self, f: Features) -> str | None:
        if self.problem is not None:
            return DENY
        if self.root is not None and self.root.matches(f):
            return self.root.refine(f)
        return self.base


@dataclass(frozen=True, slots=True)
class ConsentSet:
    """The person's records in force for one request, and what of a resource they look at."""

    records: tuple[Record, ...]
    labels: frozenset[Key]
    codes: frozenset[Key]
    uses_sources: bool
    uses_data: bool

    def evaluate(self, f: Features) -> tuple[str | None, Record | None]:
        """(``deny`` | ``permit`` | None, the deciding record)."""
        permit: Record | None = None
        for record in self.records:
            effect = record.effect(f)
            if effect == DENY:
                return DENY, record
            if effect == PERMIT and permit is None:
                permit = record
        return (PERMIT, permit) if permit is not None else (None, None)


EMPTY: Final = ConsentSet((), frozenset(), frozenset(), False, False)


def compile_consents(consents: Sequence[dict[str, Any]], ctx: RequestContext, now: datetime) -> ConsentSet:
    """The records among ``consents`` in force at ``now``, pruned by the request's context."""
    if not consents:
        return EMPTY
    records = []
    for raw in consents:
        try:
            record = compile_record(raw, ctx, now)
        except (ConsentRecordError, DateError, TypeError, AttributeError, KeyError) as exc:
            ref = _ref(raw)
            record = Record(ref, "?", DENY, None, problem=f"{ref} could not be read ({exc})")
        if record is not None:
            records.append(record)
    nodes = [n for r in records if r.root is not None for n in r.root.walk()]
    return ConsentSet(
        tuple(records),
        labels=frozenset(k for n in nodes if n.labels for k in n.labels),
        codes=frozenset(k for n in nodes if n.codes for k in n.codes),
        uses_sources=any(n.sources is not None for n in nodes),
        uses_data=any(n.data is not None for n in nodes),
    )


def time_boundaries(consents: Sequence[dict[str, Any]]) -> list[datetime]:
    """Instants at which the records' reading could change (dateTime, provision periods).

    Between two consecutive boundaries, :func:`compile_consents` gives the same result for
    the same context, so a compiled set can be reused there.
    """
    out: list[datetime] = []

    def walk(p: Any, depth: int) -> None:
        if not isinstance(p, dict) or depth > MAX_DEPTH:
            return
        period = p.get("period")
        if isinstance(period, dict):
            for bound, side in (("start", 0), ("end", 1)):
                try:
                    out.append(date_range(period.get(bound))[side])
                except DateError:
                    pass
        for child in p.get("provision") or ():
            walk(child, depth + 1)

    for raw in consents:
        if not isinstance(raw, dict):
            continue
        try:
            out.append(date_range(raw.get("dateTime"))[0])
        except DateError:
            pass
        walk(raw.get("provision"), 0)
    return out


def _ref(raw: Any) -> str:
    rid = raw.get("id") if isinstance(raw, dict) else None
    return f"Consent/{rid}" if isinstance(rid, str) else "Consent/<no id>"


def is_privacy_consent(raw: dict[str, Any]) -> bool:
    return any(
        c.get("system") == CONSENT_SCOPE and c.get("code") == "patient-privacy"
        for c in (raw.get("scope") or {}).get("coding") or ()
    )


def policy_rule(raw: dict[str, Any]) -> str | None:
    """The ActConsentDirective code of ``policyRule`` (None when absent)."""
    codings = (raw.get("policyRule") or {}).get("coding") or ()
    codes = [c.get("code") for c in codings if c.get("system") == V3_ACT_CODE]
    return codes[0] if codes else None


def compile_record(raw: dict[str, Any], ctx: RequestContext, now: datetime) -> Record | None:
    """The record as it applies to this request; None when it is not in force."""
    if raw.get("resourceType") != "Consent" or raw.get("status") != "active":
        return None
    if not is_privacy_consent(raw):
        return None
    if raw.get("dateTime") is not None and date_range(raw["dateTime"])[0] > now:
        return None  # recorded for the future: not yet in force
    ref = _ref(raw)
    rule = policy_rule(raw)
    root = raw.get("provision")
    if rule is None and not (isinstance(root, dict) and root.get("type") in (DENY, PERMIT)):
        raise ConsentRecordError("no policyRule and no root provision.type: no base decision")
    if rule is not None and rule not in POLICY_RULE_BASE:
        raise ConsentRecordError(f"unknown policyRule {rule!r}")
    base = POLICY_RULE_BASE.get(rule) if rule else None
    if root is None:
        return Record(ref, rule or "-", base, None)
    if root.get("period") is not None and now not in period_span(root["period"]):
        return None  # outside the record's validity period
    node = _node(root, base or PERMIT, ctx, now, depth=0, root=True)
    return Record(ref, rule or "-", base, node)


def _codes(concepts: Any) -> list[tuple[str | None, str]]:
    """(system, code) of every coding in a list of CodeableConcepts."""
    return [(c.get("system"), c["code"]) for cc in concepts or () for c in cc.get("coding") or ()]


def _node(p: dict[str, Any], inherited: str, ctx: RequestContext, now: datetime, *, depth: int, root: bool = False) -> Node | None:
    """Compile one provision; None when its request-level criteria cannot hold."""
    if depth > MAX_DEPTH:
        raise ConsentRecordError(f"provisions nested deeper than {MAX_DEPTH} levels")
    kind = p.get("type")
    if kind is not None and kind not in (DENY, PERMIT):
        raise ConsentRecordError(f"provision.type {kind!r} is neither deny nor permit")
    effect = kind or inherited
    deny = effect == DENY
    # -- request-level criteria: decided now, once per request
    if not root and p.get("period") is not None and now not in period_span(p["period"]):
        return None
    purposes = {c["code"] for c in p.get("purpose") or ()}  # Coding, not CodeableConcept
    if purposes and ctx.purpose not in purposes:
        return None
    actions = {code for _s, code in _codes(p.get("action"))}
    if actions and actions.isdisjoint(RELEASE_ACTIONS):
        return None
    sources: frozenset[str] | None = None
    if p.get("actor"):
        satisfied, source_keys = _actors(p["actor"], ctx, deny)
        if not satisfied:
            if not source_keys:
                return None
            sources = frozenset(source_keys)
    if p.get("dataPeriod") is not None and not deny:
        return None  # not evaluated: a permit never stretches over it
    # -- resource-level criteria: kept for the per-resource check
    types: frozenset[str] | None = None
    if p.get("class"):
        known = {c["code"] for c in p["class"] if c.get("system") in (RESOURCE_TYPES, None)}
        if len(known) < len(p["class"]) and deny:
            types = None  # an unknown class could be anything: the deny covers all
        elif not known:
            return None
        else:
            types = frozenset(known)
    labels = frozenset((c.get("system"), c["code"]) for c in p.get("securityLabel") or ()) or None
    codes = frozenset(_codes(p.get("code"))) or None
    data: frozenset[str] | None = None
    if p.get("data"):
        refs = {d["reference"]["reference"] for d in p["data"] if d.get("meaning") == "instance" and (d.get("reference") or {}).get("reference")}
        if len(refs) < len(p["data"]) and deny:
            data = None
        elif not refs:
            return None
        else:
            data = frozenset(_tail(r, keep_type=True) for r in refs)
    children = tuple(
        n for child in p.get("provision") or () if (n := _node(child, effect, ctx, now, depth=depth + 1)) is not None
    )
    return Node(effect, types, labels, codes, data, sources, children)


def _tail(reference: str, *, keep_type: bool = False) -> str:
    """``Type/id`` (or ``id``) of a relative or absolute literal reference."""
    parts = reference.rstrip("/").split("/")
    if "_history" in parts:
        parts = parts[: parts.index("_history")]
    return "/".join(parts[-2:]) if keep_type else parts[-1]


def _actors(actors: list[dict[str, Any]], ctx: RequestContext, deny: bool) -> tuple[bool, set[str]]:
    """(the request's recipient matches an actor, aliases of source-provider actors)."""
    recipient = {ctx.organization, ctx.client_id} - {None}
    sources: set[str] = set()
    for actor in actors:
        roles = {c.get("code") for c in (actor.get("role") or {}).get("coding") or ()} - {None}
        ref = actor.get("reference") or {}
        keys = set()
        if isinstance(ref.get("reference"), str) and ref["reference"]:
            keys.add(_tail(ref["reference"]))
        value = (ref.get("identifier") or {}).get("value")
        if isinstance(value, str) and value:
            keys.add(value)
        if not keys:
            if deny:
                return True, set()  # an actor nobody can resolve: the deny covers everyone
            continue
        as_recipient = not roles or bool(roles & RECIPIENT_ROLES) or not roles & SOURCE_ROLES
        as_source = not roles or bool(roles & SOURCE_ROLES) or not roles & RECIPIENT_ROLES
        if as_recipient and keys & recipient:
            return True, set()
        if as_source:
            sources |= keys
    return False, sources


def provider_aliases(provider: str | Provider | None) -> frozenset[str] | None:
    if provider is None:
        return None
    if isinstance(provider, Provider):
        return provider.aliases
    return frozenset((provider,))
