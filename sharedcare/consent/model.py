"""The plain values of a consent decision: who asks, what was decided, and why.

Code systems are the HL7 terminology ones (terminology.hl7.org) unless the hub defines its
own under ``https://sharedcare.example.org/fhir/CodeSystem/``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, Final

from sharedcare.consent.notice import withheld_outcome

if TYPE_CHECKING:
    from sharedcare.iam.context import AccessContext

V3_ACT_CODE: Final = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
V3_CONFIDENTIALITY: Final = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
V3_ACT_REASON: Final = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
V3_PARTICIPATION_TYPE: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
CONSENT_SCOPE: Final = "http://terminology.hl7.org/CodeSystem/consentscope"
CONSENT_ACTION: Final = "http://terminology.hl7.org/CodeSystem/consentaction"
RESOURCE_TYPES: Final = "http://hl7.org/fhir/resource-types"
HUB_CODESYSTEM: Final = "https://sharedcare.example.org/fhir/CodeSystem"
ISSUE_SYSTEM: Final = f"{HUB_CODESYSTEM}/issue"
CONSENT_LABEL_SYSTEM: Final = f"{HUB_CODESYSTEM}/consent-label"

# Rule ids the engine itself uses; a policy file may not define rules with these ids.
RULE_CONSENT: Final = "consent"  # the person's consent denies the resource and no rule overrides it
RULE_DEFAULT: Final = "default"  # no rule applied: the policy's [default] decision
RULE_MALFORMED: Final = "malformed"  # not a readable FHIR resource: withheld, never guessed at
RESERVED_RULE_IDS: Final = frozenset({RULE_CONSENT, RULE_DEFAULT, RULE_MALFORMED})


class Decision(Enum):
    """What happens to one resource on its way out of the platform."""

    RELEASE = "release"
    WITHHOLD = "withhold"
    QUALIFY = "qualify"  # released, carrying security labels that say how it may be used

    # Members are singletons compared by identity; Enum's own __hash__ is Python code, and
    # decisions are hashed on the per-resource path (metric tallies, outcome memos).
    __hash__ = object.__hash__


@dataclass(frozen=True, slots=True)
class Coding:
    """A FHIR Coding, as a hashable value (used for security labels)."""

    system: str
    code: str
    display: str | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.system, self.code)

    def to_fhir(self) -> dict[str, str]:
        out = {"system": self.system, "code": self.code}
        if self.display:
            out["display"] = self.display
        return out


@dataclass(frozen=True, slots=True)
class Provider:
    """A data provider known by several names (client id, ODS code, Organization id).

    Consent records name providers in whichever form their author had to hand, so a match
    on any alias counts. A plain string wherever a provider is expected is one alias.
    """

    aliases: frozenset[str]

    @classmethod
    def of(cls, *names: str | None) -> Provider:
        return cls(frozenset(n for n in names if n))


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who is asking, for which organisation and why; fixed for one request.

    ``provider`` is the source of the resources being released when it is the same for the
    whole request (a proxied read from one provider); ``Decider.decide`` takes a provider
    per resource otherwise.
    """

    client_id: str
    user_role: str | None = None
    organization: str | None = None
    purpose: str | None = None
    provider: str | Provider | None = None

    @classmethod
    def from_access(cls, access: AccessContext, provider: str | Provider | None = None) -> RequestContext:
        """The decision context of a request authorised by an access token."""
        user = access.requesting_user
        return cls(
            client_id=access.client_id,
            user_role=user.role if user else None,
            organization=access.requesting_organization,
            purpose=access.reason_for_access,
            provider=provider,
        )


@dataclass(frozen=True, slots=True)
class Outcome:
    """The decision on one resource, the rule that made it, and what the audit should know."""

    decision: Decision
    rule: str
    labels: tuple[Coding, ...] = ()
    review: bool = False
    reason: str = ""

    @property
    def released(self) -> bool:
        return self.decision is not Decision.WITHHOLD


@dataclass(slots=True)
class Filtered:
    """What :meth:`Decider.filter` lets out, and what it kept back.

    ``released`` holds the input dicts themselves, except that a qualified resource is a
    copy carrying the extra labels in ``meta.security`` (inputs are never mutated).
    ``reviewed`` names released resources whose release must be reviewed (e.g. an emergency
    override of an opt-out), with the outcome that says why.
    """

    released: list[dict[str, Any]] = field(default_factory=list)
    withheld: int = 0
    qualified: int = 0
    reviewed: list[tuple[str, Outcome]] = field(default_factory=list)

    @property
    def review(self) -> bool:
        return bool(self.reviewed)

    def notice(self) -> dict[str, Any] | None:
        """An OperationOutcome telling the consumer that data was withheld, or None."""
        return withheld_outcome(self.withheld) if self.withheld else None
