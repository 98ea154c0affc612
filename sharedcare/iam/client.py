"""The client side of SMART Backend Services: key pairs and signed assertions.

Used by ``sharedcare participants keygen``, the simulators, benchmarks and tests; an
integrator would normally use a standard OAuth2 library instead (see
``docs/examples/get_token.py``).
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Literal

from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

Alg = Literal["ES384", "RS384"]
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


def generate_key(alg: Alg = "ES384", kid: str | None = None) -> ECKey | RSAKey:
    """A new private signing key for ``alg``, with ``kid``, ``alg`` and ``use`` set."""
    params = {"kid": kid or f"{alg.lower()}-{secrets.token_hex(6)}", "alg": alg, "use": "sig"}
    if alg == "ES384":
        return ECKey.generate_key("P-384", parameters=params)  # type: ignore[arg-type]
    if alg == "RS384":
        return RSAKey.generate_key(2048, parameters=params)  # type: ignore[arg-type]
    raise ValueError(f"alg must be ES384 or RS384, not {alg!r}")


def public_jwks(*keys: ECKey | RSAKey) -> dict[str, Any]:
    """The JWKS to register for ``keys``: public parts only."""
    return {"keys": [k.as_dict(private=False) for k in keys]}


def sign_assertion(
    key: ECKey | RSAKey,
    client_id: str,
    token_url: str,
    *,
    end_user: dict[str, Any] | None = None,
    lifetime: int = 300,
    jti: str | None = None,
    header: dict[str, Any] | None = None,
    claims: dict[str, Any] | None = None,
) -> str:
    """A client assertion (backend-services.html#authenticating-to-the-token-endpoint)."""
    now = int(time.time())
    alg = str(key.get("alg") or ("ES384" if isinstance(key, ECKey) else "RS384"))
    body: dict[str, Any] = {
        "iss": client_id,
        "sub": client_id,
        "aud": token_url,
        "exp": now + lifetime,
        "iat": now,
        "jti": jti or secrets.token_urlsafe(18),
        **(end_user or {}),
        **(claims or {}),
    }
    head = {"alg": alg, "kid": key.kid, "typ": "JWT", **(header or {})}
    return jwt.encode(head, body, key, algorithms=[alg])


def token_form(assertion: str, scope: str) -> dict[str, str]:
    """The form fields of a client-credentials token request."""
    return {
        "grant_type": "client_credentials",
        "scope": scope,
        "client_assertion_type": ASSERTION_TYPE,
        "client_assertion": assertion,
    }
