"""The participant registry as FHIR resources in the store, managed by code and by the FHIR API."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from conftest import TOKEN_URL
from helpers import FHIR_JSON

from sharedcare.fhir.errors import FHIRError
from sharedcare.iam.client import public_jwks, sign_assertion, token_form
from sharedcare.registry.model import CLIENT_ID_SYSTEM, EXT, RegistryError, new_system
from sharedcare.registry.service import Registry

PROVIDER: dict[str, Any] = {
    "client_id": "leeds-pas", "kind": "provider", "name": "Leeds PAS", "scopes": "system/*.read",
    "organization": "RR8", "fhir_base": "https://pas.leeds.example/fhir/",
    "identifier_systems": ["https://leeds.example/Id/mrn"],
    "messaging_endpoint": "https://pas.leeds.example/messaging",
}


async def test_a_system_is_an_organization_and_endpoints(client: httpx.AsyncClient, app: Any, es_key: Any) -> None:
    registry = app.state.iam.registry
    await registry.add(new_system(**PROVIDER, jwks=public_jwks(es_key)))
    org = (await client.get("/fhir/Organization/RR8")).json()
    assert org["identifier"] == [{"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "RR8"}]
    reg = (await client.get("/fhir/Endpoint/leeds-pas")).json()
    assert reg["status"] == "active" and reg["managingOrganization"]["reference"] == "Organization/RR8"
    assert reg["identifier"] == [{"system": CLIENT_ID_SYSTEM, "value": "leeds-pas"}]
    ext = {e["url"].removeprefix(EXT): next(v for k, v in e.items() if k.startswith("value")) for e in reg["extension"]}
    assert ext["system-kind"] == "provider" and ext["allowed-scopes"] == "system/*.read"
    assert ext["identifier-system"] == "https://leeds.example/Id/mrn"
    assert orjson.loads(ext["jwks"])["keys"][0]["kid"] == es_key.kid
    fhir = (await client.get("/fhir/Endpoint/leeds-pas.fhir")).json()
    assert (fhir["connectionType"]["code"], fhir["address"]) == ("hl7-fhir-rest", "https://pas.leeds.example/fhir")
    msg = (await client.get("/fhir/Endpoint/leeds-pas.msg")).json()
    assert (msg["connectionType"]["code"], msg["address"]) == ("hl7-fhir-msg", "https://pas.leeds.example/messaging")
    # Read back, it is the same system.
    system = await registry.get("leeds-pas")
    assert system.fhir_base == "https://pas.leeds.example/fhir" and system.organization == "RR8"
    assert system.identifier_systems == ("https://leeds.example/Id/mrn",)
    assert [s.client_id for s in await registry.systems()] == ["leeds-pas", "test-admin"]


async def test_suspension_is_a_new_version_of_every_endpoint(client: httpx.AsyncClient, app: Any, es_key: Any) -> None:
    registry = app.state.iam.registry
    await registry.add(new_system(**PROVIDER, jwks=public_jwks(es_key)))
    suspended = await registry.set_status("leeds-pas", "suspended")
    assert suspended.status == "suspended"
    for rid in ("leeds-pas", "leeds-pas.fhir", "leeds-pas.msg"):
        history = (await client.get(f"/fhir/Endpoint/{rid}/_history")).json()
        assert [e["resource"]["status"] for e in history["entry"]] == ["suspended", "active"]
    assert (await registry.set_status("leeds-pas", "active")).status == "active"


async def test_existing_organization_is_reused_and_ids_are_unique(client: httpx.AsyncClient, app: Any, es_key: Any) -> None:
    org = {"resourceType": "Organization", "identifier": [{"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": "B86001"}], "name": "Example Practice"}
    created = (await client.post("/fhir/Organization", json=org, headers=FHIR_JSON)).json()
    registry = app.state.iam.registry
    system = await registry.add(new_system(client_id="gp-1", kind="consumer", name="GP portal", scopes="system/*.read", organization="B86001", jwks=public_jwks(es_key)))
    assert system.organization_id == created["id"]
    with pytest.raises(FHIRError) as taken:
        await registry.add(new_system(client_id="gp-1", kind="consumer", name="Again", scopes="system/*.read", jwks=public_jwks(es_key)))
    assert taken.value.status == 409
    with pytest.raises(FHIRError) as missing:
        await registry.set_status("nobody", "suspended")
    assert missing.value.status == 404


async def test_admin_manages_systems_through_the_fhir_api(
    app: Any, client: httpx.AsyncClient, anon_client: httpx.AsyncClient, es_key: Any
) -> None:
    """A system registered by PUTting its Endpoint can get tokens; suspending it by PUT stops that."""
    endpoint = {
        "resourceType": "Endpoint", "id": "api-made",
        "identifier": [{"system": CLIENT_ID_SYSTEM, "value": "api-made"}],
        "extension": [
            {"url": EXT + "system-kind", "valueCode": "consumer"},
            {"url": EXT + "allowed-scopes", "valueString": "system/Organization.read"},
            {"url": EXT + "jwks", "valueString": orjson.dumps(public_jwks(es_key)).decode()},
        ],
        "status": "active",
        "connectionType": {"system": "https://sharedcare.example.org/fhir/CodeSystem/endpoint-connection-type", "code": "smart-backend-services"},
        "payloadType": [{"coding": [{"code": "none"}]}],
        "address": "urn:sharedcare:client:api-made",
    }
    assert (await client.put("/fhir/Endpoint/api-made", json=endpoint, headers=FHIR_JSON)).status_code == 201

    async def token_status() -> int:
        form = token_form(sign_assertion(es_key, "api-made", TOKEN_URL), "system/Organization.read")
        return (await anon_client.post("/oauth2/token", data=form)).status_code

    assert await token_status() == 200
    endpoint["status"] = "suspended"
    assert (await client.put("/fhir/Endpoint/api-made", json=endpoint, headers=FHIR_JSON)).status_code == 200
    app.state.iam.registry.forget("api-made")  # other processes follow within registry_cache_seconds
    assert await token_status() == 400


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"client_id": "has.dot"}, "letters, digits or hyphens"),
        ({"kind": "observer"}, "kind must be one of"),
        ({"fhir_base": None}, "needs --fhir-base"),
        ({"kind": "consumer"}, "only providers"),
        ({"fhir_base": "ftp://x"}, "http(s) URL"),
        ({"scopes": "patient/*.read"}, "SMART system scopes"),
        ({"scopes": ""}, "SMART system scopes"),
        ({"organization": "not an ods code"}, "ODS code"),
        ({"jwks": None, "jwks_url": "http://keys.example/jwks"}, "https"),
        ({"jwks_url": "https://keys.example/jwks"}, "exactly one"),
        ({"jwks": {"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "x"}]}}, "must be RSA"),
        ({"jwks": {"keys": []}}, "at least one key"),
    ],
)
def test_invalid_registrations_say_what_to_fix(es_key: Any, changes: dict[str, Any], message: str) -> None:
    fields: dict[str, Any] = {**PROVIDER, "jwks": public_jwks(es_key), **changes}
    if fields.get("kind") == "consumer":
        fields.pop("identifier_systems")
    with pytest.raises(RegistryError, match=message.replace("(", r"\(").replace(")", r"\)")):
        new_system(**fields)


def test_private_keys_are_never_registered(es_key: Any) -> None:
    with pytest.raises(RegistryError, match="private key material"):
        new_system(**{**PROVIDER, "jwks": {"keys": [es_key.as_dict(private=True)]}})


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _CountingRegistry(Registry):
    """The real registry, counting the store reads its cache makes."""

    reads = 0

    async def get(self, client_id: str) -> Any:
        self.reads += 1
        return await super().get(client_id)


async def _status_after_refresh(registry: Registry, client_id: str) -> str:
    for _ in range(200):  # the background refresh is a real store read: give it a moment
        await asyncio.sleep(0.01)
        if client_id not in registry._reading:
            break
    return (await registry.lookup(client_id)).status  # type: ignore[union-attr]


async def _cached_registry(app: Any, es_key: Any) -> tuple[Any, _Clock, _CountingRegistry]:
    """PROVIDER registered through the hub's registry, and a second registry (10 s cache,
    its own clock) reading the same store."""
    admin = app.state.iam.registry
    await admin.add(new_system(**PROVIDER, jwks=public_jwks(es_key)))
    clock = _Clock()
    return admin, clock, _CountingRegistry(app.state.fhir, cache_seconds=10, clock=clock)


async def test_a_cached_system_is_refreshed_ahead_and_never_served_past_its_age(
    client: httpx.AsyncClient, app: Any, es_key: Any
) -> None:
    admin, clock, cached = await _cached_registry(app, es_key)
    assert (await cached.lookup("leeds-pas")).status == "active"  # type: ignore[union-attr]
    await admin.set_status("leeds-pas", "suspended")

    clock.now += 4  # young: answered from the cache, no read
    assert (await cached.lookup("leeds-pas")).status == "active"  # type: ignore[union-attr]
    assert cached.reads == 1
    clock.now += 2  # past half its age: still answered at once, and read again behind
    assert (await cached.lookup("leeds-pas")).status == "active"  # type: ignore[union-attr]
    assert await _status_after_refresh(cached, "leeds-pas") == "suspended"
    assert cached.reads == 2

    # No traffic for longer than cache_seconds: the old entry is never served.
    await admin.set_status("leeds-pas", "active")
    clock.now += 10.5
    assert (await cached.lookup("leeds-pas")).status == "active"  # type: ignore[union-attr]
    assert cached.reads == 3


async def test_callers_that_find_an_entry_expired_share_one_read(
    client: httpx.AsyncClient, app: Any, es_key: Any
) -> None:
    _, _, cached = await _cached_registry(app, es_key)
    found = await asyncio.gather(*(cached.lookup("leeds-pas") for _ in range(20)))
    assert {s.client_id for s in found} == {"leeds-pas"}  # type: ignore[union-attr]
    assert cached.reads == 1


async def test_a_forgotten_system_is_not_cached_again_by_a_read_that_started_before(
    client: httpx.AsyncClient, app: Any, es_key: Any
) -> None:
    admin, _, cached = await _cached_registry(app, es_key)
    read = asyncio.ensure_future(cached.lookup("leeds-pas"))
    await asyncio.sleep(0)  # the read has started
    await admin.set_status("leeds-pas", "suspended")
    cached.forget("leeds-pas")
    await read
    assert (await cached.lookup("leeds-pas")).status == "suspended"  # type: ignore[union-attr]
