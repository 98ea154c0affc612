"""HTTP routes of identity and access: the token endpoint, SMART configuration, hub JWKS.

All three are public (they are how a client gets a token). The SMART configuration is
served at the root and under the FHIR base, where SMART clients look for it
(hl7.org/fhir/smart-app-launch/conformance.html#using-well-known).
"""

from __future__ import annotations

from urllib.parse import parse_qsl

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sharedcare.iam.assertion import ALGORITHMS
from sharedcare.iam.context import CLAIM_NAMES
from sharedcare.iam.scopes import ADMIN_SCOPE
from sharedcare.iam.service import Iam, TokenResult, oauth_error

MAX_FORM_BYTES = 32 * 1024
SMART_CONFIG_PATHS = ("/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration")
JWKS_PATH = "/oauth2/jwks"
TOKEN_PATH = "/oauth2/token"


def _json(result: TokenResult) -> Response:
    return Response(orjson.dumps(result.body), result.status, result.headers, media_type="application/json")


def _iam(request: Request) -> Iam:
    return request.app.state.iam


async def token(request: Request) -> Response:
    """POST /oauth2/token: form-encoded client_credentials with a JWT client assertion."""
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/x-www-form-urlencoded":
        return _json(oauth_error("invalid_request", "send the request as application/x-www-form-urlencoded"))
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            return _json(oauth_error("invalid_request", f"the request is larger than {MAX_FORM_BYTES} bytes"))
    try:
        form = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except UnicodeDecodeError:
        return _json(oauth_error("invalid_request", "the form is not UTF-8"))
    return _json(await _iam(request).token(form))


async def smart_configuration(request: Request) -> Response:
    """GET .well-known/smart-configuration (conformance.html#metadata)."""
    iam = _iam(request)
    base = iam.settings.public_base_url
    config = {
        "issuer": base,
        "jwks_uri": f"{base}{JWKS_PATH}",
        "token_endpoint": iam.token_url,
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": ["private_key_jwt"],
        "token_endpoint_auth_signing_alg_values_supported": list(ALGORITHMS),
        "scopes_supported": ["system/*.read", "system/*.rs", "system/*.cruds", ADMIN_SCOPE],
        "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
        # Not SMART: the end-user claims a client assertion may carry (see the README).
        "sharedcare_assertion_claims_supported": list(CLAIM_NAMES),
    }
    return Response(
        orjson.dumps(config), media_type="application/json", headers={"Cache-Control": "public, max-age=3600"}
    )


async def jwks(request: Request) -> Response:
    """GET /oauth2/jwks: the hub's public keys, current and still-valid retired ones."""
    keys = await _iam(request).keys.jwks()
    return Response(
        orjson.dumps(keys), media_type="application/jwk-set+json", headers={"Cache-Control": "public, max-age=300"}
    )


def iam_routes() -> list[Route]:
    """Routes to put before the store's (``/fhir/.well-known/...`` would match ``/fhir/{type}/{id}``)."""
    return [
        Route(TOKEN_PATH, token, methods=["POST"]),
        Route(JWKS_PATH, jwks, methods=["GET"]),
        *(Route(path, smart_configuration, methods=["GET"]) for path in SMART_CONFIG_PATHS),
    ]
