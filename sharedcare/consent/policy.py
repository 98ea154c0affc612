"""Regional release policies in force: loaded, compiled once, reloadable, cached per request.

The file format is described in the package docstring (:mod:`sharedcare.consent`) and read
by :mod:`sharedcare.consent.policy_file`, which refuses a bad file as a whole, naming the
rule at fault, so :meth:`PolicySet.reload` can keep the policy in force when new text fails.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Final, Protocol

import orjson
import structlog

from sharedcare.consent.dates import FAR_FUTURE, FAR_PAST
from sharedcare.consent.decider import Decider, Entry, RequestRules, ResourceRule
from sharedcare.consent.model import Outcome, RequestContext
from sharedcare.consent.policy_file import DEFAULT_POLICY_FILE, PolicyError, Rule, read_policy
from sharedcare.consent.records import EMPTY, ConsentSet, compile_consents, time_boundaries

log = structlog.get_logger("sharedcare.consent")

MAX_CACHED_CONTEXTS: Final = 4096
MAX_CACHED_PEOPLE: Final = 4096
PERSON_TTL: Final = timedelta(minutes=5)


@dataclass(frozen=True)
class Policy:
    """One compiled policy file (immutable, but for its cache of per-context rule lists)."""

    version: str
    description: str
    digest: str  # sha256 of the file text: what the audit records besides the version
    source: str
    rules: tuple[Rule, ...]
    default: Outcome
    _by_context: OrderedDict[tuple[Any, ...], RequestRules] = field(default_factory=OrderedDict, compare=False, repr=False)
    _by_person: OrderedDict[tuple[Any, ...], PersonState] = field(default_factory=OrderedDict, compare=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def for_request(self, ctx: RequestContext) -> RequestRules:
        """The rules whose request conditions hold for ``ctx`` (cached per role/org/purpose/client)."""
        key = (ctx.user_role, ctx.organization, ctx.purpose, ctx.client_id)
        cached = self._by_context
        found = cached.get(key)
        if found is None:
            found = self._compile_for(ctx)
            with self._lock:
                cached[key] = found
                while len(cached) > MAX_CACHED_CONTEXTS:
                    cached.popitem(last=False)
        return found

    def decider(self, ctx: RequestContext, consents: Sequence[dict[str, Any]], at: datetime) -> Decider:
        rules = self.for_request(ctx)
        if not consents:
            return Decider(ctx, rules, EMPTY, self.version)
        # A person's records are read again for every query of a record being viewed (about
        # 10 per record opened): the compiled records and their memo are kept per (records'
        # exact JSON, context) while no period or dateTime boundary passes.
        try:
            key = (ctx.user_role, ctx.organization, ctx.purpose, ctx.client_id, *map(orjson.dumps, consents))
        except TypeError:
            return Decider(ctx, rules, compile_consents(consents, ctx, at), self.version)
        state = self._by_person.get(key)
        if state is None or not state.valid_from <= at < state.valid_until:
            state = PersonState.compile(consents, ctx, at)
            with self._lock:
                self._by_person[key] = state
                while len(self._by_person) > MAX_CACHED_PEOPLE:
                    self._by_person.popitem(last=False)  # oldest first: no pause to free thousands
        return Decider(ctx, rules, state.consents, self.version, state.memo)

    def _compile_for(self, ctx: RequestContext) -> RequestRules:
        kept: list[ResourceRule] = []
        for rule in self.rules:
            if not rule.when.request_holds(ctx):
                continue
            unless = rule.unless
            if unless is not None:
                if not unless.request_holds(ctx):
                    unless = None  # the exception cannot hold for this request
                elif not unless.has_resource_part:
                    continue  # the exception holds for every resource: the rule never applies
                else:
                    unless = unless.resource_part()
            kept.append(ResourceRule(rule.outcome, rule.when.resource_part(), unless, rule.overrides_consent))
        conds = [c for r in kept for c in (r.when, r.unless) if c is not None]
        return RequestRules(
            rules=tuple(kept),
            default=self.default,
            labels=frozenset(k for c in conds if c.labels for k in c.labels),
            codes=frozenset(k for c in conds if c.codes for k in c.codes),
            uses_providers=any(c.providers is not None for c in conds),
        )


@dataclass(frozen=True)
class PersonState:
    """A person's compiled records for one context, valid in ``[valid_from, valid_until)``."""

    consents: ConsentSet
    memo: dict[tuple[Any, ...], Entry]
    valid_from: datetime
    valid_until: datetime

    @classmethod
    def compile(cls, consents: Sequence[dict[str, Any]], ctx: RequestContext, at: datetime) -> PersonState:
        bounds = time_boundaries(consents)
        start = max((b for b in bounds if b <= at), default=FAR_PAST)
        end = min((b for b in bounds if b > at), default=FAR_FUTURE)
        end = min(end, at + PERSON_TTL)  # belt and braces: recompile now and then regardless
        return cls(compile_consents(consents, ctx, at), {}, start, end)


# -- sources -----------------------------------------------------------------------------------
class PolicySource(Protocol):
    """Where policy text comes from (STYLE §10: the shipped default is one such source)."""

    @property
    def name(self) -> str: ...

    def read(self) -> str: ...


@dataclass(frozen=True)
class FileSource:
    path: Path

    @property
    def name(self) -> str:
        return str(self.path)

    def read(self) -> str:
        try:
            return self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyError(f"cannot read the policy file: {exc}", source=self.name) from None


@dataclass(frozen=True)
class PackageSource:
    """A policy file shipped inside :mod:`sharedcare.consent`."""

    filename: str = DEFAULT_POLICY_FILE

    @property
    def name(self) -> str:
        return f"sharedcare.consent/{self.filename}"

    def read(self) -> str:
        return resources.files(__package__).joinpath(self.filename).read_text(encoding="utf-8")


@dataclass(frozen=True)
class TextSource:
    text: str
    name: str = "<text>"

    def read(self) -> str:
        return self.text


class PolicySet:
    """The policy in force, reloadable; hands out :class:`Decider` objects per request.

    Deciders keep the policy they were made with, so a reload never changes a decision
    half-way through one response.
    """

    def __init__(self, source: PolicySource):
        self.source = source
        self._policy = parse_policy(source.read(), source.name)

    @classmethod
    def load(cls, path: str | Path) -> PolicySet:
        """The policy in the TOML file at ``path``; PolicyError when it is not usable."""
        return cls(FileSource(Path(path)))

    @classmethod
    def default(cls) -> PolicySet:
        """The policy shipped with sharedcare (``sharedcare/consent/default-policy.toml``)."""
        return cls(PackageSource())

    @classmethod
    def from_text(cls, text: str, name: str = "<text>") -> PolicySet:
        return cls(TextSource(text, name))

    @property
    def policy(self) -> Policy:
        return self._policy

    @property
    def version(self) -> str:
        return self._policy.version

    @property
    def digest(self) -> str:
        return self._policy.digest

    def reload(self) -> Policy:
        """Read the source again and put it in force; on PolicyError keep the current policy."""
        from sharedcare.consent.metrics import record_reload

        try:
            policy = parse_policy(self.source.read(), self.source.name)
        except PolicyError as exc:
            record_reload(ok=False)
            log.error("consent policy reload failed; previous policy stays in force",
                      error=str(exc), source=self.source.name, version=self._policy.version)
            raise
        old, self._policy = self._policy, policy
        record_reload(ok=True)
        log.info("consent policy reloaded", source=self.source.name, version=policy.version,
                 previous=old.version, digest=policy.digest[:12])
        return policy

    def decider(
        self, ctx: RequestContext, consents: Sequence[dict[str, Any]] = (), *, now: datetime | None = None
    ) -> Decider:
        """Everything per-request done once: the rules for this user and purpose, the
        person's consent records in force at ``now`` (default: the current time; a naive
        datetime is taken as UTC, as the store keeps them)."""
        at = datetime.now(UTC) if now is None else now if now.tzinfo else now.replace(tzinfo=UTC)
        return self._policy.decider(ctx, consents, at)



def parse_policy(text: str, source: str = "<text>") -> Policy:
    """Parse and check policy TOML into a :class:`Policy`; PolicyError names the problem."""
    parsed = read_policy(text, source)
    return Policy(parsed.version, parsed.description, parsed.digest, source, parsed.rules, parsed.default)
