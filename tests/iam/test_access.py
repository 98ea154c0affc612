"""Access control on the FHIR API: 401s, scopes (v1 and v2), end-user context, admin writes."""

from __future__ import annotations

import time
from typing import Any

import httpx
from conftest import END_USER, TEST_BASE
from helpers import FHIR_JSON
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from sharedcare.iam.client import generate_key
from sharedcare.iam.context import AccessContext, access
from sharedcare.iam.middleware import AuthMiddleware


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_token_signed_by_another_key_is_401(app: Any, anon_client: httpx.AsyncClient) -> None:
    """A forged token naming the hub's current kid fails on the signature."""
    from joserfc import jwt

    tokens = app.state.iam.tokens
    real = await tokens.keys.signing_key()
    forged_key = generate_key("ES384", kid=real.kid)
    now = int(time.time())
    claims = {"iss": TEST_BASE, "aud": f"{TEST_BASE}/fhir", "client_id": "x", "sub": "x", "scope": "system/*.*",
              "exp": now + 60, "iat": now, "jti": "j", **END_USER}
    forged = jwt.encode({"alg": "ES384", "kid": real.kid, "typ": "at+jwt"}, claims, forged_key, algorithms=["ES384"])
    response = await anon_client.get("/fhir/Patient", headers=bearer(forged))
    assert response.status_code == 401 and "signature" in response.headers["www-authenticate"]


async def test_expired_token_is_401_and_counted(
    app: Any, anon_client: httpx.AsyncClient, register_system: Any, get_token: Any, es_key: Any, monkeypatch: Any
) -> None:
    await register_system("short", es_key, "system/*.read")
    token = await get_token(anon_client, "short", es_key, "system/*.read")
    assert (await anon_client.get("/fhir/Patient", headers=bearer(token))).status_code == 200  # now cached
    before = await expired_count(anon_client)
    monkeypatch.setattr(app.state.iam.tokens, "clock", lambda: time.time() + 301)
    response = await anon_client.get("/fhir/Patient", headers=bearer(token))
    assert response.status_code == 401
    assert 'error="invalid_token", error_description="The access token has expired."' in response.headers["www-authenticate"]
    assert await expired_count(anon_client) == before + 1


async def expired_count(http: httpx.AsyncClient) -> float:
    text = (await http.get("/metrics")).text
    line = next((x for x in text.splitlines() if x.startswith('sharedcare_iam_expired_tokens_total{participant="short"}')), None)
    return float(line.rsplit(" ", 1)[1]) if line else 0.0


async def test_patient_data_needs_end_user_context(
    anon_client: httpx.AsyncClient, register_system: Any, get_token: Any, es_key: Any
) -> None:
    await register_system("batch-job", es_key, "system/*.read")
    token = await get_token(anon_client, "batch-job", es_key, "system/*.read", end_user=None)
    assert (await anon_client.get("/fhir/Organization", headers=bearer(token))).status_code == 200
    assert (await anon_client.get("/fhir/Practitioner", headers=bearer(token))).status_code == 200
    refused = await anon_client.get("/fhir/Patient", headers=bearer(token))
    assert refused.status_code == 403
    outcome = refused.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "forbidden"
    assert "requesting_user" in outcome["issue"][0]["diagnostics"]


async def test_registry_writes_need_the_admin_scope(
    anon_client: httpx.AsyncClient, client: httpx.AsyncClient, register_system: Any, get_token: Any, es_key: Any
) -> None:
    await register_system("writer", es_key, "system/*.*")
    token = await get_token(anon_client, "writer", es_key, "system/*.*")
    org = {"resourceType": "Organization", "id": "o1", "name": "Somewhere"}
    refused = await anon_client.put("/fhir/Organization/o1", json=org, headers={**FHIR_JSON, **bearer(token)})
    assert refused.status_code == 403 and "sharedcare/admin" in refused.json()["issue"][0]["diagnostics"]
    assert (await anon_client.get("/fhir/Endpoint", headers=bearer(token))).status_code == 200
    assert (await client.put("/fhir/Organization/o1", json=org, headers=FHIR_JSON)).status_code == 201  # admin


async def test_bundle_entries_are_checked_one_by_one(
    anon_client: httpx.AsyncClient, register_system: Any, get_token: Any, es_key: Any
) -> None:
    await register_system("bundler", es_key, "system/Patient.cruds")
    token = await get_token(anon_client, "bundler", es_key, "system/Patient.cruds")
    headers = {**FHIR_JSON, **bearer(token)}

    def bundle(*types: str) -> dict[str, Any]:
        entries = [{"resource": {"resourceType": t, **({"status": "active"} if t == "Group" else {})},
                    "request": {"method": "POST", "url": t}} for t in types]
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

    allowed = await anon_client.post("/fhir", json=bundle("Patient", "Patient"), headers=headers)
    assert allowed.status_code == 200, allowed.text
    refused = await anon_client.post("/fhir", json=bundle("Patient", "Group"), headers=headers)
    assert refused.status_code == 403 and "system/Group.c" in refused.json()["issue"][0]["diagnostics"]
    search = await anon_client.get("/fhir/Patient", headers=bearer(token))
    assert search.json()["total"] == 2  # the refused Bundle wrote nothing


async def test_suspension_refuses_tokens_already_issued(
    app: Any, anon_client: httpx.AsyncClient, register_system: Any, get_token: Any, es_key: Any
) -> None:
    await register_system("flaky", es_key, "system/*.read")
    token = await get_token(anon_client, "flaky", es_key, "system/*.read")
    assert (await anon_client.get("/fhir/Organization", headers=bearer(token))).status_code == 200
    await app.state.iam.registry.set_status("flaky", "suspended")
    refused = await anon_client.get("/fhir/Organization", headers=bearer(token))
    assert refused.status_code == 401 and "suspended" in refused.headers["www-authenticate"]
    from sharedcare.iam.client import sign_assertion, token_form

    form = token_form(sign_assertion(es_key, "flaky", f"{TEST_BASE}/oauth2/token"), "system/*.read")
    no_token = await anon_client.post("/oauth2/token", data=form)
    assert (no_token.status_code, no_token.json()["error"]) == (400, "invalid_client")
    await app.state.iam.registry.set_status("flaky", "active")
    assert (await anon_client.get("/fhir/Organization", headers=bearer(token))).status_code == 200


async def test_handlers_receive_one_typed_access_context(app: Any, client: httpx.AsyncClient) -> None:
    async def whoami(request: Request) -> JSONResponse:
        context = access(request)
        assert isinstance(context, AccessContext)
        return JSONResponse({
            "client_id": context.client_id,
            "user": context.requesting_user.name if context.requesting_user else None,
            "role": context.requesting_user.role if context.requesting_user else None,
            "organization": context.requesting_organization,
            "reason": context.reason_for_access,
            "scopes": list(context.scopes),
        })

    probe = Starlette(
        routes=[Route("/fhir/Patient", whoami)],
        middleware=[Middleware(AuthMiddleware, iam=app.state.iam)],
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=probe), base_url=TEST_BASE) as http:
        seen = (await http.get("/fhir/Patient", headers={"Authorization": client.headers["Authorization"]})).json()
    assert seen == {
        "client_id": "test-admin", "user": "Dr Test User", "role": "R8000", "organization": "X26",
        "reason": "TREAT", "scopes": ["system/*.*", "sharedcare/admin"],
    }
