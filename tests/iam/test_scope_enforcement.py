"""Tables of access cases: public routes, 401s, and SMART scopes (v1 and v2) on every route.

One shared hub per backend (see ``shared_app``): each case registers its own client.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from conftest import END_USER, TOKEN_URL
from helpers import FHIR_JSON, patient

from sharedcare.iam.client import sign_assertion, token_form

OK, FORBIDDEN = "2xx", 403


@pytest.mark.parametrize("path", ["/fhir/metadata", "/.well-known/smart-configuration", "/oauth2/jwks", "/livez", "/readyz", "/metrics"])
async def test_public_routes_need_no_token(shared_http: httpx.AsyncClient, path: str) -> None:
    assert (await shared_http.get(path)).status_code == 200


@pytest.mark.parametrize(
    ("headers", "description"),
    [
        ({}, "A bearer access token is required"),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, "A bearer access token is required"),
        ({"Authorization": "Bearer not-a-jwt"}, "not a JWT"),
        ({"Authorization": "Bearer " + "a.b.c"}, "not a JWT"),
    ],
)
async def test_missing_or_invalid_token_is_401(
    shared_http: httpx.AsyncClient, headers: dict[str, str], description: str
) -> None:
    response = await shared_http.get("/fhir/Patient", headers=headers)
    assert response.status_code == 401
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="sharedcare", error="invalid_token", error_description="')
    assert description in challenge
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome" and outcome["issue"][0]["code"] == "login"


# (allowed scopes, method, path, extra headers, expected)
CASES = [
    ("system/Patient.read", "GET", "/fhir/Patient", {}, OK),  # v1
    ("system/Patient.read", "POST", "/fhir/Patient", {}, FORBIDDEN),
    ("system/Patient.read", "GET", "/fhir/Consent", {}, FORBIDDEN),
    ("system/Patient.rs", "GET", "/fhir/Patient/_history", {}, OK),  # v2
    ("system/Patient.r", "GET", "/fhir/Patient", {}, FORBIDDEN),  # read is not search
    ("system/Patient.s", "GET", "/fhir/Patient/p1", {}, FORBIDDEN),  # nor search read
    ("system/Patient.c", "POST", "/fhir/Patient", {}, OK),
    ("system/Patient.c", "POST", "/fhir/Patient", {"If-None-Exist": "family=Conditional"}, FORBIDDEN),  # needs s too
    ("system/Patient.cs", "POST", "/fhir/Patient", {"If-None-Exist": "family=Conditional"}, OK),
    ("system/Patient.write", "PUT", "/fhir/Patient/p1", {}, OK),
    ("system/Patient.cus", "DELETE", "/fhir/Patient/p1", {}, FORBIDDEN),
    ("system/Patient.d", "DELETE", "/fhir/Patient/p1", {}, OK),
    ("system/*.read", "GET", "/fhir/Group", {}, OK),
    ("system/*.read", "GET", "/fhir/Patient/p1/_history/1", {}, OK),
    ("system/*.*", "POST", "/fhir/Patient/_search", {}, OK),
    ("system/Patient.*", "POST", "/fhir/Consent/_search", {}, FORBIDDEN),
]


@pytest.mark.parametrize(("allowed", "method", "path", "headers", "expected"), CASES)
async def test_every_route_checks_scope(
    shared_http: httpx.AsyncClient, shared_register: Any, es_key: Any,
    allowed: str, method: str, path: str, headers: dict[str, str], expected: Any,
) -> None:
    async def bearer(scopes: str) -> dict[str, str]:
        client_id = "scoped-" + "".join(ch if ch.isalnum() else "-" for ch in scopes)
        await shared_register(client_id, es_key, scopes)
        form = token_form(sign_assertion(es_key, client_id, TOKEN_URL, end_user=END_USER), scopes)
        return {"Authorization": f"Bearer {(await shared_http.post('/oauth2/token', data=form)).json()['access_token']}"}

    if path.startswith("/fhir/Patient/p1"):  # the instance exists, whatever ran before
        writer = await bearer("system/Patient.write")
        await shared_http.put("/fhir/Patient/p1", json=patient(id="p1"), headers={**FHIR_JSON, **writer})
    auth = await bearer(allowed)
    if path.endswith("_search"):
        response = await shared_http.post(path, data={"family": "x"}, headers=auth)
    elif method in ("POST", "PUT"):
        body = patient(family="Conditional") if headers else patient(**({"id": "p1"} if method == "PUT" else {}))
        response = await shared_http.request(method, path, json=body, headers={**FHIR_JSON, **headers, **auth})
    else:
        response = await shared_http.request(method, path, headers=auth)
    if expected == OK:
        assert 200 <= response.status_code < 300, response.text
    else:
        assert response.status_code == 403, response.text
        assert response.json()["issue"][0]["code"] == "forbidden"
        assert 'error="insufficient_scope"' in response.headers["www-authenticate"]
