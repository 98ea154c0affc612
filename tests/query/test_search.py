"""The federated search as a consumer sees it: one merged searchset from every provider."""

from __future__ import annotations

from typing import Any

from query.federation import NHS, Federated

HUB = "http://testserver/fhir"


def entries(bundle: dict[str, Any], mode: str = "match") -> list[dict[str, Any]]:
    return [e for e in bundle.get("entry", []) if e["search"]["mode"] == mode]


async def test_merges_every_provider_with_hub_urls(federated: Federated) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001", "community-rxf")[0]
    r = await federated.search("Observation", nhs)
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert bundle["type"] == "searchset"
    matches = entries(bundle)
    sources = {e["resource"]["meta"]["source"] for e in matches}
    assert sources == {f"{HUB}/providers/{p}" for p in ("leeds-pas", "gp-b86001", "community-rxf")}
    for e in matches:
        res = e["resource"]
        assert e["fullUrl"] == f"{res['meta']['source']}/Observation/{res['id']}"
    assert bundle["total"] == len(matches) == 12
    assert not entries(bundle, "outcome")
    for port in (s.port for s in federated.providers.values()):
        assert f":{port}" not in r.text  # no provider URL leaves the hub


async def test_the_person_can_be_named_four_ways(federated: Federated) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001", "community-rxf")[0]
    person = await federated.app.state.pix.find(nhs_number=nhs)
    http = federated.http
    answers = [
        await federated.search("Observation", nhs),
        await http.get("/fhir/Observation", params={"subject:Patient.identifier": f"{NHS}|{nhs}"}),
        await http.get("/fhir/Observation", params={"patient": f"Patient/{person.id}"}),
        await http.post(
            "/fhir/Observation/_search",
            data={"patient.identifier": f"{NHS}|{nhs}"},
        ),
    ]
    ids = [sorted(e["fullUrl"] for e in entries(r.json())) for r in answers]
    assert all(r.status_code == 200 for r in answers)
    assert ids[0] and all(i == ids[0] for i in ids)


async def test_forwards_search_parameters(federated: Federated) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001", "community-rxf")[0]
    r = await federated.search("Observation", nhs, ("date", "ge2100-01-01"))
    assert r.status_code == 200
    assert entries(r.json()) == []
    requests = await federated.requests_seen("leeds-pas")
    asked = requests[-1]
    local = federated.local_id("leeds-pas", nhs)
    assert f"patient=Patient%2F{local}" in str(asked) or f"Patient/{local}" in str(asked)
    assert "2100-01-01" in str(asked)


async def test_only_people_linked_to_a_provider_are_asked_there(federated: Federated) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001")[0]
    before = await federated.requests_seen("community-rxf")
    r = await federated.search("Observation", nhs)
    sources = {e["resource"]["meta"]["source"].rsplit("/", 1)[1] for e in entries(r.json())}
    assert sources == {"leeds-pas", "gp-b86001"}
    after = await federated.requests_seen("community-rxf")
    assert after == before


async def test_unknown_person_gets_an_empty_searchset_that_says_why(federated: Federated) -> None:
    r = await federated.search("Observation", "9434765919")
    assert r.status_code == 200
    bundle = r.json()
    assert bundle["total"] == 0 and entries(bundle) == []
    issue = entries(bundle, "outcome")[0]["resource"]["issue"][0]
    assert issue["code"] == "not-found" and "9434765919" in issue["diagnostics"]


async def test_paging_keeps_to_count_and_returns_everything_once(federated: Federated) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001", "community-rxf")[0]
    r = await federated.search("Observation", nhs, ("_count", "5"))
    seen: list[str] = []
    pages = 0
    while True:
        assert r.status_code == 200, r.text
        bundle = r.json()
        page = entries(bundle)
        assert len(page) <= 5
        seen += [e["fullUrl"] for e in page]
        pages += 1
        following = [link["url"] for link in bundle.get("link", []) if link["relation"] == "next"]
        if not following:
            break
        assert following[0].startswith(f"{HUB}/Observation?_cursor=")
        r = await federated.http.get(following[0])
    assert len(seen) == len(set(seen)) == 12
    assert pages >= 3


async def test_next_link_belongs_to_the_consumer_it_was_given_to(
    federated: Federated, consumer_token: Any
) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001", "community-rxf")[0]
    r = await federated.search("Observation", nhs, ("_count", "2"))
    link = next(link["url"] for link in r.json()["link"] if link["relation"] == "next")
    other = await consumer_token("narrow", "system/Patient.rs")
    tampered = link[:-3] + ("AAA" if not link.endswith("AAA") else "BBB")
    forged = await federated.http.get(tampered)
    assert forged.status_code == 410 and forged.json()["resourceType"] == "OperationOutcome"
    wrong_type = await federated.http.get(link.replace("/Observation?", "/Condition?"))
    assert wrong_type.status_code == 400
    stolen = await federated.http.get(link, headers={"Authorization": f"Bearer {other}"})
    assert stolen.status_code == 403  # the narrow consumer may not search Observation at all


async def test_every_query_is_audited_with_the_providers_asked(
    federated: Federated, consumer_token: Any
) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001")[0]
    person = await federated.app.state.pix.find(nhs_number=nhs)
    await federated.search("Condition", nhs)
    auditor = {"Authorization": f"Bearer {await consumer_token(scope='system/AuditEvent.rs')}"}
    r = await federated.http.get(
        "/fhir/AuditEvent", params={"patient": f"Patient/{person.id}"}, headers=auditor
    )
    events = [e["resource"] for e in r.json().get("entry", [])]
    assert events
    text = str(events[-1])
    assert "leeds-pas" in text and "gp-b86001" in text


async def test_document_reference_routing(federated: Federated) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001", "community-rxf")[0]
    person = await federated.app.state.pix.find(nhs_number=nhs)
    by_nhs = await federated.search("DocumentReference", nhs)
    assert by_nhs.status_code == 200
    assert {e["resource"]["meta"]["source"] for e in entries(by_nhs.json())}  # from providers
    # Any other DocumentReference search is the hub's own store (documents uploaded to the hub).
    own = await federated.http.get(
        "/fhir/DocumentReference", params={"patient": f"Patient/{person.id}"}
    )
    assert own.status_code == 200
    assert all("/providers/" not in e["fullUrl"] for e in own.json().get("entry", []))


async def test_metrics_are_recorded(federated: Federated) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001", "community-rxf")[0]
    await federated.search("Observation", nhs)
    text = (await federated.http.get("/metrics")).text
    for name in (
        "sharedcare_query_internal_round_trip_seconds_count",
        # Edges around the 10 ms target, so its p99 is read, not interpolated over 10-25 ms.
        'sharedcare_query_internal_round_trip_seconds_bucket{le="0.0075"}',
        'sharedcare_query_internal_round_trip_seconds_bucket{le="0.01"}',
        'sharedcare_query_internal_round_trip_seconds_bucket{le="0.0125"}',
        'sharedcare_query_provider_round_trip_seconds_count{provider="leeds-pas"}',
        'sharedcare_query_provider_requests_total{outcome="ok",provider="gp-b86001"}',
        'sharedcare_query_requests_total{consumer="portal",outcome="complete"}',
        "sharedcare_query_resources_per_response_sum",
        "sharedcare_query_providers_per_query_sum",
        "sharedcare_query_response_bytes_count",
    ):
        assert name in text, name
