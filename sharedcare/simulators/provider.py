"""A data provider's FHIR R4 API serving generated records, with configurable faults.

=====================================================  ==========================================
``GET /metadata``                                      CapabilityStatement (never faulted).
``GET /{type}?...``, ``POST /{type}/_search``          Searchset Bundle; parameters in
                                                       :mod:`sharedcare.simulators.provider_search`
                                                       (patient/subject, category, code, date,
                                                       ``_count`` with ``next`` links).
``GET /{type}/{id}``                                   Read; 404 OperationOutcome when unknown.
=====================================================  ==========================================

Types: Patient and :data:`sharedcare.simulators.clinical.CLINICAL_TYPES`. The provider's
Patient id is its local identifier value (``identifier_system|{id}``), so the hub routes a query
to ``Patient/{Linkage.value}``.

Simulator-only administration (never faulted): ``GET``/``PUT /_admin/faults`` (read or merge
the faults: a JSON object of :class:`ProviderFaults` fields) and ``GET /_admin/requests`` (the
last requests served, newest last: what the hub actually asked).

Faults apply to reads and searches, in this order: latency drawn from a lognormal distribution
given as ``(median, p99)`` milliseconds; then, drawn once per request from one seeded random
stream (so a sequential run is reproducible), a timeout (the request hangs for ``hang_s`` —
past any client deadline — ending early if the client disconnects), a server error (500, 502
or 503 with an OperationOutcome) or a malformed answer (status 200 with invalid JSON, an HTML
page, JSON that is not FHIR, or a Bundle with an invalid structure).

People are the first ``people`` of :func:`sharedcare.simulators.pds.generated_nhs_numbers`
for ``seed``, so PDS tracing with the same seed verifies them; each provider holds a
deterministic share of them, chosen by ``(seed, id)``. Registration with a hub's patient index
(IHE PIXm ITI-104) is in :mod:`sharedcare.simulators.registration`.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, date, datetime
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode

import orjson
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM
from sharedcare.simulators import clinical
from sharedcare.simulators.clinical import CLINICAL_TYPES, RESOURCE_TYPES, Shape, SimPerson
from sharedcare.simulators.pds import SimulatorServer, generated_patients
from sharedcare.simulators.provider_search import (
    DATES,
    TOKENS,
    Query,
    SearchError,
    parse,
    sort_key,
)

__all__ = [
    "ProviderConfig",
    "ProviderFaults",
    "ProviderServer",
    "ProviderState",
    "SimPerson",
    "create_provider_app",
    "provider_people",
    "provider_state",
    "register_people",
]

FHIR_JSON: Final = "application/fhir+json"
_Z99: Final = 2.3263478740408408  # the standard normal's 99th percentile


@dataclass(frozen=True, slots=True)
class ProviderFaults:
    """What the provider does wrong and how often (rates are probabilities 0..1)."""

    latency_ms: tuple[float, float] = (0.0, 0.0)  # lognormal (median, p99); p99 <= median: fixed
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    malformed_rate: float = 0.0
    hang_s: float = 30.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "latency_ms", tuple(float(v) for v in self.latency_ms))
        if len(self.latency_ms) != 2 or min(self.latency_ms) < 0:
            raise ValueError("latency_ms must be (median, p99), both >= 0")
        for name in ("error_rate", "timeout_rate", "malformed_rate"):
            rate = getattr(self, name)
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, not {rate}")
        if self.error_rate + self.timeout_rate + self.malformed_rate > 1.0:
            raise ValueError("error_rate + timeout_rate + malformed_rate must not exceed 1")
        if self.hang_s < 0:
            raise ValueError("hang_s must not be negative")

    def delay_ms(self, rng: random.Random) -> float:
        """One latency draw: lognormal with the configured median and 99th percentile."""
        median, p99 = self.latency_ms
        if median <= 0 or p99 <= median:
            return median
        sigma = math.log(p99 / median) / _Z99
        return min(median * math.exp(sigma * rng.gauss(0.0, 1.0)), self.hang_s * 1000)


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One simulated provider: who it is, whom it holds, how much, and how it misbehaves."""

    id: str  # = its client_id in the hub registry
    identifier_system: str = ""  # default https://fhir.example.org/{id}/Id/patient
    people: int = 300  # population: pds.generated_nhs_numbers(people, seed)
    seed: int = 2026
    share: float = 0.7  # fraction of the population this provider holds (chosen by seed + id)
    latency_ms: tuple[float, float] = (0.0, 0.0)  # lognormal (median, p99) per read/search
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    malformed_rate: float = 0.0
    hang_s: float = 30.0  # how long a timeout fault hangs
    fault_seed: int | None = None  # None: derived from seed and id (still reproducible)
    resources_per_search: int = 13  # Observations per person: a typical Observation search
    resource_bytes: int = 5000  # each clinical resource padded to about this size (0: none)
    default_count: int = 50  # page size without _count
    max_count: int = 1000
    include_total: bool = True  # Bundle.total on searchsets
    as_of: date = date(2026, 1, 1)  # records fall in the five years before
    name: str = ""  # organisation name in the CapabilityStatement

    def __post_init__(self) -> None:
        if not self.id or not all(c.isalnum() or c in "-." for c in self.id):
            raise ValueError(f"provider id must be letters, digits, '-' or '.', not {self.id!r}")
        if not self.identifier_system:
            system = f"https://fhir.example.org/{self.id}/Id/patient"
            object.__setattr__(self, "identifier_system", system)
        object.__setattr__(self, "latency_ms", tuple(float(v) for v in self.latency_ms))
        if not 0.0 <= self.share <= 1.0:
            raise ValueError(f"share must be between 0 and 1, not {self.share}")
        if self.people < 0 or self.resources_per_search < 0 or self.resource_bytes < 0:
            raise ValueError("people, resources_per_search and resource_bytes must be >= 0")
        if not 1 <= self.default_count <= self.max_count:
            raise ValueError("default_count must be between 1 and max_count")
        self.faults()  # validates the fault fields

    def faults(self) -> ProviderFaults:
        return ProviderFaults(
            latency_ms=self.latency_ms, error_rate=self.error_rate,
            timeout_rate=self.timeout_rate, malformed_rate=self.malformed_rate,
            hang_s=self.hang_s,
        )  # fmt: skip

    @property
    def shape(self) -> Shape:
        return Shape(self.resources_per_search, self.resource_bytes, self.as_of)


def _fraction(*parts: object) -> float:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def provider_people(config: ProviderConfig) -> list[SimPerson]:
    """The people ``config`` holds, in population order, with the provider's local ids."""
    prefix = ("".join(c for c in config.id.upper() if c.isalnum())[:3] or "P").ljust(3, "X")
    offset = int(_fraction(config.seed, config.id, "local-ids") * 10**7)
    out = []
    for index, (nhs, patient) in enumerate(generated_patients(config.people, config.seed).items()):
        if _fraction(config.seed, config.id, nhs) >= config.share:
            continue
        # An MRN-like local id: a per-provider permutation of the index (7654321 is coprime
        # with 10**7), so ids are unique and differ between providers.
        local_id = f"{prefix}{(index * 7_654_321 + offset) % 10**7:07d}"
        name = patient["name"][0]
        out.append(
            SimPerson(
                nhs_number=nhs,
                local_id=local_id,
                family=name["family"],
                given=tuple(name["given"]),
                gender=patient["gender"],
                birth_date=patient["birthDate"],
                address=patient["address"][0],
            )
        )
    return out


class ProviderData:
    """The provider's records, generated per person on first use and kept in memory."""

    def __init__(self, config: ProviderConfig):
        self.config = config
        self.people = provider_people(config)
        self.by_local = {p.local_id: p for p in self.people}
        self.by_nhs = {p.nhs_number: p for p in self.people}
        self._records: dict[str, dict[str, list[dict[str, Any]]]] = {}
        # Records never change once made, so each is serialised once (the benchmark's providers
        # must answer hundreds of ~65 KB searches a second).
        self._json: dict[tuple[str, str], bytes] = {}

    def records(self, local_id: str) -> dict[str, list[dict[str, Any]]]:
        """One person's resources by type (Patient included); empty when unknown."""
        cached = self._records.get(local_id)
        if cached is None:
            person = self.by_local.get(local_id)
            if person is None:
                return {}
            cached = {t: [] for t in RESOURCE_TYPES}
            cached["Patient"].append(person.patient(self.config.identifier_system))
            shape = self.config.shape
            for resource in clinical.records(self.config.id, self.config.seed, person, shape):
                cached[resource["resourceType"]].append(resource)
            newest_first = sort_key("-date")
            for type_, resources in cached.items():
                resources.sort(key=newest_first, reverse=True)
                for r in resources:
                    self._json[type_, r["id"]] = orjson.dumps(r)
            self._records[local_id] = cached
        return cached

    def resolve(self, value: str, system: str | None) -> str | None:
        """A local Patient id from a local or NHS number identifier."""
        if system in (None, "", self.config.identifier_system) and value in self.by_local:
            return value
        if system in (None, "", NHS_NUMBER_SYSTEM) and value in self.by_nhs:
            return self.by_nhs[value].local_id
        return None

    def read(self, type_: str, id_: str) -> dict[str, Any] | None:
        local = id_ if type_ == "Patient" else id_.rsplit("-", 1)[0]
        for resource in self.records(local).get(type_, ()):
            if resource["id"] == id_:
                return resource
        return None

    def json(self, resource: dict[str, Any]) -> bytes:
        """The resource serialised (cached)."""
        return self._json[resource["resourceType"], resource["id"]]

    def search(self, query: Query) -> list[dict[str, Any]]:
        locals_ = query.patients if query.patients is not None else self.by_local
        found = [
            r
            for local in locals_
            for r in self.records(local).get(query.type, ())
            if query.matches(r)
        ]
        if len(locals_) == 1 and query.sort == "-date":
            return found  # one person's records are kept newest first
        return sorted(found, key=sort_key(query.sort), reverse=query.sort == "-date")


@dataclass
class ProviderState:
    """A running provider's data, current faults and recent requests (for tests and the demo)."""

    config: ProviderConfig
    data: ProviderData
    faults: ProviderFaults
    rng: random.Random
    requests: deque[str] = field(default_factory=lambda: deque(maxlen=10_000))

    def set_faults(self, faults: ProviderFaults | None = None, **changes: Any) -> ProviderFaults:
        """Replace (or change some of) the faults; returns the faults now in force."""
        self.faults = replace(faults or self.faults, **changes)
        return self.faults


def provider_state(app: Starlette) -> ProviderState:
    """The state of an app made by :func:`create_provider_app`."""
    state: ProviderState = app.state.provider
    return state


# -- responses --------------------------------------------------------------------------------
def _outcome(status: int, code: str, diagnostics: str) -> Response:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}],
    }
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON)


def _fhir(body: dict[str, Any], status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type=FHIR_JSON)


_MALFORMED: Final = (
    (b'{"resourceType": "Bundle", "type": "searchset", "entry": [{"resource": {"resou', FHIR_JSON),
    (b"<html><body><h1>502 Bad Gateway</h1><p>nginx</p></body></html>", "text/html"),
    (b'{"status": "ok", "results": [], "message": "not a FHIR resource"}', "application/json"),
    (b'{"resourceType": "Bundle", "type": "searchset", "entry": "nothing"}', FHIR_JSON),
)


async def _hang(request: Request, seconds: float) -> None:
    """Wait ``seconds`` or until the client goes away, whichever is first."""

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    try:
        await asyncio.wait_for(disconnected(), seconds)
    except TimeoutError:
        pass


async def _inject_faults(request: Request, state: ProviderState) -> Response | None:
    """Apply the faults to one read or search; a Response ends the request."""
    faults = state.faults
    state.requests.append(f"{request.method} {request.url.path}?{request.url.query}".rstrip("?"))
    delay = faults.delay_ms(state.rng)
    draw = state.rng.random()
    if delay > 0:
        await asyncio.sleep(delay / 1000)
    if draw < faults.timeout_rate:
        await _hang(request, faults.hang_s)
        return _outcome(504, "timeout", "Simulated timeout.")
    draw -= faults.timeout_rate
    if draw < faults.error_rate:
        status = (500, 502, 503)[int(draw / max(faults.error_rate, 1e-12) * 3) % 3]
        return _outcome(status, "exception", "Simulated server error.")
    draw -= faults.error_rate
    if draw < faults.malformed_rate:
        body, media = _MALFORMED[int(draw / max(faults.malformed_rate, 1e-12) * 4) % 4]
        return Response(body, 200, media_type=media)
    return None


def _base(request: Request) -> str:
    return str(request.base_url).rstrip("/")


def _bundle(
    request: Request, state: ProviderState, query: Query, matches: list[dict[str, Any]]
) -> bytes:
    """The searchset, serialised; entries are spliced in from each record's cached JSON."""
    base = _base(request)
    total = len(matches)

    def link(relation: str, offset: int) -> dict[str, str]:
        params = [*query.used, ("_count", str(query.count))]
        if offset:
            params.append(("_offset", str(offset)))
        return {"relation": relation, "url": f"{base}/{query.type}?{urlencode(params)}"}

    links = [link("self", query.offset)]
    page: list[dict[str, Any]] = []
    if not query.summary_count:
        page = matches[query.offset : query.offset + query.count]
        if query.offset + query.count < total and query.count > 0:
            links.append(link("next", query.offset + query.count))
        if query.offset > 0:
            links.append(link("previous", max(query.offset - query.count, 0)))
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "meta": {"lastUpdated": datetime.now(UTC).isoformat(timespec="seconds")},
        "type": "searchset",
    }
    if state.config.include_total or query.summary_count:
        bundle["total"] = total
    bundle["link"] = links
    head = orjson.dumps(bundle)
    if not page:
        return head
    entries = b",".join(
        b'{"fullUrl":%b,"resource":%b,"search":{"mode":"match"}}'
        % (orjson.dumps(f"{base}/{r['resourceType']}/{r['id']}"), state.data.json(r))
        for r in page
    )
    return b'%b,"entry":[%b]}' % (head[:-1], entries)


def create_provider_app(config: ProviderConfig) -> Starlette:
    """A provider's FHIR R4 app serving the records :func:`provider_people` ``(config)`` hold."""
    faults = config.faults()
    fault_seed = (
        config.fault_seed if config.fault_seed is not None else f"{config.seed}:{config.id}"
    )
    state = ProviderState(
        config=config, data=ProviderData(config), faults=faults, rng=random.Random(fault_seed)
    )

    def type_of(request: Request) -> str:
        type_ = request.path_params["type"]
        if type_ not in RESOURCE_TYPES:
            raise HTTPException(404, f"This provider does not serve {type_!r} resources.")
        return type_

    async def search(request: Request) -> Response:
        type_ = type_of(request)
        params = list(request.query_params.multi_items())
        if request.method == "POST":  # search.html#Introduction: form-encoded parameters
            media = request.headers.get("content-type", "").split(";")[0].strip()
            if media != "application/x-www-form-urlencoded":
                return _outcome(
                    415,
                    "not-supported",
                    "POST _search takes application/x-www-form-urlencoded parameters.",
                )
            params += parse_qsl(
                (await request.body()).decode("utf-8", "replace"), keep_blank_values=True
            )
        if (failure := await _inject_faults(request, state)) is not None:
            return failure
        prefer = request.headers.get("prefer", "").replace(" ", "").lower()
        try:
            query = parse(
                type_,
                params,
                strict="handling=strict" in prefer,
                default_count=config.default_count,
                max_count=config.max_count,
                resolve_identifier=state.data.resolve,
            )
        except SearchError as exc:
            return _outcome(400, "invalid", str(exc))
        bundle = _bundle(request, state, query, state.data.search(query))
        return Response(bundle, media_type=FHIR_JSON)

    async def read(request: Request) -> Response:
        type_ = type_of(request)
        if (failure := await _inject_faults(request, state)) is not None:
            return failure
        resource = state.data.read(type_, request.path_params["id"])
        if resource is None:
            return _outcome(404, "not-found", f"{type_}/{request.path_params['id']} is not known.")
        return Response(state.data.json(resource), media_type=FHIR_JSON)

    async def metadata(request: Request) -> Response:
        return _fhir(_capability_statement(config, _base(request)))

    async def get_faults(request: Request) -> Response:
        return Response(orjson.dumps(asdict(state.faults)), media_type="application/json")

    async def put_faults(request: Request) -> Response:
        try:
            changes = orjson.loads(await request.body())
            names = {f.name for f in fields(ProviderFaults)}
            if not isinstance(changes, dict) or not set(changes) <= names:
                raise ValueError(f"send a JSON object with some of: {', '.join(sorted(names))}")
            state.set_faults(**changes)
        except (orjson.JSONDecodeError, ValueError, TypeError) as exc:
            return _outcome(400, "invalid", f"Bad faults: {exc}")
        return Response(orjson.dumps(asdict(state.faults)), media_type="application/json")

    async def get_requests(request: Request) -> Response:
        return Response(orjson.dumps(list(state.requests)), media_type="application/json")

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = "not-found" if exc.status_code == 404 else "not-supported"
        return _outcome(exc.status_code, code, f"{request.method} {request.url.path}: {exc.detail}")

    app = Starlette(
        routes=[
            Route("/metadata", metadata, methods=["GET"]),
            Route("/_admin/faults", get_faults, methods=["GET"]),
            Route("/_admin/faults", put_faults, methods=["PUT"]),
            Route("/_admin/requests", get_requests, methods=["GET"]),
            Route("/{type}", search, methods=["GET"]),
            Route("/{type}/_search", search, methods=["POST"]),
            Route("/{type}/{id}", read, methods=["GET"]),
        ],
        exception_handlers={HTTPException: http_error},
    )
    app.state.provider = state
    return app


def _capability_statement(config: ProviderConfig, base: str) -> dict[str, Any]:
    # http://hl7.org/fhir/R4/capabilitystatement.html
    def params(type_: str) -> list[dict[str, str]]:
        out = [{"name": "_id", "type": "token"}]
        if type_ != "Patient":
            out += [{"name": n, "type": "reference"} for n in ("patient", "subject", "encounter")]
        out += [{"name": n, "type": "token"} for n in TOKENS.get(type_, {})]
        out += [{"name": n, "type": "date"} for n in sorted(DATES.get(type_, {"date"}))]
        return out

    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-01-01",
        "publisher": config.name or config.id,
        "kind": "instance",
        "software": {"name": "sharedcare provider simulator"},
        "implementation": {"description": f"Simulated provider {config.id}", "url": base},
        "fhirVersion": "4.0.1",
        "format": [FHIR_JSON],
        "rest": [
            {
                "mode": "server",
                "resource": [
                    {
                        "type": type_,
                        "interaction": [{"code": "read"}, {"code": "search-type"}],
                        "searchParam": params(type_),
                    }
                    for type_ in RESOURCE_TYPES
                ],
            }
        ],
    }


class ProviderServer(SimulatorServer):
    """A provider simulator on a real socket, served from a background thread::

    with ProviderServer(ProviderConfig(id="leeds-pas")) as provider:
        httpx.get(f"{provider.base_url}/Observation", params={"patient": local_id})
    """

    def __init__(self, config: ProviderConfig, host: str = "127.0.0.1", port: int = 0):
        self.config = config
        super().__init__(create_provider_app(config), host, port)

    @property
    def base_url(self) -> str:
        """The provider's FHIR base URL (empty until started)."""
        return self.url

    @property
    def state(self) -> ProviderState:
        return provider_state(self.app)  # type: ignore[arg-type]

    @property
    def people(self) -> list[SimPerson]:
        return self.state.data.people


TokenProvider = Callable[[], Awaitable[str]]


async def register_people(
    config: ProviderConfig,
    hub_base: str,
    token_provider: TokenProvider,
    **options: Any,
) -> int:
    """Register ``config``'s people with the hub's patient index (IHE PIXm ITI-104 feed).

    See :func:`sharedcare.simulators.registration.register_people` for the options.
    """
    from sharedcare.simulators.registration import register_people as register

    return await register(config, hub_base, token_provider, **options)


__all__ += ["CLINICAL_TYPES"]
