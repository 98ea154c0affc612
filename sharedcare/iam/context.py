"""The end-user context of a request: who asks, for which organisation, and why.

A client states it in its assertion with three claims (REQUIREMENTS §3), which the hub
copies into the access token and hands to every handler as one :class:`AccessContext`:

- ``requesting_user``: ``{"id": "...", "name": "...", "role": "..."}``, the person using the
  consumer system; ``role`` is their professional role code (e.g. the NHS national RBAC
  role code ``R8000``).
- ``requesting_organization``: the ODS code of the organisation the user works for.
- ``reason_for_access``: a purpose-of-use code from
  http://terminology.hl7.org/CodeSystem/v3-ActReason (``TREAT``, ``ETREAT``, ...).

All three or none: a system-only token (no person involved) may read directory data but
never patient data.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import HTTPConnection

from sharedcare.fhir.errors import FHIRError
from sharedcare.iam.scopes import Grants

PURPOSE_OF_USE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActReason"
# The PurposeOfUse codes (hl7.org/fhir/R4/v3/PurposeOfUse/vs.html) a care record hub meets.
PURPOSES_OF_USE = frozenset(
    {
        "TREAT", "ETREAT", "BTG", "CAREMGT", "COC", "CLINTRCH", "HRESCH", "HOPERAT",
        "HQUALIMP", "HSYSADMIN", "HPAYMT", "PUBHLTH", "POPHLTH", "PATRQT", "FAMRQT",
        "PWATRNY", "HLEGAL",
    }
)
CLAIM_NAMES = ("requesting_user", "requesting_organization", "reason_for_access")
_CODE_RE = re.compile(r"^[A-Za-z0-9._:|/-]{1,64}$")


class ContextError(ValueError):
    """The end-user claims are present but malformed."""


@dataclass(frozen=True, slots=True)
class RequestingUser:
    """The person using the consumer system."""

    id: str
    name: str
    role: str

    def to_claim(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name, "role": self.role}


@dataclass(frozen=True, slots=True)
class EndUser:
    """The three end-user claims, validated."""

    user: RequestingUser
    organization: str
    reason: str

    def to_claims(self) -> dict[str, Any]:
        return {
            "requesting_user": self.user.to_claim(),
            "requesting_organization": self.organization,
            "reason_for_access": self.reason,
        }


@dataclass(frozen=True, slots=True)
class AccessContext:
    """Everything the hub knows about the caller of one request."""

    client_id: str
    participant_organization: str | None
    scopes: tuple[str, ...]
    requesting_user: RequestingUser | None
    requesting_organization: str | None
    reason_for_access: str | None
    jti: str
    expires_at: int
    grants: Grants = field(repr=False, compare=False, default_factory=Grants)

    @property
    def has_end_user(self) -> bool:
        return self.requesting_user is not None


def _text(value: Any, name: str, limit: int, *, code: bool = False) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > limit:
        raise ContextError(f"{name} must be a non-empty string of at most {limit} characters")
    if code and not _CODE_RE.match(value):
        raise ContextError(f"{name} must be a code ([A-Za-z0-9._:|/-], at most 64 characters)")
    return value


def parse_end_user(claims: dict[str, Any]) -> EndUser | None:
    """The end-user context in ``claims``, None when absent; ContextError when malformed."""
    present = [name for name in CLAIM_NAMES if claims.get(name) is not None]
    if not present:
        return None
    if len(present) != len(CLAIM_NAMES):
        missing = ", ".join(n for n in CLAIM_NAMES if n not in present)
        raise ContextError(f"end-user context is incomplete: {missing} missing")
    raw_user = claims["requesting_user"]
    if not isinstance(raw_user, dict):
        raise ContextError("requesting_user must be an object with id, name and role")
    user = RequestingUser(
        id=_text(raw_user.get("id"), "requesting_user.id", 128, code=True),
        name=_text(raw_user.get("name"), "requesting_user.name", 200),
        role=_text(raw_user.get("role"), "requesting_user.role", 64, code=True),
    )
    organization = _text(claims["requesting_organization"], "requesting_organization", 64, code=True)
    reason = claims["reason_for_access"]
    if reason not in PURPOSES_OF_USE:
        raise ContextError(
            f"reason_for_access must be a purpose-of-use code ({PURPOSE_OF_USE_SYSTEM}): "
            + ", ".join(sorted(PURPOSES_OF_USE))
        )
    return EndUser(user, organization, reason)


def context_from_claims(claims: dict[str, Any]) -> AccessContext:
    """Rebuild the context from a verified access token's claims."""
    scopes = tuple(str(claims.get("scope", "")).split())
    raw_user = claims.get("requesting_user")
    user = RequestingUser(**raw_user) if isinstance(raw_user, dict) else None
    return AccessContext(
        client_id=str(claims["client_id"]),
        participant_organization=claims.get("participant_organization"),
        scopes=scopes,
        requesting_user=user,
        requesting_organization=claims.get("requesting_organization"),
        reason_for_access=claims.get("reason_for_access"),
        jti=str(claims["jti"]),
        expires_at=int(claims["exp"]),
        grants=Grants.of(scopes),
    )


def access(request: HTTPConnection) -> AccessContext:
    """The caller's context, put there by :class:`sharedcare.iam.middleware.AuthMiddleware`."""
    context = request.scope.get("state", {}).get("access")
    if not isinstance(context, AccessContext):
        raise FHIRError.of(401, "login", "This request carries no verified access token.")
    return context
