"""A PDS-compatible FHIR R4 endpoint serving generated people, with configurable faults.

Modelled on the NHS Personal Demographics Service FHIR API
(https://digital.nhs.uk/developer/api-catalogue/personal-demographics-service-fhir):

=====================================================  ==========================================
``GET /Patient/{nhs_number}``                          The Patient (``id`` = NHS number); 404
                                                       OperationOutcome ``RESOURCE_NOT_FOUND``
                                                       when unknown, 400 ``INVALID_RESOURCE_ID``
                                                       when the id fails Modulus 11.
``GET /Patient?identifier=https://fhir.nhs.uk/Id/``    A searchset Bundle with zero or one entry.
``nhs-number|{nhs_number}``
``GET /metadata``                                      CapabilityStatement (never faulted).
=====================================================  ==========================================

Simulator-only administration (no counterpart in PDS; never faulted):

=====================================================  ==========================================
``PUT /Patient/{nhs_number}``                          Add or replace the record served at that
                                                       number. ``id`` and the NHS identifier are
                                                       filled in when absent; a body whose ``id``
                                                       is another number simulates a superseded
                                                       (merged) record, which PDS serves under
                                                       the new number.
``DELETE /Patient/{nhs_number}``                       Forget the record (later reads give 404).
``GET /_admin/faults``, ``PUT /_admin/faults``         Read or change the faults (JSON object of
                                                       :class:`Faults` fields; PUT merges).
=====================================================  ==========================================

Faults apply to Patient reads and searches, in this order: latency (``latency_ms`` plus a
uniform ``0..jitter_ms``); ``fail_first`` (each NHS number's first N requests answer 503);
then, drawn independently per request, a timeout (the request hangs for ``hang_s`` — past any
sensible client timeout — and ends early if the client disconnects), an error (HTTP 500 or
503) or a malformed body (status 200, ``application/fhir+json``, invalid JSON).

People are :func:`sharedcare.simulators.people.people` ``(count, seed)``, so a hub and its
demo providers given the same seed register exactly the people this endpoint knows
(:func:`generated_nhs_numbers`). The sequence is prefix-stable: 200 people of seed S are the
first 200 of 1000 people of seed S.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Final, Self

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp

from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM, explain_invalid
from sharedcare.simulators.people import people as generate_people

__all__ = [
    "DEFAULT_PEOPLE",
    "DEFAULT_SEED",
    "Faults",
    "PdsState",
    "SimulatorServer",
    "create_pds_app",
    "generated_nhs_numbers",
    "generated_patients",
    "pds_state",
]

FHIR_JSON: Final = "application/fhir+json"
DEFAULT_PEOPLE: Final = 1000
DEFAULT_SEED: Final = 2026  # the seed `sharedcare demo` loads its sample people with
# PDS's own OperationOutcome detail codes, so clients written against PDS see familiar errors.
SPINE_CODES: Final = "https://fhir.nhs.uk/R4/CodeSystem/Spine-ErrorOrWarningCode"
_MALFORMED: Final = b'{"resourceType": "Patient", "id": "9'  # truncated mid-string


@dataclass(frozen=True, slots=True)
class Faults:
    """What the simulator does wrong, and how often (rates are probabilities 0..1)."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    malformed_rate: float = 0.0
    fail_first: int = 0
    hang_s: float = 30.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("error_rate", "timeout_rate", "malformed_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {rate}")
        for name in ("latency_ms", "jitter_ms", "hang_s", "fail_first"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.error_rate + self.timeout_rate + self.malformed_rate > 1.0:
            raise ValueError("error_rate + timeout_rate + malformed_rate must not exceed 1")


@dataclass
class PdsState:
    """The simulator's records, faults and request log (for tests and the demo)."""

    patients: dict[str, dict[str, Any]]
    faults: Faults
    rng: random.Random
    requests: Counter[str] = field(default_factory=Counter)  # Patient requests per NHS number
    request_times: dict[str, list[float]] = field(default_factory=dict)  # time.monotonic()

    def set_faults(self, faults: Faults) -> None:
        self.faults = faults
        if faults.seed is not None:
            self.rng.seed(faults.seed)


def _as_pds_patient(patient: dict[str, Any], nhs_number: str, version: int = 1) -> dict[str, Any]:
    record = dict(patient)
    record.setdefault("id", nhs_number)
    identifiers = list(record.get("identifier") or [])
    if not any(i.get("system") == NHS_NUMBER_SYSTEM for i in identifiers if isinstance(i, dict)):
        identifiers.insert(0, {"system": NHS_NUMBER_SYSTEM, "value": nhs_number})
    record["identifier"] = identifiers
    record["meta"] = {
        **(record.get("meta") or {}),
        "versionId": str(version),
        "security": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/v3-Confidentiality",
                "code": "U",
                "display": "unrestricted",
            }
        ],
    }
    return {"resourceType": "Patient", **{k: v for k, v in record.items() if k != "resourceType"}}


def generated_patients(
    people: int = DEFAULT_PEOPLE, seed: int = DEFAULT_SEED
) -> dict[str, dict[str, Any]]:
    """The Patients the simulator serves for ``(people, seed)``, by NHS number."""
    out: dict[str, dict[str, Any]] = {}
    for patient in generate_people(people, seed):
        nhs = patient["identifier"][0]["value"]
        out[nhs] = _as_pds_patient(patient, nhs)
    return out


def generated_nhs_numbers(people: int = DEFAULT_PEOPLE, seed: int = DEFAULT_SEED) -> list[str]:
    """The NHS numbers the simulator knows for ``(people, seed)``, in generation order."""
    return list(generated_patients(people, seed))


def _outcome(
    status: int, code: str, spine_code: str, diagnostics: str
) -> tuple[dict[str, Any], int]:
    issue = {
        "severity": "error",
        "code": code,
        "details": {"coding": [{"system": SPINE_CODES, "version": "1", "code": spine_code}]},
        "diagnostics": diagnostics,
    }
    return {"resourceType": "OperationOutcome", "issue": [issue]}, status


def _respond(
    request: Request,
    body: dict[str, Any] | bytes | None,
    status: int = 200,
    headers: dict[str, str] | None = None,
) -> Response:
    out = dict(headers or {})
    # PDS echoes these so a client can correlate its logs with the server's.
    for name in ("x-request-id", "x-correlation-id"):
        if name in request.headers:
            out[name] = request.headers[name]
    content = body if isinstance(body, bytes) or body is None else orjson.dumps(body)
    return Response(content, status_code=status, headers=out, media_type=FHIR_JSON)


def _error(request: Request, status: int, code: str, spine_code: str, diagnostics: str) -> Response:
    body, status = _outcome(status, code, spine_code, diagnostics)
    return _respond(request, body, status)


async def _hang(request: Request, seconds: float) -> None:
    """Wait ``seconds`` or until the client goes away, whichever is first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(disconnected(), seconds)
    except TimeoutError:
        pass


async def _inject_faults(request: Request, state: PdsState, nhs_number: str) -> Response | None:
    """Apply the configured faults to one Patient request; a Response ends the request."""
    faults = state.faults
    state.requests[nhs_number] += 1
    state.request_times.setdefault(nhs_number, []).append(time.monotonic())
    delay = faults.latency_ms + state.rng.uniform(0.0, faults.jitter_ms)
    if delay > 0:
        await asyncio.sleep(delay / 1000)
    if state.requests[nhs_number] <= faults.fail_first:
        return _error(
            request, 503, "transient", "SERVICE_UNAVAILABLE", "Simulated outage (fail_first)."
        )
    draw = state.rng.random()
    if draw < faults.timeout_rate:
        await _hang(request, faults.hang_s)
        return _error(request, 504, "timeout", "TIMEOUT", "Simulated timeout.")
    draw -= faults.timeout_rate
    if draw < faults.error_rate:
        status = state.rng.choice((500, 503))
        return _error(
            request, status, "exception", "SERVICE_UNAVAILABLE", "Simulated server error."
        )
    draw -= faults.error_rate
    if draw < faults.malformed_rate:
        return _respond(request, _MALFORMED, 200)
    return None


def _invalid_id(nhs_number: str) -> str | None:
    # The path must carry the bare ten digits; spaced forms are for people, not URLs.
    if " " in nhs_number:
        return "An NHS number in a URL must be ten digits without spaces."
    return explain_invalid(nhs_number)


def pds_state(app: Starlette) -> PdsState:
    """The state of an app made by :func:`create_pds_app`."""
    state: PdsState = app.state.pds
    return state


def create_pds_app(
    people: int = DEFAULT_PEOPLE, seed: int = DEFAULT_SEED, faults: Faults | None = None
) -> Starlette:
    """A PDS-compatible FHIR app serving ``people`` generated people of ``seed``."""
    faults = faults or Faults()
    state = PdsState(
        patients=generated_patients(people, seed),
        faults=faults,
        rng=random.Random(faults.seed),
    )

    async def read(request: Request) -> Response:
        nhs = request.path_params["nhs_number"]
        if (failure := await _inject_faults(request, state, nhs)) is not None:
            return failure
        if reason := _invalid_id(nhs):
            return _error(request, 400, "value", "INVALID_RESOURCE_ID", reason)
        patient = state.patients.get(nhs)
        if patient is None:
            return _error(request, 404, "not-found", "RESOURCE_NOT_FOUND", "Patient not found.")
        return _respond(request, patient, headers={"ETag": f'W/"{patient["meta"]["versionId"]}"'})

    async def search(request: Request) -> Response:
        identifier = request.query_params.get("identifier")
        if not identifier:
            return _error(
                request, 400, "invalid", "INVALID_SEARCH_DATA",
                "The simulator searches by identifier only: "
                f"identifier={NHS_NUMBER_SYSTEM}|<NHS number>.",
            )  # fmt: skip
        system, bar, value = identifier.rpartition("|")
        if bar and system != NHS_NUMBER_SYSTEM:
            return _error(
                request, 400, "invalid", "INVALID_SEARCH_DATA",
                f"Only {NHS_NUMBER_SYSTEM} identifiers can be searched.",
            )  # fmt: skip
        if (failure := await _inject_faults(request, state, value)) is not None:
            return failure
        if reason := _invalid_id(value):
            return _error(request, 400, "value", "INVALID_SEARCH_DATA", reason)
        patient = state.patients.get(value)
        entries = []
        if patient is not None:
            entries.append(
                {
                    "fullUrl": f"{str(request.base_url).rstrip('/')}/Patient/{patient['id']}",
                    "search": {"score": 1},
                    "resource": patient,
                }
            )
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
            "total": len(entries),
            "entry": entries,
        }
        return _respond(request, bundle)

    async def put(request: Request) -> Response:
        nhs = request.path_params["nhs_number"]
        if reason := _invalid_id(nhs):
            return _error(request, 400, "value", "INVALID_RESOURCE_ID", reason)
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            return _error(request, 400, "invalid", "INVALID_VALUE", "The body is not JSON.")
        if not isinstance(body, dict) or body.get("resourceType") != "Patient":
            return _error(request, 400, "invalid", "INVALID_VALUE", "The body must be a Patient.")
        previous = state.patients.get(nhs)
        version = int(previous["meta"]["versionId"]) + 1 if previous else 1
        body.pop("meta", None)
        state.patients[nhs] = _as_pds_patient(body, nhs, version)
        return _respond(request, state.patients[nhs], 200 if previous else 201)

    async def delete(request: Request) -> Response:
        if state.patients.pop(request.path_params["nhs_number"], None) is None:
            return _error(request, 404, "not-found", "RESOURCE_NOT_FOUND", "Patient not found.")
        return Response(status_code=204)

    async def get_faults(request: Request) -> Response:
        return Response(orjson.dumps(asdict(state.faults)), media_type="application/json")

    async def put_faults(request: Request) -> Response:
        try:
            changes = orjson.loads(await request.body())
            names = {f.name for f in fields(Faults)}
            if not isinstance(changes, dict) or not set(changes) <= names:
                raise ValueError(f"send a JSON object with some of: {', '.join(sorted(names))}")
            state.set_faults(replace(state.faults, **changes))
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            return _error(request, 400, "invalid", "INVALID_VALUE", f"Bad faults: {exc}")
        return Response(orjson.dumps(asdict(state.faults)), media_type="application/json")

    async def metadata(request: Request) -> Response:
        return _respond(request, _capability_statement())

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not-found" if exc.status_code == 404 else "not-supported"
        spine = "RESOURCE_NOT_FOUND" if exc.status_code == 404 else "INVALID_REQUEST"
        return _error(
            request,
            exc.status_code,
            code,
            spine,
            f"{request.method} {request.url.path}: {exc.detail}",
        )

    app = Starlette(
        routes=[
            Route("/metadata", metadata, methods=["GET"]),
            Route("/Patient", search, methods=["GET"]),
            Route("/Patient/{nhs_number}", read, methods=["GET"]),
            Route("/Patient/{nhs_number}", put, methods=["PUT"]),
            Route("/Patient/{nhs_number}", delete, methods=["DELETE"]),
            Route("/_admin/faults", get_faults, methods=["GET"]),
            Route("/_admin/faults", put_faults, methods=["PUT"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.pds = state
    return app


def _capability_statement() -> dict[str, Any]:
    # http://hl7.org/fhir/R4/capabilitystatement.html
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-01-01",
        "kind": "instance",
        "software": {"name": "sharedcare PDS simulator"},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json"],
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {
                        "type": "Patient",
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "searchParam": [{"name": "identifier", "type": "token"}],
                    }
                ],
            }
        ],
    }


class SimulatorServer:
    """Serve an ASGI app with uvicorn on a real socket from a background thread.

    For tests, the demo and benchmarks (any simulator, not only PDS)::

        with SimulatorServer(create_pds_app()) as pds:
            httpx.get(f"{pds.url}/Patient/9434765919")
    """

    def __init__(self, app: ASGIApp, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.host = host
        self.port = port
        self.url = ""
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self, timeout: float = 10.0) -> str:
        """Bind, start serving and return the base URL once requests are accepted."""
        import uvicorn

        sock = bind_socket(self.host, self.port)
        self.port = sock.getsockname()[1]
        self.url = base_url(self.host, self.port)
        config = uvicorn.Config(
            self.app,
            lifespan="off",
            ws="none",  # the websockets import warns; simulators speak plain HTTP
            log_config=None,  # leave the host process's logging alone
            log_level=None,
            access_log=False,
            timeout_graceful_shutdown=1,  # hung (timeout-fault) requests must not hold shutdown
        )
        self._server = uvicorn.Server(config)

        def run() -> None:
            try:
                self._server.run(sockets=[sock])
            except BaseException as exc:  # noqa: BLE001 - reported to start()/stop()
                self._error = exc
            finally:
                sock.close()

        self._thread = threading.Thread(target=run, name=f"simulator:{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"simulator did not start on {self.url}: {self._error!r}")
            time.sleep(0.01)
        return self.url

    def stop(self) -> None:
        """Stop serving and wait for the thread (hung requests are cut off after 1 s)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)
            self._thread = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def base_url(host: str, port: int) -> str:
    """``http://host:port`` as a client should use it (wildcard hosts become loopback)."""
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
