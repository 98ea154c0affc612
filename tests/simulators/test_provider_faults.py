"""The provider simulator's faults (latency, errors, timeouts, malformed answers) and its CLI."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from fhir.resources.R4B.bundle import Bundle
from pydantic import ValidationError
from typer.testing import CliRunner

from sharedcare.simulators.cli import app as simulate_app
from sharedcare.simulators.provider import ProviderConfig, ProviderFaults, ProviderServer

StartProvider = Callable[..., ProviderServer]


@pytest.fixture
def start() -> Iterator[StartProvider]:
    """Start providers with the given config fields; all stopped at the end of the test."""
    servers: list[ProviderServer] = []

    def run(**fields: Any) -> ProviderServer:
        fields = {"id": "faulty", "people": 6, "resource_bytes": 0, **fields}
        server = ProviderServer(ProviderConfig(**fields))
        server.start()
        servers.append(server)
        return server

    yield run
    for server in servers:
        server.stop()


def observations(server: ProviderServer, http: httpx.Client) -> httpx.Response:
    return http.get(f"{server.url}/Observation", params={"patient": server.people[0].local_id})


def is_valid_searchset(response: httpx.Response) -> bool:
    try:
        Bundle.model_validate(orjson.loads(response.content))
    except (orjson.JSONDecodeError, ValidationError, ValueError):
        return False
    return response.headers["content-type"].startswith("application/fhir+json")


def test_error_rate_answers_5xx_with_an_operation_outcome(start: StartProvider) -> None:
    server = start(error_rate=1.0, fault_seed=1)
    with httpx.Client(timeout=5) as http:
        statuses = set()
        for _ in range(12):
            response = observations(server, http)
            statuses.add(response.status_code)
            body = response.json()
            assert body["resourceType"] == "OperationOutcome"
            assert body["issue"][0]["code"] == "exception"
        read = http.get(f"{server.url}/Patient/{server.people[0].local_id}")
        assert read.status_code >= 500
        assert http.get(f"{server.url}/metadata").status_code == 200  # never faulted
    assert statuses == {500, 502, 503}


def test_timeout_hangs_past_the_client_deadline(start: StartProvider) -> None:
    server = start(timeout_rate=1.0, hang_s=20)
    with httpx.Client(timeout=0.5) as http:
        began = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            observations(server, http)
        assert time.monotonic() - began >= 0.5
    short = start(timeout_rate=1.0, hang_s=0.2)
    with httpx.Client(timeout=5) as http:
        response = observations(short, http)  # a patient client eventually gets a 504
    assert response.status_code == 504
    assert response.json()["issue"][0]["code"] == "timeout"


def test_malformed_answers_come_in_every_kind_and_none_is_valid_fhir(
    start: StartProvider,
) -> None:
    server = start(malformed_rate=1.0, fault_seed=7)
    kinds = set()
    with httpx.Client(timeout=5) as http:
        for _ in range(20):
            response = observations(server, http)
            assert response.status_code == 200
            assert not is_valid_searchset(response)
            kinds.add(response.headers["content-type"].split(";")[0])
    assert kinds == {"application/fhir+json", "text/html", "application/json"}


def test_latency_is_added_before_answering(start: StartProvider) -> None:
    server = start(latency_ms=(300, 300))
    with httpx.Client(timeout=5) as http:
        observations(server, http)  # warm the connection and the person's records
        began = time.monotonic()
        assert observations(server, http).status_code == 200
        assert time.monotonic() - began >= 0.3


def test_latency_distribution_has_the_configured_median_and_p99() -> None:
    faults = ProviderFaults(latency_ms=(50, 400))
    rng = random.Random(3)
    draws = sorted(faults.delay_ms(rng) for _ in range(20_000))
    assert 45 <= draws[len(draws) // 2] <= 55
    assert 340 <= draws[int(len(draws) * 0.99)] <= 460
    assert ProviderFaults(latency_ms=(80, 0)).delay_ms(rng) == 80  # p99 <= median: fixed


def _statuses(server: ProviderServer, n: int) -> list[int]:
    with httpx.Client(timeout=5) as http:
        return [observations(server, http).status_code for _ in range(n)]


@pytest.mark.parametrize("fault_seed", [None, 11])
def test_faults_are_reproducible_from_the_seed(
    start: StartProvider, fault_seed: int | None
) -> None:
    fields = {"error_rate": 0.3, "malformed_rate": 0.2, "fault_seed": fault_seed}
    first = _statuses(start(**fields), 30)
    again = _statuses(start(**fields), 30)
    assert first == again
    assert 200 in first and any(s >= 500 for s in first)
    other = _statuses(start(**{**fields, "fault_seed": 12345}), 30)
    assert other != first


def test_faults_change_at_runtime_through_the_admin_api(start: StartProvider) -> None:
    server = start()
    with httpx.Client(timeout=5) as http:
        assert observations(server, http).status_code == 200
        changed = http.put(f"{server.url}/_admin/faults", json={"error_rate": 1.0})
        assert changed.status_code == 200 and changed.json()["error_rate"] == 1.0
        assert observations(server, http).status_code >= 500
        assert http.get(f"{server.url}/_admin/faults").json()["error_rate"] == 1.0
        for bad in ({"error_rate": 2}, {"colour": "red"}, [1], {"latency_ms": [1]}):
            refused = http.put(f"{server.url}/_admin/faults", json=bad)
            assert refused.status_code == 400, bad
            assert refused.json()["resourceType"] == "OperationOutcome"
        server.state.set_faults(error_rate=0.0)  # the in-process way
        assert observations(server, http).status_code == 200
        log = http.get(f"{server.url}/_admin/requests").json()
    assert log[-1] == f"GET /Observation?patient={server.people[0].local_id}"


@pytest.mark.parametrize(
    "fields",
    [
        {"error_rate": 1.5},
        {"error_rate": 0.6, "timeout_rate": 0.6},
        {"latency_ms": (-1, 10)},
        {"share": 1.2},
        {"id": "no spaces"},
        {"default_count": 0},
    ],
)
def test_invalid_configuration_is_refused(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ProviderConfig(**{"id": "x", **fields})


# -- the CLI ---------------------------------------------------------------------------------
def test_cli_starts_a_provider_prints_its_url_and_stops_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sharedcare.cli", "simulate", "provider", "--id", "cli-pas",
         "--port", "0", "--people", "12", "--latency-ms", "1,5", "--resources-per-search", "3"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        with httpx.Client(timeout=10) as http:
            for _ in range(100):  # the URL is printed just before uvicorn accepts
                try:
                    statement = http.get(f"{url}/metadata")
                    break
                except httpx.ConnectError:
                    time.sleep(0.05)
            assert statement.json()["resourceType"] == "CapabilityStatement"
            patients = http.get(f"{url}/Patient").json()
            local = patients["entry"][0]["resource"]["id"]
            assert http.get(f"{url}/Observation", params={"patient": local}).json()["total"] == 3
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=15)
    assert proc.returncode == 0, err
    assert "Provider simulator cli-pas" in err and "Stopped." in err


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--latency-ms", "fast"], "could not convert"),
        (["--latency-ms", "1,2,3"], "latency_ms"),
        (["--error-rate", "0.7", "--timeout-rate", "0.7"], "must not exceed 1"),
        (["--register-with", "http://127.0.0.1:1"], "--key"),
    ],
)
def test_cli_refuses_bad_options(args: list[str], says: str) -> None:
    result = CliRunner().invoke(simulate_app, ["provider", "--id", "x", "--port", "0", *args])
    assert result.exit_code == 2
    assert says in result.output
