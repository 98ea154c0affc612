"""The PDS simulator over a real socket: PDS-shaped reads and searches, faults, admin, CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from typer.testing import CliRunner

from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM, is_valid_nhs_number
from sharedcare.simulators.cli import app as simulate_app
from sharedcare.simulators.pds import (
    Faults,
    SimulatorServer,
    create_pds_app,
    generated_nhs_numbers,
    pds_state,
)
from sharedcare.simulators.people import people

PEOPLE, SEED = 40, 2026
NUMBERS = generated_nhs_numbers(PEOPLE, SEED)
UNKNOWN = "9434765919"  # valid by Modulus 11, not among the generated people
StartPds = Callable[..., SimulatorServer]


@pytest.fixture(scope="module")
def pds() -> Iterator[SimulatorServer]:
    with SimulatorServer(create_pds_app(PEOPLE, SEED)) as server:
        yield server


@pytest.fixture
def start_pds() -> Iterator[StartPds]:
    """Start simulators with given faults; all stopped at the end of the test."""
    servers: list[SimulatorServer] = []

    def start(faults: Faults, people: int = 5) -> SimulatorServer:
        server = SimulatorServer(create_pds_app(people, SEED, faults))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def issue_code(body: dict[str, Any]) -> str:
    assert body["resourceType"] == "OperationOutcome"
    return str(body["issue"][0]["details"]["coding"][0]["code"])


def test_generated_people_are_the_seeded_population_and_prefix_stable() -> None:
    expected = [p["identifier"][0]["value"] for p in people(PEOPLE, SEED)]
    assert NUMBERS == expected
    assert generated_nhs_numbers(10, SEED) == NUMBERS[:10]
    assert UNKNOWN not in NUMBERS and all(is_valid_nhs_number(n) for n in NUMBERS)


def test_read_returns_a_pds_shaped_patient(pds: SimulatorServer) -> None:
    source = next(iter(people(1, SEED)))
    number = NUMBERS[0]
    response = httpx.get(f"{pds.url}/Patient/{number}", headers={"X-Request-ID": "req-1"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/fhir+json")
    assert response.headers["x-request-id"] == "req-1"
    assert response.headers["etag"] == 'W/"1"'
    patient = response.json()
    assert patient["resourceType"] == "Patient" and patient["id"] == number
    assert {"system": NHS_NUMBER_SYSTEM, "value": number} in patient["identifier"]
    assert patient["name"] == source["name"]
    assert patient["birthDate"] == source["birthDate"] and patient["gender"] == source["gender"]
    assert patient["address"][0]["postalCode"] == source["address"][0]["postalCode"]


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        (f"/Patient/{UNKNOWN}", 404, "RESOURCE_NOT_FOUND"),
        ("/Patient/9434765918", 400, "INVALID_RESOURCE_ID"),  # check digit wrong
        ("/Patient/943%20476%205919", 400, "INVALID_RESOURCE_ID"),  # spaced forms are not ids
        ("/Patient/abc", 400, "INVALID_RESOURCE_ID"),
        ("/Patient", 400, "INVALID_SEARCH_DATA"),  # no identifier
        ("/Patient?identifier=https://example.org/mrn|123", 400, "INVALID_SEARCH_DATA"),
        ("/Observation/1", 404, "RESOURCE_NOT_FOUND"),
    ],
)
def test_errors_are_operation_outcomes(
    pds: SimulatorServer, path: str, status: int, code: str
) -> None:
    response = httpx.get(f"{pds.url}{path}")
    assert response.status_code == status
    assert issue_code(response.json()) == code


@pytest.mark.parametrize(
    ("identifier", "total"),
    [
        (f"{NHS_NUMBER_SYSTEM}|{NUMBERS[3]}", 1),
        (NUMBERS[3], 1),
        (f"{NHS_NUMBER_SYSTEM}|{UNKNOWN}", 0),
    ],
)
def test_search_by_identifier_returns_a_searchset(
    pds: SimulatorServer, identifier: str, total: int
) -> None:
    bundle = httpx.get(f"{pds.url}/Patient", params={"identifier": identifier}).json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert bundle["total"] == total == len(bundle["entry"])
    if total:
        entry = bundle["entry"][0]
        assert entry["resource"]["id"] == NUMBERS[3]
        assert entry["fullUrl"] == f"{pds.url}/Patient/{NUMBERS[3]}"


def test_metadata_is_a_capability_statement(pds: SimulatorServer) -> None:
    statement = httpx.get(f"{pds.url}/metadata").json()
    assert (
        statement["resourceType"] == "CapabilityStatement" and statement["fhirVersion"] == "4.0.1"
    )
    assert statement["rest"][0]["resource"][0]["type"] == "Patient"


def test_admin_put_and_delete_change_what_is_served(start_pds: StartPds) -> None:
    server = start_pds(Faults())
    body = {
        "resourceType": "Patient",
        "name": [{"family": "Ní Bhriain", "given": ["Aoife"]}],
        "birthDate": "1980-02-29",
    }
    created = httpx.put(f"{server.url}/Patient/{UNKNOWN}", json=body)
    assert created.status_code == 201
    again = httpx.put(f"{server.url}/Patient/{UNKNOWN}", json={**body, "gender": "female"})
    assert again.status_code == 200
    served = httpx.get(f"{server.url}/Patient/{UNKNOWN}")
    assert served.headers["etag"] == 'W/"2"'
    patient = served.json()
    assert patient["id"] == UNKNOWN and patient["gender"] == "female"
    assert {"system": NHS_NUMBER_SYSTEM, "value": UNKNOWN} in patient["identifier"]
    assert (
        httpx.put(
            f"{server.url}/Patient/{UNKNOWN}", json={"resourceType": "Observation"}
        ).status_code
        == 400
    )
    assert httpx.delete(f"{server.url}/Patient/{UNKNOWN}").status_code == 204
    assert httpx.get(f"{server.url}/Patient/{UNKNOWN}").status_code == 404


def test_faults_can_be_changed_at_run_time(start_pds: StartPds) -> None:
    server = start_pds(Faults())
    number = generated_nhs_numbers(5, SEED)[0]
    assert httpx.get(f"{server.url}/Patient/{number}").status_code == 200
    changed = httpx.put(f"{server.url}/_admin/faults", json={"error_rate": 1.0})
    assert changed.status_code == 200 and changed.json()["error_rate"] == 1.0
    assert httpx.get(f"{server.url}/Patient/{number}").status_code in (500, 503)
    assert httpx.put(f"{server.url}/_admin/faults", json={"error_rate": 3}).status_code == 400
    assert httpx.put(f"{server.url}/_admin/faults", json={"nonsense": 1}).status_code == 400
    assert httpx.get(f"{server.url}/metadata").status_code == 200  # never faulted


def _get(server: SimulatorServer, number: str, search: bool) -> httpx.Response:
    if search:
        return httpx.get(
            f"{server.url}/Patient", params={"identifier": f"{NHS_NUMBER_SYSTEM}|{number}"}
        )
    return httpx.get(f"{server.url}/Patient/{number}")


@pytest.mark.parametrize("search", [False, True], ids=["read", "search"])
@pytest.mark.parametrize(
    ("faults", "statuses"),
    [
        (Faults(), [200, 200, 200]),
        (Faults(error_rate=1.0), ["5xx", "5xx", "5xx"]),
        (Faults(malformed_rate=1.0), ["malformed", "malformed"]),
        (Faults(fail_first=2), [503, 503, 200, 200]),
        (Faults(fail_first=1, error_rate=1.0), [503, "5xx"]),
    ],
    ids=["none", "errors", "malformed", "fail-first-2", "fail-first-then-errors"],
)
def test_fault_table(
    start_pds: StartPds, faults: Faults, statuses: list[Any], search: bool
) -> None:
    server = start_pds(faults)
    number = generated_nhs_numbers(5, SEED)[1]
    for expected in statuses:
        response = _get(server, number, search)
        if expected == "5xx":
            assert response.status_code in (500, 503)
            assert response.json()["resourceType"] == "OperationOutcome"
        elif expected == "malformed":
            assert response.status_code == 200
            with pytest.raises(orjson.JSONDecodeError):
                orjson.loads(response.content)
        else:
            assert response.status_code == expected
            assert response.json()["resourceType"] in ("Patient", "Bundle", "OperationOutcome")
    assert pds_state(server.app).requests[number] == len(statuses)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("latency_ms", "jitter_ms"),
    [(0, 0), (250, 0), (100, 200)],
)
def test_latency_is_honoured(start_pds: StartPds, latency_ms: float, jitter_ms: float) -> None:
    server = start_pds(Faults(latency_ms=latency_ms, jitter_ms=jitter_ms, seed=3))
    number = generated_nhs_numbers(5, SEED)[0]
    with httpx.Client() as client:
        client.get(f"{server.url}/metadata")  # connect outside the measurement
        for _ in range(3):
            started = time.perf_counter()
            assert client.get(f"{server.url}/Patient/{number}").status_code == 200
            elapsed_ms = (time.perf_counter() - started) * 1000
            # Generous upper slack: CI machines are busy; the lower bound is what the fault promises.
            assert latency_ms <= elapsed_ms <= latency_ms + jitter_ms + 500


def test_timeout_fault_hangs_past_the_client_timeout(start_pds: StartPds) -> None:
    server = start_pds(Faults(timeout_rate=1.0, hang_s=20))
    number = generated_nhs_numbers(5, SEED)[0]
    started = time.perf_counter()
    with pytest.raises(httpx.ReadTimeout):
        httpx.get(f"{server.url}/Patient/{number}", timeout=0.3)
    assert time.perf_counter() - started < 2
    started = time.perf_counter()
    server.stop()  # the hung request ends when its client leaves; stopping stays prompt
    assert time.perf_counter() - started < 3


def test_faults_are_validated() -> None:
    with pytest.raises(ValueError, match="error_rate"):
        Faults(error_rate=1.5)
    with pytest.raises(ValueError, match="must not exceed 1"):
        Faults(error_rate=0.6, timeout_rate=0.6)
    with pytest.raises(ValueError, match="latency_ms"):
        Faults(latency_ms=-1)


# --- the `simulate pds` command ------------------------------------------------------------------


def test_cli_help_lists_the_fault_options() -> None:
    result = CliRunner().invoke(simulate_app, ["pds", "--help"])
    assert result.exit_code == 0
    for option in (
        "--people",
        "--seed",
        "--latency-ms",
        "--jitter-ms",
        "--error-rate",
        "--timeout-rate",
        "--malformed-rate",
    ):
        assert option in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--error-rate", "1.5"],
        ["--error-rate", "0.7", "--timeout-rate", "0.7"],
        ["--port", "70000"],
    ],
)
def test_cli_refuses_bad_faults(args: list[str]) -> None:
    result = CliRunner().invoke(simulate_app, ["pds", *args])
    assert result.exit_code == 2


def test_cli_serves_prints_its_url_and_stops_cleanly_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sharedcare.simulators.cli",
            "pds",
            "--port",
            "0",
            "--people",
            "3",
            "--fail-first",
            "1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONWARNINGS": "error"},
    )
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        number = generated_nhs_numbers(3, 2026)[2]
        deadline = time.monotonic() + 10
        while True:
            try:
                first = httpx.get(f"{url}/Patient/{number}")
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        assert first.status_code == 503  # --fail-first 1
        assert httpx.get(f"{url}/Patient/{number}").json()["id"] == number
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "Stopped." in stderr
