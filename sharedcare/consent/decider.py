"""The per-request decision function: a few dict and set lookups per resource.

:meth:`PolicySet.decider` does the per-request work once: it keeps only the rules whose
request conditions (role, organisation, purpose, client) hold, compiles the person's
consent records in force, and collects the few labels and codes any of them look at. Per
resource, :meth:`Decider.decide` then reads just those features (type, relevant
``meta.security`` labels, relevant codes, source provider) into a key, and looks the key up
in a memo of outcomes; only a key not seen before walks the rules. A response of 40
resources typically has a handful of distinct keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

from sharedcare.consent.features import Key, Relevant, pick, relevant_index, resource_codes
from sharedcare.consent.model import (
    RULE_CONSENT,
    RULE_MALFORMED,
    Decision,
    Filtered,
    Outcome,
    Provider,
    RequestContext,
)
from sharedcare.consent.records import DENY, ConsentSet, Features, Record, provider_aliases

RELEASE: Final = Decision.RELEASE
WITHHOLD: Final = Decision.WITHHOLD
QUALIFY: Final = Decision.QUALIFY
MALFORMED: Final = Outcome(WITHHOLD, RULE_MALFORMED, reason="not a readable FHIR resource")
CONSENT_DENIED: Final = Outcome(WITHHOLD, RULE_CONSENT, reason="the person's consent denies sharing this resource")
MALFORMED_TYPE: Final = "<malformed>"
MAX_MEMO: Final = 8192


@dataclass(frozen=True, slots=True)
class ResourceRule:
    """A rule reduced to its resource-level conditions for one request context."""

    outcome: Outcome
    when: Any  # policy.Conditions (resource part)
    unless: Any  # policy.Conditions | None
    overrides_consent: bool


class Entry:
    """A memoised outcome with the resource type it was decided for (for metric tallies).

    Hashed by identity, so tallying per entry costs one pointer hash per resource.
    """

    __slots__ = ("outcome", "rtype")

    def __init__(self, outcome: Outcome, rtype: str):
        self.outcome = outcome
        self.rtype = rtype


MALFORMED_ENTRY: Final = Entry(MALFORMED, MALFORMED_TYPE)


@dataclass(frozen=True)
class RequestRules:
    """The rules that can apply for one (role, organisation, purpose, client).

    Policy outcomes depend only on this object, the resource's features and the consent
    effect, so every request with the same context shares them (``outcomes``); people
    without consent records share whole memo entries (``entries``).
    """

    rules: tuple[ResourceRule, ...]
    default: Outcome
    labels: frozenset[Key]
    codes: frozenset[Key]
    uses_providers: bool
    outcomes: dict[tuple[Any, ...], Outcome] = field(default_factory=dict, compare=False, repr=False)
    entries: dict[tuple[Any, ...], Entry] = field(default_factory=dict, compare=False, repr=False)

    @cached_property
    def label_index(self) -> Relevant:
        return relevant_index(self.labels)

    @cached_property
    def code_index(self) -> Relevant:
        return relevant_index(self.codes)

    def evaluate(self, f: Features, consent: str) -> Outcome:
        """The outcome of the first rule that applies, else the consent or the default.

        Overrides and consent denials are not yet personalised with the record's reference
        (that happens per decider, so this result can be shared across people).
        """
        for rule in self.rules:
            if not _holds(rule.when, f, consent):
                continue
            if rule.unless is not None and _holds(rule.unless, f, consent):
                continue
            out = rule.outcome
            if consent == DENY and out.decision is not WITHHOLD:
                if not rule.overrides_consent:
                    continue  # a release rule that does not name consent = "deny" cannot override it
                return Outcome(out.decision, out.rule, out.labels, True,
                               out.reason or f"rule {out.rule} overrode the person's consent")
            return out
        return CONSENT_DENIED if consent == DENY else self.default


def _holds(cond: Any, f: Features, consent: str) -> bool:
    if cond.types is not None and f[0] not in cond.types:
        return False
    if cond.labels is not None and cond.labels.isdisjoint(f[1]):
        return False
    if cond.codes is not None and cond.codes.isdisjoint(f[2]):
        return False
    if cond.providers is not None and (f[3] is None or cond.providers.isdisjoint(f[3])):
        return False
    return cond.consent is None or consent in cond.consent


def with_labels(resource: dict[str, Any], labels: Iterable[Any]) -> dict[str, Any]:
    """A shallow copy of ``resource`` whose ``meta.security`` also holds ``labels`` (Codings)."""
    out = dict(resource)
    meta = resource.get("meta")
    meta = dict(meta) if isinstance(meta, dict) else {}
    security = meta.get("security")
    security = list(security) if isinstance(security, list) else []
    present = {(c.get("system"), c.get("code")) for c in security if isinstance(c, dict)}
    for label in labels:
        if (label.system, label.code) not in present:
            security.append(label.to_fhir())
    meta["security"] = security
    out["meta"] = meta
    return out


class Decider:
    """Decides, for one request, what happens to each resource on its way out."""

    __slots__ = (
        "_codes",
        "_labels",
        "_memo",
        "_provider",
        "_request",
        "_uses_data",
        "_uses_provider",
        "consents",
        "ctx",
        "policy_version",
    )

    def __init__(
        self,
        ctx: RequestContext,
        rules: RequestRules,
        consents: ConsentSet,
        policy_version: str,
        memo: dict[tuple[Any, ...], Entry] | None = None,
    ):
        self.ctx = ctx
        self.policy_version = policy_version
        self.consents = consents
        self._request = rules
        self._labels = rules.label_index if not consents.labels else relevant_index(rules.labels | consents.labels)
        self._codes = rules.code_index if not consents.codes else relevant_index(rules.codes | consents.codes)
        self._uses_provider = rules.uses_providers or consents.uses_sources
        self._uses_data = consents.uses_data
        self._provider = ctx.provider
        if memo is None:
            memo = rules.entries if not consents.records else {}
        self._memo = memo

    @property
    def consent_refs(self) -> tuple[str, ...]:
        """The consent records in force for this request (for the audit record)."""
        return tuple(r.ref for r in self.consents.records)

    def decide(self, resource: dict[str, Any], provider: str | Provider | None = None) -> Outcome:
        """The outcome for one resource; ``provider`` (its source) defaults to the context's."""
        return self._entry(resource, provider).outcome

    def _entry(self, resource: dict[str, Any], provider: str | Provider | None) -> Entry:
        try:
            rtype = resource["resourceType"]
            if rtype.__class__ is not str:
                return MALFORMED_ENTRY
            labels: tuple[Key, ...] = ()
            meta = resource.get("meta")
            if meta:
                security = meta.get("security")
                if security:
                    if security.__class__ is not list:
                        return MALFORMED_ENTRY
                    if self._labels:
                        labels = pick(security, self._labels)
            codes = resource_codes(resource, rtype, self._codes) if self._codes else ()
            source = (provider if provider is not None else self._provider) if self._uses_provider else None
            ref = f"{rtype}/{resource.get('id')}" if self._uses_data else None
        except (KeyError, TypeError, AttributeError):
            return MALFORMED_ENTRY
        key = (rtype, labels, codes, source, ref)
        entry = self._memo.get(key)
        if entry is None:
            entry = Entry(self._evaluate(key, (rtype, labels, codes, provider_aliases(source), ref)), rtype)
            if len(self._memo) >= MAX_MEMO:
                self._memo.clear()
            self._memo[key] = entry
        if "contained" in resource or rtype == "Bundle":
            return self._with_inner(resource, provider, entry)
        return entry

    def _with_inner(self, resource: dict[str, Any], provider: str | Provider | None, outer: Entry) -> Entry:
        """A resource carrying others (``contained``, a Bundle's entries) is released only if
        each of them may be: one withheld inner resource withholds the whole; qualifications
        add up. Not memoised: the outer key does not describe the inner resources."""
        if outer.outcome.decision is WITHHOLD:
            return outer
        inner: list[Any] = []
        try:
            inner.extend(resource.get("contained") or ())
            if outer.rtype == "Bundle":
                inner.extend(e["resource"] for e in resource.get("entry") or () if "resource" in e)
        except (TypeError, AttributeError):
            return Entry(MALFORMED, outer.rtype)
        outcomes = [outer.outcome]
        for item in inner:
            try:
                got = self._entry(item, provider).outcome
            except RecursionError:  # nesting no real resource has: refuse, do not crash
                return Entry(MALFORMED, outer.rtype)
            if got.decision is WITHHOLD:
                reason = f"it carries a resource that is withheld ({got.rule}: {got.reason})"
                return Entry(Outcome(WITHHOLD, got.rule, reason=reason), outer.rtype)
            outcomes.append(got)
        qualifying = [o for o in outcomes if o.decision is QUALIFY]
        if not qualifying:
            return outer if not any(o.review for o in outcomes) else Entry(next(o for o in outcomes if o.review), outer.rtype)
        first = qualifying[0]
        labels = tuple(dict.fromkeys(label for o in qualifying for label in o.labels))
        review = any(o.review for o in outcomes)
        reason = "; ".join(dict.fromkeys(o.reason for o in outcomes if o.reason))
        return Entry(Outcome(QUALIFY, first.rule, labels, review, reason), outer.rtype)

    def _evaluate(self, key: tuple[Any, ...], f: Features) -> Outcome:
        effect, record = self.consents.evaluate(f) if self.consents.records else (None, None)
        consent = effect or "none"
        shared = self._request.outcomes
        out = shared.get((key, consent))
        if out is None:
            out = self._request.evaluate(f, consent)
            if len(shared) >= MAX_MEMO:
                shared.clear()
            shared[(key, consent)] = out
        if (consent == DENY and out.decision is not WITHHOLD) or out is CONSENT_DENIED:
            assert record is not None  # name the record in the audit reason
            reason = _denial(record) if out is CONSENT_DENIED else f"{out.reason} ({record.ref})"
            out = Outcome(out.decision, out.rule, out.labels, out.review, reason)
        return out

    def filter(
        self, resources: Iterable[dict[str, Any]], provider: str | Provider | None = None, *, record: bool = True
    ) -> Filtered:
        """Split ``resources`` into what may leave (qualified ones labelled, as copies) and a
        count of what may not; with ``record``, count the decisions in the metrics."""
        out = Filtered()
        released = out.released
        tally: dict[Entry, int] = {}
        lookup = self._entry
        for resource in resources:
            entry = lookup(resource, provider)
            tally[entry] = tally.get(entry, 0) + 1
            outcome = entry.outcome
            decision = outcome.decision
            if decision is RELEASE:
                released.append(resource)
            elif decision is WITHHOLD:
                out.withheld += 1
            else:
                out.qualified += 1
                released.append(with_labels(resource, outcome.labels))
            if outcome.review:
                out.reviewed.append((f"{entry.rtype}/{resource.get('id')}", outcome))
        if record and tally:
            from sharedcare.consent.metrics import record_decisions

            counts: dict[tuple[str, str, Decision, bool], int] = {}
            for e, n in tally.items():  # distinct entries can share a metric key: add them up
                key = (e.rtype, e.outcome.rule, e.outcome.decision, e.outcome.review)
                counts[key] = counts.get(key, 0) + n
            record_decisions(counts)
        return out


def _denial(record: Record) -> str:
    if record.problem is not None:
        return f"{record.problem}; treated as an opt-out"
    return f"{record.ref} (policyRule {record.policy}) denies sharing this resource"
