"""A provider that is slow, failing, talking nonsense or gone never breaks the merged answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import pytest
from query.federation import NHS, Federated

ALL = ("leeds-pas", "gp-b86001", "community-rxf")


def outcomes(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        issue
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == "outcome"
        for issue in e["resource"]["issue"]
    ]


def sources(bundle: dict[str, Any]) -> set[str]:
    return {
        e["resource"]["meta"]["source"].rsplit("/", 1)[1]
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == "match"
    }


@pytest.mark.parametrize(
    ("faults", "code", "detail"),
    [
        ({"timeout_rate": 1.0, "hang_s": 5}, "timeout", "provider-timeout"),
        ({"error_rate": 1.0}, "exception", "provider-error"),
        ({"malformed_rate": 1.0}, "structure", "provider-invalid"),
    ],
)
async def test_an_impaired_provider_becomes_an_outcome_entry(
    federated: Federated, faults: dict[str, Any], code: str, detail: str
) -> None:
    nhs = federated.people_at(*ALL)[0]
    federated.faults("gp-b86001", **faults)
    started = time.monotonic()
    # The healthy providers answer in ~50 ms; 1 s leaves room for a slow machine's stalls.
    r = await federated.search("Observation", nhs, headers={"X-Provider-Wait-Time": "1000"})
    assert time.monotonic() - started < 2.5
    assert r.status_code == 200, r.text
    bundle = r.json()
    assert sources(bundle) == {"leeds-pas", "community-rxf"}
    [issue] = outcomes(bundle)
    assert issue["code"] == code
    assert issue["details"]["coding"][0]["code"] == detail
    assert "gp-b86001" in issue["diagnostics"]
    assert "total" not in bundle  # not every provider gave one
    text = r.text
    assert "Traceback" not in text and "http://127.0.0.1" not in text


async def test_a_provider_that_is_gone_is_unavailable(federated: Federated) -> None:
    nhs = federated.people_at(*ALL)[0]
    server = federated.providers["community-rxf"]
    port = server.port
    server.stop()
    try:
        r = await federated.search("Observation", nhs)
        [issue] = outcomes(r.json())
        assert issue["details"]["coding"][0]["code"] == "provider-unavailable"
        assert sources(r.json()) == {"leeds-pas", "gp-b86001"}
    finally:
        server.port = port
        server.start()


@pytest.mark.parametrize("header", ["X-Provider-Wait-Time", "YHCR-Provider-Wait-time"])
async def test_the_wait_can_be_set_per_request(federated: Federated, header: str) -> None:
    nhs = federated.people_at(*ALL)[0]
    federated.faults("leeds-pas", latency_ms=[400, 400])
    r = await federated.search("Observation", nhs, headers={header: "100"})
    assert "leeds-pas" not in sources(r.json())
    assert outcomes(r.json())[0]["code"] == "timeout"
    r = await federated.search("Observation", nhs, headers={header: "1200"})
    assert sources(r.json()) == set(ALL)


async def test_the_wait_counts_from_when_the_hub_received_the_request(federated: Federated) -> None:
    """Time the hub spends before asking (here: a request body that arrives late) comes out
    of the providers' wait, so the consumer's own wait stays bounded by it."""
    nhs = federated.people_at(*ALL)[0]
    federated.faults("leeds-pas", latency_ms=[400, 400])
    form = urlencode({"patient.identifier": f"{NHS}|{nhs}"}).encode()
    headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Provider-Wait-Time": "1000"}

    async def late_body() -> AsyncIterator[bytes]:
        await asyncio.sleep(0.7)
        yield form

    for _ in range(4):  # more than query_breaker_failures (3 in the fixture)
        r = await federated.http.post(
            "/fhir/Observation/_search", content=late_body(), headers=headers
        )
        assert r.status_code == 200, r.text
        assert "leeds-pas" not in sources(r.json())  # 400 ms latency, 300 ms of the wait left
        [issue] = [i for i in outcomes(r.json()) if "leeds-pas" in i["diagnostics"]]
        assert issue["code"] == "timeout"
        assert "ms left of the 1000 ms wait" in issue["diagnostics"]
    # The hub's lateness was not held against the provider: its breaker is still closed,
    # and given the whole 1000 ms it answers.
    r = await federated.http.post("/fhir/Observation/_search", content=form, headers=headers)
    assert "leeds-pas" in sources(r.json())


async def test_the_wait_override_is_capped(federated: Federated) -> None:
    nhs = federated.people_at(*ALL)[0]
    federated.faults("leeds-pas", timeout_rate=1.0, hang_s=10)
    started = time.monotonic()
    r = await federated.search("Observation", nhs, headers={"X-Provider-Wait-Time": "60000"})
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert elapsed < 2.0 + 1.0  # query_max_provider_wait_ms (2000 here), not 60 s
    assert "2000 ms" in outcomes(r.json())[0]["diagnostics"]


async def test_the_circuit_breaker_stops_asking_a_failing_provider(federated: Federated) -> None:
    nhs = federated.people_at(*ALL)[0]
    federated.faults("gp-b86001", error_rate=1.0)
    for _ in range(3):  # query_breaker_failures=3 in the fixture
        await federated.search("Observation", nhs)
    before = await federated.requests_seen("gp-b86001")
    r = await federated.search("Observation", nhs)
    assert outcomes(r.json())[0]["details"]["coding"][0]["code"] == "provider-circuit-open"
    assert await federated.requests_seen("gp-b86001") == before  # not asked at all
    assert sources(r.json()) == {"leeds-pas", "community-rxf"}
