"""The store's patient-data pathways through the release gate: consent-filtered and audited.

What a consumer would notice: an opted-out person's data does not come back from a read, a
search (includes too), a history or a batch; the response says something was withheld; a
sensitive resource comes back labelled for direct care and not at all for other purposes;
every release and refusal is on the audit trail the moment the response arrives; auditors
(and only they) can search that trail by patient, user, organisation and date.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from helpers import FHIR_JSON, patient

from sharedcare.app import create_app
from sharedcare.consent.notice import WITHHELD_CODE
from sharedcare.iam.client import generate_key
from sharedcare.settings import Settings

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
SCOPE = "http://terminology.hl7.org/CodeSystem/consentscope"
CONSUMER_SCOPES = "system/*.rs system/Consent.cu"
AUDITOR_SCOPES = "system/AuditEvent.rs"


def consent(patient_id: str, rule: str = "OPTOUT", **extra: Any) -> dict[str, Any]:
    body = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {"coding": [{"system": SCOPE, "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{patient_id}"},
        "policyRule": {"coding": [{"system": ACT, "code": rule}]},
    }
    body.update(extra)
    return body


def observation(patient_id: str, *labels: str, text: str = "obs") -> dict[str, Any]:
    """A clinical document about the person (the hub's store keeps DocumentReferences)."""
    body: dict[str, Any] = {
        "resourceType": "DocumentReference",
        "status": "current",
        "type": {"coding": [{"system": "http://loinc.org", "code": "18842-5"}], "text": text},
        "subject": {"reference": f"Patient/{patient_id}"},
        "content": [{"attachment": {"contentType": "text/plain", "url": "http://example.org/doc"}}],
    }
    if labels:
        body["meta"] = {"security": [{"system": ACT, "code": code} for code in labels]}
    return body


async def create(http: httpx.AsyncClient, body: dict[str, Any]) -> str:
    response = await http.post(f"/fhir/{body['resourceType']}", json=body, headers=FHIR_JSON)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def ids(bundle: dict[str, Any], rtype: str | None = None) -> set[str]:
    return {
        e["resource"]["id"]
        for e in bundle.get("entry", [])
        if e.get("resource", {}).get("resourceType") not in (None, "OperationOutcome")
        and (rtype is None or e["resource"]["resourceType"] == rtype)
    }


def withheld_notices(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        issue
        for e in bundle.get("entry", [])
        if e.get("resource", {}).get("resourceType") == "OperationOutcome"
        for issue in e["resource"]["issue"]
        if issue.get("details", {}).get("coding", [{}])[0].get("code") == WITHHELD_CODE
    ]


async def trail(app: Any, **params: str) -> list[dict[str, Any]]:
    """AuditEvents straight from the trail (what an auditor would find)."""
    import orjson

    items = [(k.replace("_", "-") if k != "_count" else k, v) for k, v in params.items()]
    result = await app.state.trail.search([*items, ("_count", "1000")])
    return [e["resource"] for e in orjson.loads(result).get("entry", [])]


def detail(event: dict[str, Any], kind: str) -> str | None:
    for entity in event["entity"]:
        for d in entity.get("detail", []):
            if d["type"] == kind:
                return str(d["valueString"])
    return None


@pytest_asyncio.fixture
async def people(client: httpx.AsyncClient) -> dict[str, str]:
    """Ann (opted out), Bob (no consent record) and their observations."""
    out = {
        "ann": await create(client, patient("Ann", "A")),
        "bob": await create(client, patient("Bob", "B")),
    }
    out["ann-obs-1"] = await create(client, observation(out["ann"]))
    out["ann-obs-2"] = await create(client, observation(out["ann"]))
    out["bob-obs"] = await create(client, observation(out["bob"]))
    out["bob-hiv"] = await create(client, observation(out["bob"], "HIV"))
    out["ann-consent"] = await create(client, consent(out["ann"], "OPTOUT"))
    return out


@pytest_asyncio.fixture
async def consumer(app: Any, register_system: Any, get_token: Any) -> Any:
    """``await consumer(scopes, **end_user)``: an HTTP client for a consumer with its own token."""
    key = generate_key("ES384", kid="consumer")
    registered: set[str] = set()
    clients: list[httpx.AsyncClient] = []

    async def make(
        scopes: str = CONSUMER_SCOPES,
        *,
        client_id: str = "portal",
        role: str = "R8000",
        purpose: str = "TREAT",
        org: str = "RR8",
        end_user: bool = True,
    ) -> httpx.AsyncClient:
        if client_id not in registered:
            await register_system(client_id, key, "system/*.* " + AUDITOR_SCOPES)
            registered.add(client_id)
        http = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver"
        )
        clients.append(http)
        claims = {
            "requesting_user": {"id": f"U-{role}", "name": "Dr Who", "role": role},
            "requesting_organization": org,
            "reason_for_access": purpose,
        }
        token = await get_token(http, client_id, key, scopes, end_user=claims if end_user else None)
        http.headers["Authorization"] = f"Bearer {token}"
        return http

    yield make
    for http in clients:
        await http.aclose()


async def test_search_withholds_an_opted_out_persons_data_and_says_so(
    app: Any, people: dict[str, str], consumer: Any
) -> None:
    http = await consumer()
    response = await http.get("/fhir/DocumentReference", headers={"X-Request-ID": "req-search-1"})
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert ids(bundle) == {people["bob-obs"], people["bob-hiv"]}
    [notice] = withheld_notices(bundle)
    assert notice["code"] == "suppressed" and "2 resources were withheld" in notice["diagnostics"]
    outcome = [e for e in bundle["entry"] if e["resource"]["resourceType"] == "OperationOutcome"]
    assert outcome[0]["search"] == {"mode": "outcome"}
    # The sensitive one is released to a clinician for direct care, labelled.
    hiv = next(
        e["resource"] for e in bundle["entry"] if e["resource"].get("id") == people["bob-hiv"]
    )
    assert {"system": ACT, "code": "NORDSCLCD"} in [
        {"system": c["system"], "code": c["code"]} for c in hiv["meta"]["security"]
    ]
    # On the trail already: released 2, withheld 2, for this request id.
    [event] = [
        e
        for e in await trail(app, subtype="search-type")
        if any(
            en.get("what", {}).get("identifier", {}).get("value") == "req-search-1"
            for en in e["entity"]
        )
    ]
    assert (detail(event, "released"), detail(event, "withheld")) == ("2", "2")
    assert event["outcome"] == "0"
    assert {a.get("altId") for a in event["agent"]} >= {"U-R8000", "RR8"}


async def test_sensitive_data_is_withheld_for_purposes_other_than_direct_care(
    people: dict[str, str], consumer: Any
) -> None:
    http = await consumer(purpose="HOPERAT", role="R8010")
    bundle = (
        await http.get("/fhir/DocumentReference", params={"subject": f"Patient/{people['bob']}"})
    ).json()
    assert ids(bundle) == {people["bob-obs"]}
    assert len(withheld_notices(bundle)) == 1


async def test_includes_and_revincludes_are_filtered_too(
    people: dict[str, str], consumer: Any
) -> None:
    http = await consumer()
    bundle = (
        await http.get("/fhir/Patient", params={"_revinclude": "DocumentReference:subject"})
    ).json()
    assert people["ann"] not in ids(bundle) and people["bob"] in ids(bundle, "Patient")
    assert ids(bundle, "DocumentReference") == {people["bob-obs"], people["bob-hiv"]}
    bundle = (
        await http.get("/fhir/DocumentReference", params={"_include": "DocumentReference:subject"})
    ).json()
    assert ids(bundle, "Patient") == {people["bob"]}


@pytest.mark.parametrize(
    "path",
    ["DocumentReference/{ann-obs-1}", "DocumentReference/{ann-obs-1}/_history/1", "Patient/{ann}"],
)
async def test_a_withheld_read_is_403_with_the_notice_and_audited(
    app: Any, people: dict[str, str], consumer: Any, path: str
) -> None:
    http = await consumer()
    url = "/fhir/" + path.format(**people)
    response = await http.get(url, headers={"X-Request-ID": "req-read-1"})
    assert response.status_code == 403
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert body["issue"][0]["code"] == "suppressed"
    assert body["issue"][0]["details"]["coding"][0]["code"] == WITHHELD_CODE
    assert "obs" not in response.text  # nothing of the resource itself
    events = [e for e in await trail(app, outcome="4") if "req-read-1" in str(e["entity"])]
    assert len(events) == 1 and detail(events[0], "withheld") == "1"


async def test_a_released_read_is_audited_before_the_response(
    app: Any, people: dict[str, str], consumer: Any
) -> None:
    http = await consumer()
    response = await http.get(
        f"/fhir/DocumentReference/{people['bob-obs']}", headers={"X-Request-ID": "req-read-2"}
    )
    assert response.status_code == 200 and response.json()["id"] == people["bob-obs"]
    [event] = [
        e
        for e in await trail(app, patient=f"Patient/{people['bob']}")
        if "req-read-2" in str(e["entity"])
    ]
    assert event["subtype"][0]["code"] == "read" and event["action"] == "R"
    assert event["meta"]["profile"][0].endswith("IHE.BasicAudit.PatientRead")


async def test_history_drops_withheld_versions_and_says_so(
    people: dict[str, str], consumer: Any
) -> None:
    http = await consumer()
    bundle = (await http.get("/fhir/DocumentReference/_history")).json()
    assert ids(bundle) == {people["bob-obs"], people["bob-hiv"]}
    assert len(withheld_notices(bundle)) == 1
    bundle = (await http.get(f"/fhir/DocumentReference/{people['ann-obs-1']}/_history")).json()
    assert ids(bundle) == set() and len(withheld_notices(bundle)) == 1


async def test_batch_get_entries_are_filtered(people: dict[str, str], consumer: Any) -> None:
    http = await consumer()
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [
            {"request": {"method": "GET", "url": f"DocumentReference/{people['ann-obs-1']}"}},
            {"request": {"method": "GET", "url": f"DocumentReference/{people['bob-obs']}"}},
            {"request": {"method": "GET", "url": "DocumentReference?_count=50"}},
        ],
    }
    response = await http.post("/fhir", json=batch, headers=FHIR_JSON)
    assert response.status_code == 200, response.text
    first, second, third = response.json()["entry"]
    assert first["response"]["status"].startswith("403") and "resource" not in first
    assert second["resource"]["id"] == people["bob-obs"]
    assert ids(third["resource"]) == {people["bob-obs"], people["bob-hiv"]}
    assert len(withheld_notices(third["resource"])) == 1


async def test_an_emergency_overrides_the_opt_out_labelled_and_flagged(
    app: Any, people: dict[str, str], consumer: Any
) -> None:
    http = await consumer(purpose="ETREAT", role="R8000")
    response = await http.get(
        f"/fhir/DocumentReference/{people['ann-obs-1']}", headers={"X-Request-ID": "req-em"}
    )
    assert response.status_code == 200
    codes = {c["code"] for c in response.json()["meta"]["security"]}
    assert {"emergency-access", "NORDSCLCD"} <= codes
    [event] = [e for e in await trail(app) if "req-em" in str(e["entity"])]
    assert "review" in event["outcomeDesc"]


async def test_a_request_without_end_user_is_refused_and_audited(
    app: Any, people: dict[str, str], consumer: Any
) -> None:
    http = await consumer(end_user=False, client_id="batch-system")
    response = await http.get("/fhir/DocumentReference", headers={"X-Request-ID": "req-no-user"})
    assert response.status_code == 403
    [event] = [e for e in await trail(app, outcome="4") if "req-no-user" in str(e["entity"])]
    assert "end-user" in event["outcomeDesc"] or "requesting_user" in event["outcomeDesc"]
    # Directory data needs no end user, and is not audited as patient data.
    assert (await http.get("/fhir/Organization")).status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"scope": {"coding": [{"system": SCOPE, "code": "research"}]}}, "privacy consents only"),
        ({"policyRule": {"coding": [{"system": ACT, "code": "MAYBE"}]}}, "Unknown policyRule"),
        (
            {"provision": {"type": "deny", "dataPeriod": {"start": "2020"}}},
            "dataPeriod is not supported",
        ),
    ],
    ids=["scope", "policyRule", "dataPeriod"],
)
async def test_consent_writes_are_checked(
    client: httpx.AsyncClient, people: dict[str, str], body: dict[str, Any], message: str
) -> None:
    response = await client.post(
        "/fhir/Consent", json=consent(people["bob"], "OPTIN", **body), headers=FHIR_JSON
    )
    assert response.status_code == 422, response.text
    assert message in response.json()["issue"][0]["diagnostics"]
    put = await client.put(
        f"/fhir/Consent/{people['ann-consent']}",
        json={**consent(people["ann"], "OPTIN", **body), "id": people["ann-consent"]},
        headers=FHIR_JSON,
    )
    assert put.status_code == 422


async def test_consent_writes_are_versioned_audited_and_take_effect(
    app: Any, client: httpx.AsyncClient, people: dict[str, str], consumer: Any
) -> None:
    cid = people["ann-consent"]
    response = await client.put(
        f"/fhir/Consent/{cid}",
        json={**consent(people["ann"], "OPTIN"), "id": cid},
        headers=FHIR_JSON,
    )
    assert response.status_code == 200 and response.json()["meta"]["versionId"] == "2"
    [event] = [e for e in await trail(app, subtype="update")]
    assert event["action"] == "U" and f"Consent/{cid}" in str(event["entity"])
    http = await consumer()
    assert (await http.get(f"/fhir/DocumentReference/{people['ann-obs-1']}")).status_code == 200


async def test_the_audit_trail_is_for_auditors(
    app: Any, people: dict[str, str], consumer: Any
) -> None:
    clinician = await consumer()
    await clinician.get("/fhir/DocumentReference", params={"subject": f"Patient/{people['bob']}"})
    # A wildcard does not reach the trail; the refusal is itself audited.
    refused = await clinician.get("/fhir/AuditEvent")
    assert (
        refused.status_code == 403 and AUDITOR_SCOPES in refused.json()["issue"][0]["diagnostics"]
    )
    auditor = await consumer(AUDITOR_SCOPES, client_id="auditor", role="R0001", purpose="HSYSADMIN")
    for params in (
        {"patient": f"Patient/{people['bob']}"},
        {"altid": "U-R8000"},  # the user
        {"altid": "RR8"},  # the organisation
        {"date": "ge2020-01-01", "subtype": "search-type"},
    ):
        response = await auditor.get("/fhir/AuditEvent", params=params)
        assert response.status_code == 200, (params, response.text)
        assert ids(response.json()), params
    # Nobody changes the trail through the API.
    some = next(iter(ids((await auditor.get("/fhir/AuditEvent")).json())))
    for method in ("PUT", "DELETE"):
        answer = await auditor.request(
            method, f"/fhir/AuditEvent/{some}", json={"resourceType": "AuditEvent"}
        )
        assert answer.status_code in (403, 405), method
    writer = await consumer("system/*.cruds", client_id="writer")
    create = await writer.post(
        "/fhir/AuditEvent", json={"resourceType": "AuditEvent"}, headers=FHIR_JSON
    )
    assert create.status_code == 405 and create.headers["Allow"] == "GET"


async def test_policy_file_reloads_and_a_bad_file_keeps_the_old_policy(
    settings: Settings, tmp_path: Path
) -> None:
    from importlib import resources

    text = resources.files("sharedcare.consent").joinpath("default-policy.toml").read_text()
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    app = create_app(
        settings.model_copy(
            update={"consent_policy_file": policy, "consent_policy_check_seconds": 0}
        )
    )
    async with app.router.lifespan_context(app):
        gate = app.state.release
        assert gate.policies.version == "sharedcare-default-2025.1"
        policy.write_text(
            text.replace('version = "sharedcare-default-2025.1"', 'version = "north-2026.1"') + "\n"
        )
        assert gate.reload_if_changed() and gate.policies.version == "north-2026.1"
        policy.write_text(text.replace('decision = "withhold"', 'decision = "maybe"', 1) + "\n\n")
        assert not gate.reload_if_changed()
        assert gate.policies.version == "north-2026.1"  # the bad file changed nothing


async def test_bundles_cannot_store_bad_consents_or_change_the_trail(
    client: httpx.AsyncClient, people: dict[str, str], consumer: Any
) -> None:
    bad = consent(people["bob"], "OPTIN", provision={"type": "deny", "dataPeriod": {"start": "2020"}})
    transaction = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {"resource": patient("Cy", "C"), "request": {"method": "POST", "url": "Patient"}},
            {"resource": bad, "request": {"method": "POST", "url": "Consent"}},
        ],
    }
    response = await client.post("/fhir", json=transaction, headers=FHIR_JSON)
    assert response.status_code == 422, response.text
    assert "Bundle.entry[1]" in str(response.json()["issue"][0].get("expression"))
    assert (await client.get("/fhir/Patient", params={"family": "Cy"})).json().get("total") == 0
    writer = await consumer("system/*.cruds", client_id="writer")
    batch = {
        "resourceType": "Bundle",
        "type": "batch",
        "entry": [{"request": {"method": "DELETE", "url": "AuditEvent/anything"}}],
    }
    response = await writer.post("/fhir", json=batch, headers=FHIR_JSON)
    assert response.status_code == 405
