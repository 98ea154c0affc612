"""Verification of client assertions (SMART Backend Services, RFC 7523).

Follows hl7.org/fhir/smart-app-launch/client-confidential-asymmetric.html
("Authenticating to the Token endpoint" and "Signature Verification"):

- header: ``alg`` RS384 or ES384 (nothing else: no ``none``, no HMAC), ``kid`` required,
  ``typ`` JWT when present, ``jku`` honoured only when it equals the registered JWKS URL;
- the key is the one key of the client's JWKS whose kid matches and whose type fits the
  alg; an unknown kid re-fetches a JWKS URL once (the client may have rotated);
- claims: ``iss`` = ``sub`` = client id, ``aud`` = this hub's token URL, ``exp`` in the
  future and at most five minutes ahead, ``iat``/``nbf`` not in the future, ``jti``
  present (its single use is checked by the caller, after everything else holds).

Each failure is a :class:`ClaimRejected` with the RFC 6749 §5.2 error code and a metric
reason; malformed input is ``invalid_request``, failed authentication ``invalid_client``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeGuard

import orjson
from joserfc import jws
from joserfc.errors import JoseError
from joserfc.jwk import ECKey, KeySet, RSAKey

from sharedcare.iam.context import ContextError, EndUser, parse_end_user
from sharedcare.iam.jwks import JwksCache, JwksUnavailable
from sharedcare.registry.model import System
from sharedcare.registry.service import Registry

ALGORITHMS = ("RS384", "ES384")
MAX_ASSERTION_BYTES = 16 * 1024
MAX_LIFETIME = 300  # "exp ... no more than five minutes in the future"
CLOCK_SKEW = 30  # seconds of clock difference tolerated between client and hub
MAX_JTI = 255


class ClaimRejected(Exception):
    """A token request refused with an RFC 6749 §5.2 error."""

    def __init__(self, error: str, description: str, reason: str, client_id: str | None = None):
        super().__init__(description)
        self.error = error
        self.description = description
        self.reason = reason
        self.client_id = client_id


@dataclass(frozen=True, slots=True)
class VerifiedAssertion:
    """An assertion whose signature and claims hold (its jti not yet spent)."""

    system: System
    jti: str
    expires_at: int
    end_user: EndUser | None


def _malformed(description: str) -> ClaimRejected:
    return ClaimRejected("invalid_request", description, "malformed")


def _key_fits(key: Any, alg: str) -> bool:
    if alg == "RS384":
        return isinstance(key, RSAKey)
    return isinstance(key, ECKey) and key.curve_name == "P-384"


def _find(keys: KeySet, kid: str, alg: str) -> list[Any]:
    return [k for k in keys if k.kid == kid and _key_fits(k, alg)]


class AssertionVerifier:
    """Checks client assertions against the registry and the clients' keys."""

    def __init__(
        self,
        registry: Registry,
        jwks: JwksCache,
        *,
        token_url: str,
        clock: Callable[[], float] = time.time,
    ):
        self.registry = registry
        self.jwks = jwks
        self.token_url = token_url
        self.clock = clock

    async def verify(self, assertion: str, client_id: str | None = None) -> VerifiedAssertion:
        """The verified assertion, or ClaimRejected saying why not."""
        if len(assertion) > MAX_ASSERTION_BYTES:
            raise _malformed(f"client_assertion is larger than {MAX_ASSERTION_BYTES} bytes")
        try:
            obj = jws.extract_compact(assertion.encode("ascii"))
            header = obj.headers()
            claims = orjson.loads(obj.payload or b"")
        except (JoseError, ValueError, UnicodeError, TypeError):
            raise _malformed("client_assertion is not a compact JWS with a JSON header and payload") from None
        if not isinstance(claims, dict):
            raise _malformed("the assertion's payload must be a JSON object")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS:
            raise ClaimRejected("invalid_client", f"alg {alg!r} is not accepted; sign with RS384 or ES384", "bad_signature")
        if not isinstance(kid, str) or not kid:
            raise ClaimRejected("invalid_client", "the assertion header must name its key (kid)", "malformed")
        typ = header.get("typ", "JWT")
        if not isinstance(typ, str) or typ.upper() != "JWT" or "crit" in header:
            raise ClaimRejected("invalid_client", "the assertion header must have typ JWT and no crit", "malformed")
        iss, sub = claims.get("iss"), claims.get("sub")
        if not isinstance(iss, str) or iss != sub or (client_id is not None and client_id != iss):
            raise ClaimRejected("invalid_client", "iss and sub must both be the client_id", "malformed")
        system = await self.registry.lookup(iss)
        if system is None:
            raise ClaimRejected("invalid_client", "the client is not registered", "unknown_client")
        if not system.active:
            raise ClaimRejected("invalid_client", "the client is suspended", "suspended", iss)
        key = await self._key(system, header, kid, alg)
        try:
            valid = jws.validate_compact(obj, key, algorithms=[alg])
        except JoseError:
            valid = False
        if not valid:
            raise ClaimRejected("invalid_client", "the assertion's signature does not verify", "bad_signature", iss)
        self._check_claims(claims, iss)
        try:
            end_user = parse_end_user(claims)
        except ContextError as exc:
            raise ClaimRejected("invalid_request", str(exc), "malformed", iss) from None
        return VerifiedAssertion(system, claims["jti"], int(claims["exp"]), end_user)

    async def _key(self, system: System, header: dict[str, Any], kid: str, alg: str) -> Any:
        cid = system.client_id
        jku = header.get("jku")
        if jku is not None and (system.jwks_url is None or jku != system.jwks_url):
            raise ClaimRejected("invalid_client", "jku is not the JWKS URL registered for this client", "bad_signature", cid)
        if system.jwks_url:
            try:
                found = _find(await self.jwks.keys(system.jwks_url), kid, alg)
                if not found:  # the client may have rotated its key: look again, once
                    found = _find(await self.jwks.keys(system.jwks_url, refresh=True), kid, alg)
            except JwksUnavailable as exc:
                raise ClaimRejected("invalid_client", str(exc), "jwks_unavailable", cid) from None
        else:
            found = _find(system.keys, kid, alg) if system.keys is not None else []
        if len(found) != 1:
            raise ClaimRejected(
                "invalid_client", f"no single {alg} key with kid {kid!r} is registered for this client", "bad_signature", cid
            )
        return found[0]

    def _check_claims(self, claims: dict[str, Any], cid: str) -> None:
        aud = claims.get("aud")
        if not (aud == self.token_url or (isinstance(aud, list) and self.token_url in aud)):
            raise ClaimRejected("invalid_client", f"aud must be the token URL {self.token_url}", "bad_audience", cid)
        now = self.clock()
        exp, iat, nbf, jti = claims.get("exp"), claims.get("iat"), claims.get("nbf"), claims.get("jti")
        if not _number(exp):
            raise ClaimRejected("invalid_client", "exp is required (a NumericDate)", "malformed", cid)
        if exp <= now - CLOCK_SKEW:
            raise ClaimRejected("invalid_client", "the assertion has expired", "expired", cid)
        if exp > now + MAX_LIFETIME + CLOCK_SKEW:
            raise ClaimRejected("invalid_client", "exp may be at most five minutes ahead", "malformed", cid)
        for name, value in (("iat", iat), ("nbf", nbf)):
            if value is not None and (not _number(value) or value > now + CLOCK_SKEW):
                raise ClaimRejected("invalid_client", f"{name} must be a NumericDate not in the future", "malformed", cid)
        if not isinstance(jti, str) or not 0 < len(jti) <= MAX_JTI:
            raise ClaimRejected("invalid_client", f"jti is required (1-{MAX_JTI} characters)", "malformed", cid)


def _number(value: Any) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
