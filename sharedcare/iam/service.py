"""Identity and access for one hub process: its collaborators and the token endpoint's logic.

``Iam`` is created with the app and started in its lifespan (STYLE §7); the routes and the
auth middleware receive it explicitly. ``token`` is the token endpoint as a plain function
of the form fields (SMART Backend Services, backend-services.html#obtain-access-token).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import httpx

from sharedcare.fhir.errors import FHIRError
from sharedcare.iam.assertion import CLOCK_SKEW, AssertionVerifier, ClaimRejected
from sharedcare.iam.client import ASSERTION_TYPE
from sharedcare.iam.context import AccessContext
from sharedcare.iam.hubkeys import HubKeys
from sharedcare.iam.jwks import JwksCache
from sharedcare.iam.metrics import record_claim
from sharedcare.iam.ratelimit import RateLimiter
from sharedcare.iam.replay import ReplayGuard
from sharedcare.iam.scopes import grant
from sharedcare.iam.tokens import AccessTokens, TokenInvalid
from sharedcare.registry.service import Registry
from sharedcare.settings import Settings
from sharedcare.store.db import Database
from sharedcare.store.service import FhirService

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}  # RFC 6749 §5.1


@dataclass(slots=True)
class TokenResult:
    """What the token endpoint answers: a status, a JSON object and headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=lambda: dict(NO_STORE))


def oauth_error(error: str, description: str, status: int = 400, **headers: str) -> TokenResult:
    """An RFC 6749 §5.2 error response."""
    return TokenResult(status, {"error": error, "error_description": description}, {**NO_STORE, **headers})


class Suspended(TokenInvalid):
    """A valid token of a system that is no longer active."""


class Iam:
    """Registry, keys, replay guard, rate limiter, token issuer and verifier of a process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.token_url = f"{settings.public_base_url}/oauth2/token"
        self._http: httpx.AsyncClient | None = None

    async def start(self, db: Database, fhir: FhirService) -> None:
        """Build the collaborators on the process's database and store."""
        s = self.settings
        self.registry = Registry(fhir, cache_seconds=s.registry_cache_seconds)
        self._http = httpx.AsyncClient(timeout=httpx.Timeout(5.0), follow_redirects=False)
        self.jwks = JwksCache(self._http)
        self.assertions = AssertionVerifier(self.registry, self.jwks, token_url=self.token_url)
        self.keys = HubKeys(
            db,
            alg=s.hub_key_alg,
            rotation_seconds=int(s.hub_key_rotation_hours * 3600),
            token_lifetime=s.token_lifetime_seconds,
        )
        self.tokens = AccessTokens(
            self.keys, issuer=s.public_base_url, audience=s.fhir_base, lifetime=s.token_lifetime_seconds
        )
        self.replay = ReplayGuard(db)
        self.limiter = RateLimiter(db, rate=s.rate_limit_per_second, burst=s.rate_limit_burst)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()

    async def authenticate(self, token: str) -> AccessContext:
        """The context of a valid token of an active system; TokenInvalid otherwise."""
        context = await self.tokens.verify(token)
        system = await self.registry.lookup(context.client_id)
        if system is None or not system.active:
            raise Suspended("The client system is suspended.", client_id=context.client_id)
        return context

    async def token(self, form: list[tuple[str, str]]) -> TokenResult:
        """POST /oauth2/token with client_credentials and a JWT assertion."""
        try:
            result = await self._token(form)
        except ClaimRejected as exc:
            record_claim(exc.client_id, exc.reason)
            return oauth_error(exc.error, exc.description)
        except FHIRError as exc:  # the database is busy or unreachable: not the client's fault
            return oauth_error("temporarily_unavailable", exc.issues[0].diagnostics, 503, **{"Retry-After": "1"})
        return result

    async def _token(self, form: list[tuple[str, str]]) -> TokenResult:
        params: dict[str, str] = {}
        for name, value in form:
            if name in params:  # RFC 6749 §3.2: parameters must not repeat
                raise ClaimRejected("invalid_request", f"{name} appears more than once", "malformed")
            params[name] = value
        grant_type = params.get("grant_type")
        if grant_type is None:
            raise ClaimRejected("invalid_request", "grant_type is required", "malformed")
        if grant_type != "client_credentials":
            raise ClaimRejected("unsupported_grant_type", "only client_credentials is supported", "malformed")
        if params.get("client_assertion_type") != ASSERTION_TYPE or not params.get("client_assertion"):
            raise ClaimRejected(
                "invalid_client", f"authenticate with client_assertion_type {ASSERTION_TYPE} and a client_assertion",
                "malformed",
            )
        verified = await self.assertions.verify(params["client_assertion"], params.get("client_id"))
        system = verified.system
        cid = system.client_id
        granted = grant(params.get("scope", ""), system.scopes)
        if not granted:
            raise ClaimRejected(
                "invalid_scope", "none of the requested scopes is allowed for this client", "bad_scope", cid
            )
        wait = await self.limiter.take(cid)
        if wait is not None:
            return oauth_error(
                "temporarily_unavailable", "rate limit exceeded; retry later", 429,
                **{"Retry-After": str(math.ceil(wait))},
            )
        if not await self.replay.first_use(cid, verified.jti, verified.expires_at + CLOCK_SKEW):
            raise ClaimRejected("invalid_client", "this assertion's jti has been used already", "replayed_jti", cid)
        token, lifetime = await self.tokens.issue(
            client_id=cid,
            scopes=granted,
            participant_organization=system.organization,
            end_user=verified.end_user,
        )
        record_claim(cid, None)
        body = {"access_token": token, "token_type": "bearer", "expires_in": lifetime, "scope": " ".join(granted)}
        return TokenResult(200, body)
