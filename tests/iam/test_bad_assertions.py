"""Every malformed token request gets an RFC 6749 §5.2 error, never a 500."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import httpx
import orjson
import pytest
from conftest import END_USER, TOKEN_URL
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sharedcare.iam.client import ASSERTION_TYPE, sign_assertion, token_form

CLIENT = "consumer-1"
SCOPE = "system/*.read"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: dict[str, Any], claims: dict[str, Any], signature: str = "") -> str:
    return f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(claims))}.{signature}"


def good_claims(**changes: Any) -> dict[str, Any]:
    now = int(time.time())
    claims = {"iss": CLIENT, "sub": CLIENT, "aud": TOKEN_URL, "exp": now + 240, "iat": now, "jti": f"j{time.time_ns()}"}
    claims.update(changes)
    return {k: v for k, v in claims.items() if v is not None}


def hs256_with_public_key(key: Any) -> str:
    """The classic key-confusion attack: HMAC keyed with the (public) verification key."""
    header = {"alg": "HS256", "kid": key.kid, "typ": "JWT"}
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(good_claims()))}"
    secret = orjson.dumps(key.as_dict(private=False))
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def tampered(key: Any) -> str:
    header, _payload, signature = sign_assertion(key, CLIENT, TOKEN_URL).split(".")
    return f"{header}.{b64(orjson.dumps(good_claims(scope='system/*.*')))}.{signature}"


# (case, builder(key, other_key) -> assertion, expected error)
CASES: list[tuple[str, Callable[[Any, Any], str], str]] = [
    ("bad base64", lambda k, o: "!!!.@@@.###", "invalid_request"),
    ("not a JWT", lambda k, o: "just-a-string", "invalid_request"),
    ("header not JSON", lambda k, o: f"{b64(b'{nope')}.{b64(b'{}')}.", "invalid_request"),
    ("payload not an object", lambda k, o: unsigned({"alg": "ES384", "kid": k.kid}, [1, 2]), "invalid_request"),  # type: ignore[arg-type]
    ("oversized", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, claims={"pad": "x" * 20_000}), "invalid_request"),
    ("alg none", lambda k, o: unsigned({"alg": "none", "kid": k.kid}, good_claims()), "invalid_client"),
    ("HS256 with the public key", lambda k, o: hs256_with_public_key(k), "invalid_client"),
    ("ES256", lambda k, o: unsigned({"alg": "ES256", "kid": k.kid}, good_claims(), "c2ln"), "invalid_client"),
    ("wrong kid", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, header={"kid": "no-such-key"}), "invalid_client"),
    ("missing kid", lambda k, o: unsigned({"alg": "ES384"}, good_claims(), "c2ln"), "invalid_client"),
    ("signed by another key", lambda k, o: sign_assertion(o, CLIENT, TOKEN_URL, header={"kid": k.kid}), "invalid_client"),
    ("tampered payload", lambda k, o: tampered(k), "invalid_client"),
    ("signature not base64", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL)[:-4] + "!!!!", "invalid_client"),
    ("typ at+jwt (an access token)", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, header={"typ": "at+jwt"}), "invalid_client"),
    ("typ not a string", lambda k, o: unsigned({"alg": "ES384", "kid": k.kid, "typ": 5}, good_claims(), "c2ln"), "invalid_client"),
    ("future iat", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, claims={"iat": int(time.time()) + 3600}), "invalid_client"),
    ("missing jti", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, claims={"jti": None}), "invalid_client"),
    ("empty jti", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, claims={"jti": ""}), "invalid_client"),
    ("expired", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, claims={"exp": int(time.time()) - 120}), "invalid_client"),
    ("exp an hour ahead", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, lifetime=3600), "invalid_client"),
    ("exp not a number", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, claims={"exp": "soon"}), "invalid_client"),
    ("aud is the FHIR base", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL.replace("oauth2/token", "fhir")), "invalid_client"),
    ("iss differs from sub", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, claims={"sub": "someone-else"}), "invalid_client"),
    ("unknown client", lambda k, o: sign_assertion(k, "not-registered", TOKEN_URL), "invalid_client"),
    ("jku not registered", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, header={"jku": "https://evil.example/k"}), "invalid_client"),
    ("partial end-user context", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, claims={"reason_for_access": "TREAT"}), "invalid_request"),
    ("unknown purpose of use", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, end_user={**END_USER, "reason_for_access": "CURIOUS"}), "invalid_request"),
    ("requesting_user not an object", lambda k, o: sign_assertion(k, CLIENT, TOKEN_URL, end_user={**END_USER, "requesting_user": "dr who"}), "invalid_request"),
]


@pytest.fixture
async def consumer(shared_register: Any, es_key: Any) -> None:
    """The consumer the assertions claim to be, registered once per shared app."""
    await shared_register(CLIENT, es_key, SCOPE)


@pytest.mark.parametrize(("case", "build", "error"), CASES, ids=[c[0] for c in CASES])
async def test_malformed_assertion_is_refused(
    shared_http: httpx.AsyncClient, consumer: None, es_key: Any, es_key_b: Any,
    case: str, build: Callable[[Any, Any], str], error: str,
) -> None:
    response = await shared_http.post("/oauth2/token", data=token_form(build(es_key, es_key_b), SCOPE))
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["error"] == error and body["error_description"]


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({}, "invalid_request"),
        ({"grant_type": "authorization_code"}, "unsupported_grant_type"),
        ({"grant_type": "client_credentials", "scope": SCOPE}, "invalid_client"),
        ({"grant_type": "client_credentials", "client_assertion_type": "password", "client_assertion": "x"}, "invalid_client"),
        ("grant_type=client_credentials&grant_type=client_credentials", "invalid_request"),
    ],
)
async def test_malformed_form_is_refused(
    shared_http: httpx.AsyncClient, consumer: None, form: dict[str, str] | str, error: str
) -> None:
    if isinstance(form, str):
        response = await shared_http.post(
            "/oauth2/token", content=form, headers={"Content-Type": "application/x-www-form-urlencoded"}
        )
    else:
        response = await shared_http.post("/oauth2/token", data=form)
    assert (response.status_code, response.json()["error"]) == (400, error)


async def test_json_body_is_invalid_request(shared_http: httpx.AsyncClient) -> None:
    response = await shared_http.post("/oauth2/token", json={"grant_type": "client_credentials"})
    assert (response.status_code, response.json()["error"]) == (400, "invalid_request")


INTS = st.integers(-(2**63), 2**63 - 1)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    assertion=st.one_of(
        st.text(max_size=300),
        st.lists(st.text(alphabet="ABCDEFGHIJabcdefgh0123456789-_=+/", max_size=60), min_size=2, max_size=4).map(".".join),
        st.builds(
            lambda h, p: f"{b64(orjson.dumps(h))}.{b64(orjson.dumps(p))}.c2ln",
            st.dictionaries(st.sampled_from(["alg", "kid", "typ", "jku", "crit"]), st.one_of(st.text(max_size=8), INTS, st.none())),
            st.dictionaries(st.sampled_from(["iss", "sub", "aud", "exp", "iat", "jti", "requesting_user"]), st.one_of(st.text(max_size=8), INTS, st.floats(allow_nan=False, allow_infinity=False), st.none(), st.just(CLIENT))),
        ),
    )
)
async def test_arbitrary_assertions_never_cause_a_server_error(
    shared_http: httpx.AsyncClient, consumer: None, assertion: str
) -> None:
    form = {"grant_type": "client_credentials", "scope": SCOPE, "client_assertion_type": ASSERTION_TYPE,
            "client_assertion": assertion}
    response = await shared_http.post("/oauth2/token", data=form)
    assert response.status_code == 400, response.text
    assert response.json()["error"] in ("invalid_request", "invalid_client")
