"""``GET /fhir/providers/{P}/{Type}/{id}``: a provider's resource through the hub."""

from __future__ import annotations

from typing import Any

from query.federation import Federated

HUB = "http://testserver/fhir"


async def test_full_urls_of_a_search_can_be_read(federated: Federated, consumer_token: Any) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001", "community-rxf")[0]
    bundle = (await federated.search("Observation", nhs)).json()
    entry = next(e for e in bundle["entry"] if e["search"]["mode"] == "match")
    r = await federated.http.get(entry["fullUrl"])
    assert r.status_code == 200, r.text
    resource = r.json()
    assert resource["id"] == entry["resource"]["id"]
    assert resource["meta"]["source"] == entry["resource"]["meta"]["source"]
    # The subject reference resolves, against the fullUrl, to the provider's Patient via the hub.
    ref = resource["subject"]["reference"]
    assert ref.startswith(("Patient/", f"{HUB}/providers/"))
    provider_base = entry["fullUrl"].rsplit("/Observation/", 1)[0]
    patient = await federated.http.get(
        f"{provider_base}/{ref}" if ref.startswith("Patient/") else ref
    )
    assert patient.status_code == 200, patient.text
    assert patient.json()["resourceType"] == "Patient"
    person = await federated.app.state.pix.find(nhs_number=nhs)
    auditor = {"Authorization": f"Bearer {await consumer_token(scope='system/AuditEvent.rs')}"}
    events = await federated.http.get(
        "/fhir/AuditEvent",
        params={"patient": f"Patient/{person.id}", "subtype": "read"},
        headers=auditor,
    )
    assert len(events.json().get("entry", [])) >= 2


async def test_reading_a_missing_resource_is_404(federated: Federated) -> None:
    r = await federated.http.get("/fhir/providers/leeds-pas/Observation/does-not-exist")
    assert r.status_code == 404
    assert "leeds-pas" in r.json()["issue"][0]["diagnostics"]


async def test_a_failing_provider_read_is_a_gateway_error(federated: Federated) -> None:
    federated.faults("gp-b86001", timeout_rate=1.0, hang_s=3)
    r = await federated.http.get(
        "/fhir/providers/gp-b86001/Observation/x1", headers={"X-Provider-Wait-Time": "200"}
    )
    assert r.status_code == 504
    assert "127.0.0.1" not in r.text
