"""Access tokens: JWTs signed by the hub's current key (RFC 9068 shape), and their check.

Claims: ``iss`` (the hub), ``aud`` (the hub's FHIR base), ``sub`` and ``client_id`` (the
system), ``scope``, ``participant_organization`` (ODS code of the system's organisation),
``exp``/``iat``/``jti``, and the end-user claims when the assertion carried them.

Verification runs on every API request, so it is built to be cheap: a verified token is
kept in a bounded in-process cache (keyed by the token string) until it expires, so a
client that reuses its token for five minutes pays for one signature check; the hub's
public keys are parsed once. No database access unless a kid is new to this process.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

import orjson
from joserfc import jws, jwt
from joserfc.errors import JoseError

from sharedcare.iam.context import AccessContext, EndUser, context_from_claims
from sharedcare.iam.hubkeys import HubKeys

MAX_TOKEN_BYTES = 8192
TOKEN_TYPE = "at+jwt"  # RFC 9068 §2.1


class TokenInvalid(Exception):
    """An access token the hub does not accept; ``expired`` tells the two 401 cases apart."""

    def __init__(self, description: str, *, expired: bool = False, client_id: str | None = None):
        super().__init__(description)
        self.description = description
        self.expired = expired
        self.client_id = client_id


class AccessTokens:
    """Issue and verify the hub's access tokens."""

    def __init__(
        self,
        keys: HubKeys,
        *,
        issuer: str,
        audience: str,
        lifetime: int,
        cache_size: int = 50_000,
        clock: Callable[[], float] = time.time,
    ):
        self.keys = keys
        self.issuer = issuer
        self.audience = audience
        self.lifetime = lifetime
        self.cache_size = cache_size
        self.clock = clock
        self._verified: dict[str, AccessContext] = {}

    async def issue(
        self,
        *,
        client_id: str,
        scopes: list[str],
        participant_organization: str | None,
        end_user: EndUser | None,
    ) -> tuple[str, int]:
        """A signed access token and its lifetime in seconds."""
        key = await self.keys.signing_key()
        now = int(self.clock())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": client_id,
            "client_id": client_id,
            "scope": " ".join(scopes),
            "iat": now,
            "exp": now + self.lifetime,
            "jti": secrets.token_urlsafe(16),
        }
        if participant_organization:
            claims["participant_organization"] = participant_organization
        if end_user is not None:
            claims.update(end_user.to_claims())
        header = {"alg": key.alg, "kid": key.kid, "typ": TOKEN_TYPE}
        return jwt.encode(header, claims, key, algorithms=[str(key.alg)]), self.lifetime

    async def verify(self, token: str) -> AccessContext:
        """The context a valid token carries; TokenInvalid otherwise."""
        context = self._verified.get(token)
        now = self.clock()
        if context is not None:
            if context.expires_at <= now:
                self._verified.pop(token, None)
                raise TokenInvalid("The access token has expired.", expired=True, client_id=context.client_id)
            return context
        context = await self._verify_uncached(token, now)
        if len(self._verified) >= self.cache_size:
            # Evict the oldest entries (dicts keep insertion order): O(1) per insert.
            for stale in list(self._verified)[: self.cache_size // 10 or 1]:
                del self._verified[stale]
        self._verified[token] = context
        return context

    async def _verify_uncached(self, token: str, now: float) -> AccessContext:
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenInvalid("The access token is too large.")
        try:
            obj = jws.extract_compact(token.encode("ascii"))
            header = obj.headers()
        except (JoseError, ValueError, UnicodeError):
            raise TokenInvalid("The access token is not a JWT.") from None
        kid = header.get("kid")
        if header.get("typ") != TOKEN_TYPE or not isinstance(kid, str):
            raise TokenInvalid("The access token was not issued by this hub.")
        key = await self.keys.public_key(kid)
        if key is None or header.get("alg") != key.alg:
            raise TokenInvalid("The access token was not signed by a current key of this hub.")
        try:
            valid = jws.validate_compact(obj, key, algorithms=[str(key.alg)])
        except JoseError:
            valid = False
        if not valid:
            raise TokenInvalid("The access token's signature is not valid.")
        try:
            claims = orjson.loads(obj.payload or b"")
            if claims["iss"] != self.issuer or claims["aud"] != self.audience:
                raise TokenInvalid("The access token was issued for another server.")
            exp = claims["exp"]
            if not isinstance(exp, int):
                raise TokenInvalid("The access token has no valid exp.")
            context = context_from_claims(claims)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            raise TokenInvalid("The access token's claims are malformed.") from None
        if exp <= now:
            raise TokenInvalid("The access token has expired.", expired=True, client_id=context.client_id)
        return context
