"""Tracing against the PDS simulator over real sockets: matching rules, faults, and the queue."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import orjson
import pytest
from helpers import free_port, nhs_number
from prometheus_client import REGISTRY
from sqlalchemy import select
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM
from sharedcare.pix.tracing import (
    TRACE_QUEUE,
    Demographics,
    TraceOutcome,
    Tracer,
    TraceResult,
    enqueue_trace,
    trace_worker,
)
from sharedcare.queue import store as q
from sharedcare.queue.schema import queue_items
from sharedcare.simulators.pds import (
    Faults,
    SimulatorServer,
    create_pds_app,
    generated_patients,
    pds_state,
)
from sharedcare.store import migrate
from sharedcare.store.db import Database

V, M = TraceOutcome.VERIFIED, TraceOutcome.MISMATCH
StartPds = Callable[..., SimulatorServer]

PDS_PERSON: dict[str, Any] = {
    "resourceType": "Patient",
    "name": [
        {"use": "usual", "family": "Smith-Jones", "given": ["Zoë", "Anne"]},
        {"use": "old", "family": "O'Brien", "given": ["Zoe"]},
    ],
    "gender": "female",
    "birthDate": "1970-01-02",
    "address": [
        {"use": "home", "line": ["1 High St"], "postalCode": "LS1 1AA"},
        {"use": "temp", "line": ["9 Mill Lane"], "postalCode": "BD7 1DP"},
    ],
}
EXACT = Demographics(
    family="Smith-Jones", given="Zoë", birth_date="1970-01-02", gender="female", postcode="LS1 1AA"
)
RESTRICTED = {k: v for k, v in PDS_PERSON.items() if k != "address"}  # PDS withholds addresses
ACCENTED = {
    **PDS_PERSON,
    "name": [{"family": "Ní Bhriain-Müller", "given": ["Éamon"]}],
    "gender": "male",
}


def _replace(**changes: Any) -> Demographics:
    return replace(EXACT, **changes)


CASES: list[tuple[str, dict[str, Any], Demographics, TraceOutcome, tuple[str, ...]]] = [
    ("exact", PDS_PERSON, EXACT, V, ()),
    ("case-spacing-and-accents", PDS_PERSON, _replace(family="SMITH JONES", given="zoe", postcode="ls11aa"), V, ()),
    ("previous-surname", PDS_PERSON, _replace(family="OBrien"), V, ()),
    ("curly-apostrophe", PDS_PERSON, _replace(family="O\u2019Brien"), V, ()),
    ("temporary-address-postcode", PDS_PERSON, _replace(postcode="bd7 1dp"), V, ()),
    ("minimal: birth date and family", PDS_PERSON, Demographics(family="smith-jones", birth_date="1970-01-02"), V, ()),
    ("hl7-v2-gender", PDS_PERSON, _replace(gender="F"), V, ()),
    ("gender-unknown-not-compared", PDS_PERSON, _replace(gender="unknown"), V, ()),
    ("second-given-name-initial-ignored", PDS_PERSON, _replace(given="Zoe Mary"), V, ()),
    ("accents-from-provider", PDS_PERSON, _replace(family="Smíth–Jönes", given="ZOË"), V, ()),  # en dash too
    ("accents-in-pds", ACCENTED, _replace(family="ni bhriain muller", given="Eamon", gender="male"), V, ()),
    ("restricted-record-without-address", RESTRICTED, EXACT, V, ()),
    ("one-half-of-a-hyphenated-surname", PDS_PERSON, _replace(family="Smith"), M,
     ("family: matches no current or previous PDS family name",)),
    ("wrong-birth-date", PDS_PERSON, _replace(birth_date="1970-02-01"), M, ("birth_date: does not match PDS",)),
    ("partial-birth-date", PDS_PERSON, _replace(birth_date="1970-01"), M, ("birth_date: does not match PDS",)),
    ("no-birth-date", PDS_PERSON, _replace(birth_date=None), M, ("birth_date: not supplied; required to verify",)),
    ("no-family", PDS_PERSON, _replace(family=" "), M, ("family: not supplied; required to verify",)),
    ("wrong-postcode", PDS_PERSON, _replace(postcode="LS1 1AB"), M, ("postcode: matches no PDS address postcode",)),
    ("wrong-gender", PDS_PERSON, _replace(gender="male"), M, ("gender: does not match PDS",)),
    ("wrong-given-initial", PDS_PERSON, _replace(given="Mary"), M, ("given: first initial matches no PDS given name",)),
    ("several-fields", PDS_PERSON, _replace(family="Jones", birth_date="1971-01-02", gender="M", postcode="YO1 7HH"), M,
     ("birth_date: does not match PDS", "family: matches no current or previous PDS family name",
      "gender: does not match PDS", "postcode: matches no PDS address postcode")),
]  # fmt: skip


@pytest.fixture(scope="module")
def pds() -> Iterator[SimulatorServer]:
    with SimulatorServer(create_pds_app(10, 2026)) as server:
        yield server


@pytest.fixture
def start_pds() -> Iterator[StartPds]:
    servers: list[SimulatorServer] = []

    def start(faults: Faults) -> SimulatorServer:
        server = SimulatorServer(create_pds_app(5, 2026, faults))
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def put_person(server: SimulatorServer, number: str, person: dict[str, Any]) -> None:
    response = httpx.put(f"{server.url}/Patient/{number}", json=person)
    assert response.status_code in (200, 201), response.text


def first_person(server: SimulatorServer) -> tuple[str, Demographics]:
    number, patient = next(iter(generated_patients(5, 2026).items()))
    return number, Demographics.from_patient(patient)


@pytest.mark.parametrize(
    ("case", "pds_person", "submitted", "outcome", "reasons"),
    [(i, *c[1:]) for i, c in enumerate(CASES)],
    ids=[c[0] for c in CASES],
)
async def test_matching_rules(
    pds: SimulatorServer,
    case: int,
    pds_person: dict[str, Any],
    submitted: Demographics,
    outcome: TraceOutcome,
    reasons: tuple[str, ...],
) -> None:
    number = nhs_number(7000 + case)  # a number of its own: cases do not share PDS records
    put_person(pds, number, pds_person)
    async with Tracer(pds.url, timeout_s=5) as tracer:
        result = await tracer.trace(number, submitted)
    assert (result.outcome, result.reasons) == (outcome, reasons)
    assert result.pds_patient is not None and result.pds_patient["id"] == number
    # PDS's values never leak into reasons or the result's repr (both end up in logs).
    leaked = {"1970-01-02", "Smith", "Brien", "LS1", "BD7", "Zo", "female"} - {
        v for v in (submitted.birth_date, submitted.family, submitted.given, submitted.gender) if v
    }
    for text in (*result.reasons, repr(result)):
        assert not any(value in text for value in leaked), text


async def test_generated_people_verify_with_their_own_demographics(pds: SimulatorServer) -> None:
    async with Tracer(pds.url) as tracer:
        for number, patient in list(generated_patients(10, 2026).items()):
            result = await tracer.trace(number, Demographics.from_patient(patient))
            assert result.outcome is V, result.reasons
            # Spaced input is normalised before the request.
            spaced = f"{number[:3]} {number[3:6]} {number[6:]}"
            assert (await tracer.trace(spaced, Demographics.from_patient(patient))).outcome is V


async def test_unknown_number_is_not_found(pds: SimulatorServer) -> None:
    async with Tracer(pds.url) as tracer:
        result = await tracer.trace("9434765919", EXACT)
    assert result.outcome is TraceOutcome.NOT_FOUND and result.pds_patient is None


async def test_invalid_number_is_refused_without_a_request(pds: SimulatorServer) -> None:
    before = sum(pds_state(pds.app).requests.values())  # type: ignore[arg-type]
    async with Tracer(pds.url) as tracer:
        result = await tracer.trace("9434765918", EXACT)
    assert result.outcome is TraceOutcome.PERMANENT_ERROR
    assert result.reasons[0].startswith("nhs_number: The check digit")
    assert sum(pds_state(pds.app).requests.values()) == before  # type: ignore[arg-type]


async def test_superseded_record_is_a_permanent_error(pds: SimulatorServer) -> None:
    old, new = nhs_number(8100), nhs_number(8200)
    # PDS serves a superseded number's record under the surviving number.
    put_person(
        pds,
        old,
        {**PDS_PERSON, "id": new, "identifier": [{"system": NHS_NUMBER_SYSTEM, "value": new}]},
    )
    async with Tracer(pds.url) as tracer:
        result = await tracer.trace(old, EXACT)
    assert result.outcome is TraceOutcome.PERMANENT_ERROR
    assert "superseded or merged" in result.reasons[0] and result.pds_patient is None


@pytest.mark.parametrize(
    ("faults", "outcome", "reason"),
    [
        (Faults(error_rate=1.0), TraceOutcome.TRANSIENT_ERROR, "pds: HTTP 50"),
        (Faults(fail_first=5), TraceOutcome.TRANSIENT_ERROR, "pds: HTTP 503"),
        (
            Faults(malformed_rate=1.0),
            TraceOutcome.PERMANENT_ERROR,
            "pds: response is not valid JSON",
        ),
        (
            Faults(timeout_rate=1.0, hang_s=20),
            TraceOutcome.TRANSIENT_ERROR,
            "pds: no answer within 0.4 s",
        ),
        (Faults(latency_ms=100), TraceOutcome.VERIFIED, None),
    ],
    ids=["errors", "fail-first", "malformed", "timeout", "slow-but-in-time"],
)
async def test_faults_map_to_outcomes(
    start_pds: StartPds, faults: Faults, outcome: TraceOutcome, reason: str | None
) -> None:
    server = start_pds(faults)
    number, demographics = first_person(server)
    # In time means well within it: a cold client on a slow machine adds its own stalls.
    timeout_s = 1.0 if faults.latency_ms else 0.4
    async with Tracer(server.url, timeout_s=timeout_s) as tracer:
        result = await tracer.trace(number, demographics)
    assert result.outcome is outcome
    assert result.reasons[0].startswith(reason) if reason else result.reasons == ()
    if faults.timeout_rate:
        assert 0.4 <= result.latency_s < 1.5  # the tracer's own deadline, not the server's hang
    if faults.latency_ms:
        assert result.latency_s >= 0.1


def odd_pds_app() -> Starlette:
    """A server misbehaving in ways the simulator does not: status codes and odd bodies."""

    async def status(request: Request) -> Response:
        code = int(request.path_params["code"])
        body = b'{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"security",' \
               b'"details":{"coding":[{"code":"ACCESS_DENIED"}]}}]}'  # fmt: skip
        return Response(body, code, headers={"Location": "/elsewhere"})

    async def body(request: Request) -> Response:
        number = request.path_params["nhs"]
        bodies = {
            "outcome": {"resourceType": "OperationOutcome", "issue": []},
            "list": [],
            "no-identifier": {**PDS_PERSON, "id": number},
        }
        return Response(orjson.dumps(bodies[request.path_params["kind"]]), 200)

    return Starlette(
        routes=[
            Route("/status/{code:int}/Patient/{nhs}", status),
            Route("/body/{kind}/Patient/{nhs}", body),
        ]
    )


@pytest.fixture(scope="module")
def odd_pds() -> Iterator[SimulatorServer]:
    with SimulatorServer(odd_pds_app()) as server:
        yield server


@pytest.mark.parametrize(
    ("path", "outcome", "reason"),
    [
        ("/status/500", TraceOutcome.TRANSIENT_ERROR, "pds: HTTP 500"),
        ("/status/502", TraceOutcome.TRANSIENT_ERROR, "pds: HTTP 502"),
        ("/status/429", TraceOutcome.TRANSIENT_ERROR, "pds: HTTP 429"),
        ("/status/408", TraceOutcome.TRANSIENT_ERROR, "pds: HTTP 408"),
        ("/status/400", TraceOutcome.PERMANENT_ERROR, "pds: HTTP 400 (ACCESS_DENIED)"),
        ("/status/401", TraceOutcome.PERMANENT_ERROR, "pds: HTTP 401 (ACCESS_DENIED)"),
        ("/status/403", TraceOutcome.PERMANENT_ERROR, "pds: HTTP 403"),
        ("/status/410", TraceOutcome.PERMANENT_ERROR, "pds: HTTP 410"),
        ("/status/302", TraceOutcome.PERMANENT_ERROR, "pds: HTTP 302"),
        ("/status/204", TraceOutcome.PERMANENT_ERROR, "pds: HTTP 204"),
        ("/status/404", TraceOutcome.NOT_FOUND, "pds: no record"),
        ("/body/outcome", TraceOutcome.PERMANENT_ERROR, "pds: response is not a Patient"),
        ("/body/list", TraceOutcome.PERMANENT_ERROR, "pds: response is not a Patient"),
        (
            "/body/no-identifier",
            TraceOutcome.PERMANENT_ERROR,
            "pds: the Patient returned does not carry",
        ),
    ],
)
async def test_status_and_body_table(
    odd_pds: SimulatorServer, path: str, outcome: TraceOutcome, reason: str
) -> None:
    async with Tracer(f"{odd_pds.url}{path}") as tracer:
        result = await tracer.trace(nhs_number(1), EXACT)
    assert result.outcome is outcome
    assert result.reasons[0].startswith(reason)


async def test_nothing_listening_is_a_transient_error() -> None:
    async with Tracer(f"http://127.0.0.1:{free_port()}", timeout_s=2) as tracer:
        result = await tracer.trace(nhs_number(1), EXACT)
    assert result.outcome is TraceOutcome.TRANSIENT_ERROR
    assert result.reasons == ("pds: connection failed (ConnectError)",)


@pytest.mark.parametrize(
    ("base_url", "timeout_s"),
    [("ftp://pds.example/fhir", 1.0), ("pds.example", 1.0), ("http://x", 0)],
)
def test_a_misconfigured_tracer_fails_at_start_up(base_url: str, timeout_s: float) -> None:
    with pytest.raises(ValueError):
        Tracer(base_url, timeout_s=timeout_s)


async def test_a_shared_client_is_reused_and_left_open(pds: SimulatorServer) -> None:
    number, demographics = first_person(pds)
    opened: list[str] = []
    async with httpx.AsyncClient(event_hooks={"request": [lambda r: _note(opened, r)]}) as client:
        async with Tracer(pds.url, client=client) as tracer:
            results = await asyncio.gather(*(tracer.trace(number, demographics) for _ in range(5)))
            assert tracer.client is client
        assert not client.is_closed
    assert {r.outcome for r in results} == {V} and len(opened) == 5
    assert all(len(request_id) == 36 for request_id in opened)  # X-Request-ID on every request


async def _note(opened: list[str], request: httpx.Request) -> None:
    opened.append(request.headers["x-request-id"])


def _sample(outcome: str) -> float:
    return (
        REGISTRY.get_sample_value("sharedcare_pix_tracing_results_total", {"outcome": outcome})
        or 0.0
    )


async def test_metrics_count_outcomes_and_latency(pds: SimulatorServer) -> None:
    number, demographics = first_person(pds)
    verified, not_found = _sample("verified"), _sample("not_found")
    count = (
        REGISTRY.get_sample_value(
            "sharedcare_pix_tracing_duration_seconds_count", {"outcome": "verified"}
        )
        or 0
    )
    async with Tracer(pds.url) as tracer:
        await tracer.trace(number, demographics)
        await tracer.trace("9434765919", demographics)
        await tracer.trace("9434765918", demographics)  # invalid: refused, not counted
    assert _sample("verified") == verified + 1 and _sample("not_found") == not_found + 1
    assert (
        REGISTRY.get_sample_value(
            "sharedcare_pix_tracing_duration_seconds_count", {"outcome": "verified"}
        )
        == count + 1
    )
    assert _sample("transient_error") >= 0 and _sample("permanent_error") >= 0  # exported at zero


# --- the durable queue, on SQLite and PostgreSQL ---------------------------------------------------


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    await migrate.upgrade(database)
    yield database
    await database.close()


FAST = q.Backoff(base=0.05, cap=0.1, max_attempts=10)


async def run_until(
    db: Database, tracer: Tracer, backoff: q.Backoff, done: Callable[[], bool], results: list[Any]
) -> None:
    async def on_result(registration_id: str, result: TraceResult) -> None:
        results.append((registration_id, result))

    worker = trace_worker(db, tracer, on_result, backoff=backoff, idle_poll=0.02)
    task = asyncio.create_task(worker.run())
    deadline = time.monotonic() + 15
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.3)  # long enough for any wrongful retry to show
    worker.stop()
    await task


async def queued(db: Database) -> list[Any]:
    async with db.read() as conn:
        return list(
            (
                await conn.execute(select(queue_items).where(queue_items.c.queue == TRACE_QUEUE))
            ).all()
        )


async def enqueue(db: Database, registration: str, number: str, demographics: Demographics) -> bool:
    async def work(conn: Any) -> bool:
        return await enqueue_trace(conn, registration, number, demographics)

    return await db.write(work)


async def test_transient_failures_are_retried_with_backoff_until_verified(
    db: Database, start_pds: StartPds
) -> None:
    server = start_pds(Faults(fail_first=2))
    number, demographics = first_person(server)
    assert await enqueue(db, "reg-1", number, demographics)
    results: list[Any] = []
    async with Tracer(server.url, timeout_s=2) as tracer:
        await run_until(db, tracer, FAST, lambda: bool(results), results)
    assert [(r, res.outcome) for r, res in results] == [("reg-1", V)]
    state = pds_state(server.app)  # type: ignore[arg-type]
    assert state.requests[number] == 3
    times = state.request_times[number]
    # Full-jitter backoff: waits of at least half of 0.05 s, then half of 0.1 s.
    assert times[1] - times[0] >= 0.025 and times[2] - times[1] >= 0.05
    [item] = await queued(db)
    assert (item.state, item.attempts) == (q.DONE, 3)
    assert "HTTP 503" in item.last_error


async def test_a_permanent_error_is_reported_once_and_not_retried(
    db: Database, start_pds: StartPds
) -> None:
    server = start_pds(Faults(malformed_rate=1.0))
    number, demographics = first_person(server)
    await enqueue(db, "reg-2", number, demographics)
    results: list[Any] = []
    async with Tracer(server.url, timeout_s=2) as tracer:
        await run_until(db, tracer, FAST, lambda: bool(results), results)
    assert [(r, res.outcome, res.reasons) for r, res in results] == [
        ("reg-2", TraceOutcome.PERMANENT_ERROR, ("pds: response is not valid JSON",))
    ]
    assert pds_state(server.app).requests[number] == 1  # type: ignore[arg-type]
    [item] = await queued(db)
    assert (item.state, item.attempts) == (q.DONE, 1)


async def test_a_pds_that_stays_down_is_reported_as_a_final_transient_error(
    db: Database, start_pds: StartPds
) -> None:
    server = start_pds(Faults(error_rate=1.0))
    number, demographics = first_person(server)
    await enqueue(db, "reg-3", number, demographics)
    results: list[Any] = []
    async with Tracer(server.url, timeout_s=2) as tracer:
        await run_until(
            db,
            tracer,
            q.Backoff(base=0.01, cap=0.02, max_attempts=3),
            lambda: bool(results),
            results,
        )
    [(registration, result)] = results
    assert registration == "reg-3" and result.outcome is TraceOutcome.TRANSIENT_ERROR
    assert result.reasons[-1] == "gave up after 3 attempts"
    assert pds_state(server.app).requests[number] == 3  # type: ignore[arg-type]
    [item] = await queued(db)
    assert item.state == q.DONE


async def test_enqueue_is_idempotent_per_registration_and_content(db: Database) -> None:
    number = nhs_number(5)
    assert await enqueue(db, "reg-4", number, EXACT)
    assert not await enqueue(
        db, "reg-4", f"{number[:3]} {number[3:6]} {number[6:]}", EXACT
    )  # same trace
    assert await enqueue(db, "reg-4", number, _replace(postcode="LS2 9JT"))  # new demographics
    assert await enqueue(db, "reg-5", number, EXACT)
    items = await queued(db)
    assert [(i.key.split(":")[0], i.partition) for i in items] == [
        ("reg-4", "reg-4"),
        ("reg-4", "reg-4"),
        ("reg-5", "reg-5"),
    ]
    with pytest.raises(ValueError, match="check digit"):
        await enqueue(db, "reg-6", "9434765918", EXACT)
