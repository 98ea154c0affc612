"""POST /oauth2/token with real keys and signatures, SMART configuration and the hub JWKS."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
from conftest import END_USER, TEST_BASE, TOKEN_URL
from joserfc import jwt
from joserfc.jwk import KeySet

from sharedcare.iam.client import sign_assertion, token_form


async def hub_claims(http: httpx.AsyncClient, token: str) -> dict[str, Any]:
    """Verify a hub token the way a third party would: with the published JWKS."""
    keys = KeySet.import_key_set((await http.get("/oauth2/jwks")).json())
    return dict(jwt.decode(token, keys, algorithms=["RS384", "ES384"]).claims)


@pytest.mark.parametrize("path", ["/.well-known/smart-configuration", "/fhir/.well-known/smart-configuration"])
async def test_smart_configuration_is_public(anon_client: httpx.AsyncClient, path: str) -> None:
    response = await anon_client.get(path)
    assert response.status_code == 200
    config = response.json()
    assert config["token_endpoint"] == TOKEN_URL
    assert config["token_endpoint_auth_methods_supported"] == ["private_key_jwt"]
    assert set(config["token_endpoint_auth_signing_alg_values_supported"]) == {"RS384", "ES384"}
    assert "client-confidential-asymmetric" in config["capabilities"]
    assert config["grant_types_supported"] == ["client_credentials"]
    jwks = await anon_client.get(config["jwks_uri"].removeprefix(TEST_BASE))
    assert jwks.status_code == 200 and jwks.json()["keys"]


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
async def test_assertion_gets_a_short_lived_token_carrying_the_end_user(
    anon_client: httpx.AsyncClient, register_system: Any, es_key: Any, rs_key: Any, alg: str
) -> None:
    key = es_key if alg == "ES384" else rs_key
    await register_system("portal", key, "system/Patient.rs system/Organization.read", organization="RR8")
    assertion = sign_assertion(key, "portal", TOKEN_URL, end_user=END_USER)
    response = await anon_client.post("/oauth2/token", data=token_form(assertion, "system/Patient.rs"))
    assert response.status_code == 200, response.text
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "bearer" and body["scope"] == "system/Patient.rs"
    assert 0 < body["expires_in"] <= 300
    claims = await hub_claims(anon_client, body["access_token"])
    assert claims["iss"] == TEST_BASE and claims["aud"] == f"{TEST_BASE}/fhir"
    assert claims["sub"] == claims["client_id"] == "portal"
    assert claims["exp"] - claims["iat"] <= 300 and claims["exp"] > time.time()
    assert claims["participant_organization"] == "RR8"
    assert {k: claims[k] for k in END_USER} == END_USER
    # the token works on the FHIR API
    read = await anon_client.get("/fhir/Patient", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert read.status_code == 200


async def test_scope_is_narrowed_to_what_the_system_may_have(
    anon_client: httpx.AsyncClient, register_system: Any, es_key: Any
) -> None:
    await register_system("narrow", es_key, "system/Patient.rs")
    assertion = sign_assertion(es_key, "narrow", TOKEN_URL)
    response = await anon_client.post(
        "/oauth2/token", data=token_form(assertion, "system/Patient.read system/Consent.read sharedcare/admin")
    )
    assert response.status_code == 200
    assert response.json()["scope"] == "system/Patient.read"
    nothing = sign_assertion(es_key, "narrow", TOKEN_URL)
    refused = await anon_client.post("/oauth2/token", data=token_form(nothing, "system/Consent.read"))
    assert (refused.status_code, refused.json()["error"]) == (400, "invalid_scope")


async def test_same_assertion_is_accepted_once(
    anon_client: httpx.AsyncClient, register_system: Any, es_key: Any
) -> None:
    await register_system("once", es_key, "system/*.read")
    form = token_form(sign_assertion(es_key, "once", TOKEN_URL), "system/*.read")
    first = await anon_client.post("/oauth2/token", data=form)
    second = await anon_client.post("/oauth2/token", data=form)
    assert first.status_code == 200
    assert second.status_code == 400
    assert second.json() == {"error": "invalid_client", "error_description": "this assertion's jti has been used already"}


async def test_jwks_url_is_cached_and_refetched_for_a_rotated_key(
    anon_client: httpx.AsyncClient, register_system: Any, es_key: Any, es_key_b: Any, jwks_server: Any
) -> None:
    jwks_server.jwks = {"keys": [es_key.as_dict(private=False)]}
    await register_system("remote", es_key, "system/*.read", jwks_url=jwks_server.url)

    async def token_with(key: Any, **header: Any) -> httpx.Response:
        assertion = sign_assertion(key, "remote", TOKEN_URL, header=header or None)
        return await anon_client.post("/oauth2/token", data=token_form(assertion, "system/*.read"))

    assert (await token_with(es_key)).status_code == 200
    assert (await token_with(es_key)).status_code == 200
    assert jwks_server.requests == 1  # max-age=600: fetched once
    # The client rotates: publishes key b and signs with it; the hub re-fetches on the new kid.
    jwks_server.jwks = {"keys": [es_key_b.as_dict(private=False)]}
    assert (await token_with(es_key_b)).status_code == 200
    assert jwks_server.requests == 2
    # jku is honoured only when it is the registered URL (SMART: "jku ... whitelisted").
    assert (await token_with(es_key_b, jku=jwks_server.url)).status_code == 200
    foreign = await token_with(es_key_b, jku="https://attacker.example/jwks.json")
    assert (foreign.status_code, foreign.json()["error"]) == (400, "invalid_client")


async def test_no_store_jwks_is_fetched_every_time(
    anon_client: httpx.AsyncClient, register_system: Any, es_key: Any, jwks_server: Any
) -> None:
    jwks_server.jwks = {"keys": [es_key.as_dict(private=False)]}
    jwks_server.cache_control = "no-store"
    await register_system("nostore", es_key, "system/*.read", jwks_url=jwks_server.url)
    for _ in range(3):
        form = token_form(sign_assertion(es_key, "nostore", TOKEN_URL), "system/*.read")
        assert (await anon_client.post("/oauth2/token", data=form)).status_code == 200
    assert jwks_server.requests == 3


async def test_unreachable_jwks_is_invalid_client_not_500(
    anon_client: httpx.AsyncClient, register_system: Any, es_key: Any
) -> None:
    await register_system("gone", es_key, "system/*.read", jwks_url="http://127.0.0.1:9/jwks.json")
    form = token_form(sign_assertion(es_key, "gone", TOKEN_URL), "system/*.read")
    response = await anon_client.post("/oauth2/token", data=form)
    assert (response.status_code, response.json()["error"]) == (400, "invalid_client")
