"""The open-loop load generator against real servers: timetable, latency, error classes, CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import orjson
import pytest
from helpers import RunningHub, free_port
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from typer.testing import CliRunner

from sharedcare.cli import app as cli_app
from sharedcare.iam.client import generate_key, public_jwks
from sharedcare.registry.model import new_system
from sharedcare.registry.service import Registry
from sharedcare.settings import Settings
from sharedcare.simulators.loadtest import LoadPlan, expand_paths, run_load, schedule
from sharedcare.simulators.pds import SimulatorServer
from sharedcare.simulators.provider import ProviderConfig, ProviderServer
from sharedcare.store import migrate
from sharedcare.store.db import Database
from sharedcare.store.repository import Store
from sharedcare.store.service import FhirService

NHS_PATH = "/Observation?patient.identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}"


class SlowStartHub(RunningHub):
    """``RunningHub`` that waits up to two minutes for readiness: on a 2-core machine shared
    with other test runs, starting the hub (imports, migrations) can take longer than 30 s."""

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the hub exited during start-up"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("hub did not become ready in 120 s")


def start_provider(**fields: Any) -> ProviderServer:
    server = ProviderServer(ProviderConfig(**{"id": "load", "people": 10, **fields}))
    server.start()
    return server


@pytest.fixture(scope="module")
def provider() -> Iterator[ProviderServer]:
    server = start_provider()
    yield server
    server.stop()


def paths(server: ProviderServer) -> tuple[str, ...]:
    return expand_paths(NHS_PATH, [p.nhs_number for p in server.people])


@pytest.mark.parametrize(
    ("rate", "duration", "planned"),
    [(10, 1, 10), (0.5, 4, 2), (3, 0.1, 1), (1000, 0.5, 500), (7, 3, 21)],
)
def test_requests_follow_a_fixed_timetable(rate: float, duration: float, planned: int) -> None:
    plan = LoadPlan("http://x", ("/",), rate=rate, duration=duration)
    offsets = schedule(plan)
    assert plan.planned == len(offsets) == planned
    assert offsets == [i / rate for i in range(planned)]


def test_every_request_is_sent_and_answered(provider: ProviderServer) -> None:
    before = len(provider.state.requests)
    result = run_load(LoadPlan(provider.base_url, paths(provider), rate=40, duration=0.5))
    assert result.sent == result.ok == 20 and not result.errors
    assert len(provider.state.requests) - before == 20
    asked = Counter(a.rsplit("%7C", 1)[-1] for a in list(provider.state.requests)[before:])
    people = [p.nhs_number for p in provider.people]
    assert asked == Counter(people[i % len(people)] for i in range(20))  # targets in turn
    assert result.resources == 20 * 13
    assert result.to_dict()["resources_per_response"] == 13


def test_open_loop_does_not_wait_for_a_slow_server() -> None:
    slow = start_provider(latency_ms=(1000, 1000))
    try:
        result = run_load(
            LoadPlan(slow.base_url, paths(slow), rate=40, duration=0.5, connections=50)
        )
    finally:
        slow.stop()
    assert result.ok == 20
    # Every request was sent before the first answer could arrive (a closed loop would have
    # sent one per connection and waited).
    assert result.sending_s < 0.95 and min(result.latencies_ms) >= 1000


def test_latency_includes_waiting_for_a_connection() -> None:
    """Coordinated omission: 20 requests of 100 ms each over one connection need 2 s of work,
    so the last one, scheduled at 0.95 s, cannot finish before 2 s: its latency is >= 1 s even
    though the server took 100 ms to answer it."""
    slow = start_provider(latency_ms=(100, 100))
    try:
        result = run_load(LoadPlan(slow.base_url, paths(slow), rate=20, duration=1, connections=1))
    finally:
        slow.stop()
    assert result.ok == 20
    assert result.percentile(100) >= 1000
    assert result.percentile(50) >= 400


@pytest.mark.parametrize("client", ["httpx", "aiohttp"])
@pytest.mark.parametrize(
    ("faults", "path", "expected"),
    [
        ({"error_rate": 1.0}, NHS_PATH, "5xx"),
        ({"malformed_rate": 1.0}, NHS_PATH, "invalid-body"),
        ({"timeout_rate": 1.0, "hang_s": 5}, NHS_PATH, "timeout"),
        ({}, "/Medication", "4xx"),
        ({}, "closed-port", "connect"),
    ],
)  # fmt: skip
def test_errors_are_counted_by_class(
    client: str, faults: dict[str, Any], path: str, expected: str
) -> None:
    server = start_provider(**faults)
    try:
        base = f"http://127.0.0.1:{free_port()}" if path == "closed-port" else server.base_url
        targets = paths(server) if "{nhs}" in path else (path.replace("closed-port", "/metadata"),)
        plan = LoadPlan(base, targets, rate=20, duration=0.4, timeout=0.5, client=client)
        result = run_load(plan)
    finally:
        server.stop()
    assert result.sent == 8 and result.ok == 0
    assert dict(result.errors) == {expected: 8}
    assert result.to_dict()["errors"][expected] == 8 and result.examples[expected]


class Capture:
    """A small real server answering a searchset with one impaired provider, recording headers."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []

        async def search(request: Request) -> Response:
            self.headers.append(dict(request.headers))
            bundle = {
                "resourceType": "Bundle", "type": "searchset",
                "entry": [
                    {"resource": {"resourceType": "Observation", "id": "1"}, "search": {"mode": "match"}},
                    {"resource": {"resourceType": "OperationOutcome", "issue": []}, "search": {"mode": "outcome"}},
                ],
            }  # fmt: skip
            return Response(orjson.dumps(bundle), media_type="application/fhir+json")

        self.server = SimulatorServer(Starlette(routes=[Route("/fhir/Observation", search)]))


def test_cli_writes_json_and_sends_token_and_headers(tmp_path: Path) -> None:
    capture = Capture()
    numbers = tmp_path / "people.txt"
    numbers.write_text("# demo people\n9434765919\n9434765870\n", encoding="utf-8")
    out = tmp_path / "result.json"
    with capture.server:
        result = CliRunner().invoke(
            cli_app,
            # a FHIR base and the default /fhir/... path: joined at the root
            ["loadtest", "query", "--base-url", f"{capture.server.url}/fhir", "--rate", "20",
             "--duration", "0.5", "--nhs-numbers", str(numbers), "--token", "tok-123",
             "--header", "X-Provider-Wait-Time: 500", "--json", str(out)],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Latency histogram" in result.output and "Errors by class" in result.output
    data = json.loads(out.read_text())
    assert data["planned"] == data["sent"] == data["ok"] == data["partial"] == 10
    assert data["resources_per_response"] == 1
    assert set(data["latency_ms"]) == {"min", "mean", "p50", "p75", "p90", "p99", "p99.9", "max"}
    assert sum(b["count"] for b in data["histogram"]) == 10
    assert {h["authorization"] for h in capture.headers} == {"Bearer tok-123"}
    assert {h["x-provider-wait-time"] for h in capture.headers} == {"500"}


def test_cli_takes_target_and_people_from_demo_json(
    provider: ProviderServer, tmp_path: Path
) -> None:
    demo = tmp_path / "demo.json"
    people = [{"nhs_number": p.nhs_number, "providers": ["load"]} for p in provider.people]
    demo.write_text(json.dumps({"base_url": provider.base_url, "people": people}))
    out = tmp_path / "r.json"
    result = CliRunner().invoke(
        cli_app,
        ["loadtest", "query", "--demo-json", str(demo), "--path", NHS_PATH, "--rate", "20",
         "--duration", "0.5", "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(out.read_text())["ok"] == 10


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--rate", "5"], "--base-url"),
        (["--rate", "5", "--base-url", "http://x"], "NHS numbers"),
        (
            ["--rate", "5", "--base-url", "http://x", "--path", "/", "--header", "nocolon"],
            "Name: value",
        ),
        (["--rate", "5", "--base-url", "http://x", "--client", "curl", "--path", "/"], "client"),
    ],
)
def test_cli_refuses_bad_options(args: list[str], says: str) -> None:
    result = CliRunner().invoke(cli_app, ["loadtest", "query", *args])
    assert result.exit_code == 2
    assert says in result.output


async def _register_consumer(settings: Settings, url: str, key: Any) -> None:
    db = Database(settings.database)
    try:
        await migrate.upgrade(db)
        fhir = FhirService(Store(db), fhir_base=f"{url}/fhir", default_count=50, max_count=1000)
        await Registry(fhir).add(
            new_system(client_id="load-portal", kind="consumer", name="Load portal",
                       scopes="system/Patient.rs", jwks=public_jwks(key))
        )  # fmt: skip
    finally:
        await db.close()


def test_cli_gets_its_own_tokens_from_a_real_hub(settings: Settings, tmp_path: Path) -> None:
    key = generate_key("RS384", kid="load-1")
    pem = tmp_path / "load.pem"
    pem.write_bytes(key.as_pem(private=True))
    env = {
        "SHAREDCARE_DATABASE_URL": settings.database,
        "SHAREDCARE_DATA_DIR": str(settings.data_dir),
    }
    hub = SlowStartHub(env)
    asyncio.run(_register_consumer(settings, hub.url, key))
    out = tmp_path / "r.json"
    with hub:
        result = CliRunner().invoke(
            cli_app,
            ["loadtest", "query", "--base-url", hub.url, "--client-id", "load-portal",
             "--key", str(pem), "--kid", "load-1", "--scope", "system/Patient.rs",
             "--path", "/fhir/Patient?identifier=https://fhir.nhs.uk/Id/nhs-number|{nhs}",
             "--nhs-number", "9434765919", "--rate", "20", "--duration", "0.5",
             "--json", str(out)],
        )  # fmt: skip
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["ok"] == 10, data  # a token with end-user claims: patient data may be searched
