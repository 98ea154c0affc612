"""Get an access token from a sharedcare hub with a standard OAuth2 library, then use it.

SMART Backend Services: the client signs a short-lived JWT with its private key
(authlib's PrivateKeyJWT) and exchanges it for an access token at the token endpoint it
finds in the hub's ``.well-known/smart-configuration``.

    python get_token.py --fhir-base http://127.0.0.1:8080/fhir --client-id my-portal \\
        --key my-portal-key.private.jwk.json --scope "system/Patient.rs"
"""

from __future__ import annotations

import argparse
import json
import time

import httpx
from authlib.integrations.httpx_client import OAuth2Client
from authlib.oauth2.rfc7523 import PrivateKeyJWT
from joserfc.jwk import import_key


def get_token(fhir_base: str, client_id: str, key_file: str, scope: str, end_user: dict) -> dict:
    """Fetch a token; the assertion carries who is asking, for which organisation and why."""
    config = httpx.get(f"{fhir_base}/.well-known/smart-configuration").json()
    token_url = config["token_endpoint"]
    with open(key_file, encoding="utf-8") as f:
        key = import_key(json.load(f))  # the private JWK written by `sharedcare participants keygen`
    # A new PrivateKeyJWT per token: each assertion needs its own jti, and SMART allows
    # at most five minutes of lifetime (authlib's default is an hour).
    auth = PrivateKeyJWT(
        token_url,
        alg=key.alg,
        headers={"kid": key.kid, "typ": "JWT"},
        claims={"exp": int(time.time()) + 300, **end_user},
    )
    with OAuth2Client(client_id, key, token_endpoint_auth_method=auth, scope=scope) as client:
        return dict(client.fetch_token(token_url, grant_type="client_credentials"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fhir-base", required=True)
    parser.add_argument("--client-id", required=True)
    parser.add_argument("--key", required=True, help="private JWK file")
    parser.add_argument("--scope", required=True)
    args = parser.parse_args()
    end_user = {
        "requesting_user": {"id": "C123456", "name": "Dr Ann Example", "role": "R8000"},
        "requesting_organization": "RR8",
        "reason_for_access": "TREAT",
    }
    token = get_token(args.fhir_base, args.client_id, args.key, args.scope, end_user)
    print(json.dumps({k: token[k] for k in ("token_type", "expires_in", "scope")}))
    response = httpx.get(
        f"{args.fhir_base}/Patient",
        params={"_count": 1},
        headers={"Authorization": f"Bearer {token['access_token']}", "Accept": "application/fhir+json"},
    )
    print(response.status_code, response.json()["resourceType"])


if __name__ == "__main__":
    main()
