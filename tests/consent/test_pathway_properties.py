"""Property: no withheld resource leaves through any pathway, for generated inputs.

Hypothesis generates people, their consent records, a regional policy, clinical resources
(security labels, codes) and who asks (role, organisation, purpose). The records and
resources go into the hub's store over HTTP (consents the hub refuses with 422 are simply
not stored); the policy is put in force. Then, for every resource, the decision function
(``PolicySet.decider(...).decide``, with the stored consent records) says whether it is
withheld, and:

* the store's search over HTTP returns exactly the resources not withheld, with a notice
  when anything was withheld;
* a read over HTTP answers 403 for a withheld resource and 200 otherwise;
* the ReleaseGate (``open(patient=...)`` + ``Release.filter``, the federated pathway's
  interface) releases no withheld resource, and counts add up.

Runs on both databases; each example uses fresh people, so examples do not see each other.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import orjson
import pytest
from consent.test_properties import CODES, LABELS, _coding, consents, policies
from helpers import FHIR_JSON, patient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from sharedcare.consent import Decision, PolicySet, RequestContext
from sharedcare.iam.client import generate_key
from sharedcare.iam.context import AccessContext, RequestingUser
from sharedcare.iam.scopes import Grants

SETTINGS = settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
ROLES = ["R8000", "R8010"]
PURPOSES = ["TREAT", "ETREAT", "HRESCH", "HPAYMT"]
ORGS = ["RR8", "SC001"]


@st.composite
def documents(draw: st.DrawFn, people: int) -> list[tuple[int, dict[str, Any]]]:
    out = []
    for _ in range(draw(st.integers(1, 5))):
        body: dict[str, Any] = {
            "resourceType": "DocumentReference",
            "status": "current",
            "content": [
                {"attachment": {"contentType": "text/plain", "url": "http://example.org/d"}}
            ],
        }
        labels = draw(st.lists(st.sampled_from(LABELS), max_size=2, unique=True))
        if labels:
            body["meta"] = {"security": [_coding(k) for k in labels]}
        code = draw(st.none() | st.sampled_from(CODES))
        if code:
            body["type"] = {"coding": [_coding(code)]}
        out.append((draw(st.integers(0, people - 1)), body))
    return out


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, Any]:
    people = draw(st.integers(1, 3))
    return {
        "people": people,
        "consents": [draw(consents()) for _ in range(people)],
        "documents": draw(documents(people)),
        "policy": draw(policies())[1],
        "role": draw(st.sampled_from(ROLES)),
        "purpose": draw(st.sampled_from(PURPOSES)),
        "org": draw(st.sampled_from(ORGS)),
    }


async def _post(http: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any] | None:
    response = await http.post(f"/fhir/{body['resourceType']}", json=body, headers=FHIR_JSON)
    if response.status_code == 422 and body["resourceType"] == "Consent":
        return None  # a record the hub cannot honour as written is refused, not stored
    assert response.status_code == 201, response.text
    return dict(response.json())


def _gate_request(app: Any, ctx: AccessContext) -> Request:
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/fhir/DocumentReference",
        "query_string": b"",
        "headers": [],
        "app": app,
        "state": {"access": ctx, "request_id": uuid.uuid4().hex},
    }
    return Request(scope)


@pytest.fixture
def consumer(app: Any, register_system: Any, get_token: Any) -> Any:
    key = generate_key("ES384", kid="prop")
    cache: dict[tuple[str, str, str], str] = {}

    async def token(http: httpx.AsyncClient, role: str, purpose: str, org: str) -> str:
        if not cache:
            await register_system("prop-portal", key, "system/*.*")
        if (role, purpose, org) not in cache:
            claims = {
                "requesting_user": {"id": "U1", "name": "Dr P", "role": role},
                "requesting_organization": org,
                "reason_for_access": purpose,
            }
            cache[(role, purpose, org)] = await get_token(
                http, "prop-portal", key, "system/*.rs", end_user=claims
            )
        return cache[(role, purpose, org)]

    return token


@given(scenario=scenarios())
@SETTINGS
async def test_no_withheld_resource_leaves_through_the_store_or_the_gate(
    app: Any, client: httpx.AsyncClient, consumer: Any, scenario: dict[str, Any]
) -> None:
    gate = app.state.release
    previous = gate.policies
    gate.policies = PolicySet.from_text(scenario["policy"], "generated")
    try:
        await _check(app, client, consumer, scenario)
    finally:
        gate.policies = previous


async def _check(app: Any, client: httpx.AsyncClient, consumer: Any, s: dict[str, Any]) -> None:
    people = [(await _post(client, patient(f"P{i}", "Prop")))["id"] for i in range(s["people"])]  # type: ignore[index]
    stored_consents: dict[str, list[dict[str, Any]]] = {p: [] for p in people}
    for person, records in zip(people, s["consents"], strict=True):
        for record in records:
            body = {k: v for k, v in record.items() if k != "id"}
            body["patient"] = {"reference": f"Patient/{person}"}
            if (stored := await _post(client, body)) is not None:
                stored_consents[person].append(stored)
    docs = []
    for who, body in s["documents"]:
        docs.append(
            await _post(client, {**body, "subject": {"reference": f"Patient/{people[who]}"}})
        )

    # The oracle: the decision function itself, on what the store holds.
    ctx = RequestContext("prop-portal", s["role"], s["org"], s["purpose"])
    policies = app.state.release.policies
    withheld = set()
    for doc in docs:
        person = doc["subject"]["reference"].split("/")[1]
        if policies.decider(ctx, stored_consents[person]).decide(doc).decision is Decision.WITHHOLD:
            withheld.add(doc["id"])
    everything = {d["id"] for d in docs}

    token = await consumer(client, s["role"], s["purpose"], s["org"])
    auth = {"Authorization": f"Bearer {token}"}
    subjects = ",".join(f"Patient/{p}" for p in people)
    response = await client.get(
        "/fhir/DocumentReference", params={"subject": subjects, "_count": "100"}, headers=auth
    )
    assert response.status_code == 200, response.text
    entries = response.json().get("entry", [])
    got = {
        e["resource"]["id"] for e in entries if e["resource"]["resourceType"] == "DocumentReference"
    }
    assert not got & withheld, "a withheld resource left through the store's search"
    assert got == everything - withheld
    notices = [e for e in entries if e["resource"]["resourceType"] == "OperationOutcome"]
    assert bool(notices) == bool(withheld)

    # _revinclude brings the same documents in as included resources: the same filter applies.
    ids = ",".join(people)
    response = await client.get(
        "/fhir/Patient",
        params={"_id": ids, "_revinclude": "DocumentReference:subject"},
        headers=auth,
    )
    assert response.status_code == 200, response.text
    included = {
        e["resource"]["id"]
        for e in response.json().get("entry", [])
        if e["resource"]["resourceType"] == "DocumentReference"
    }
    assert not included & withheld, "a withheld resource left as an included resource"

    for doc in docs:
        read = await client.get(f"/fhir/DocumentReference/{doc['id']}", headers=auth)
        assert read.status_code == (403 if doc["id"] in withheld else 200), read.text
        if read.status_code == 403:
            assert doc["id"] not in read.text  # the notice says nothing about the resource

    # The federated pathway's interface: one person at a time, resources from "a provider".
    access = AccessContext(
        client_id="prop-portal",
        participant_organization=None,
        scopes=("system/*.rs",),
        requesting_user=RequestingUser("U1", "Dr P", s["role"]),
        requesting_organization=s["org"],
        reason_for_access=s["purpose"],
        jti="j",
        expires_at=0,
        grants=Grants.of(["system/*.rs"]),
    )
    for person in people:
        release = await app.state.release.open(
            _gate_request(app, access), patient=f"Patient/{person}"
        )
        mine = [
            orjson.loads(orjson.dumps(d))
            for d in docs
            if d["subject"]["reference"] == f"Patient/{person}"
        ]
        out = release.filter(mine)
        assert not {r["id"] for r in out} & withheld
        assert release.released + release.withheld == len(mine)
        assert (release.notice() is not None) == bool(release.withheld)
