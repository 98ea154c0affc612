"""A simulated message recipient: a real HTTP messaging endpoint with latency, failures and outages.

=========================================  ===================================================
``POST /messages``                         The messaging endpoint to register
                                           (``--messaging-endpoint {base}/messages``): takes a
                                           FHIR message Bundle, answers 200 (or a fault).
``GET /_admin/received``                   What arrived: ``{"messages": [...], "duplicates": n}``
                                           in arrival order (bundle id, header id, source,
                                           response code, time, acknowledged time);
                                           ``?compact=1``: ``[bundle id, time]`` pairs.
``GET``/``PUT /_admin/faults``             Read or change the faults (JSON; PUT merges).
=========================================  ===================================================

Faults, in order: ``down`` (503 at once; also during scheduled outages: down for
``outage_seconds`` out of every ``outage_every`` seconds), latency (``latency_ms`` plus a
uniform ``0..jitter_ms``), then ``failure_rate`` (500).

With ``ack`` on and hub credentials given, each new message (not responses) is answered
with a response message (``MessageHeader.response.code`` = ``ack_code``) sent to the hub's
``$process-message`` from a background task, retried until the hub takes it (202); the
response's Bundle.id is derived from the original's, so a resent response is recognised.
A message that arrives again (same Bundle.id) is recorded as a duplicate and answered 200
(and acknowledged again), as FHIR reliable messaging asks of a receiver.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

FHIR_JSON = "application/fhir+json"


@dataclass(frozen=True, slots=True)
class RecipientFaults:
    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    failure_rate: float = 0.0
    down: bool = False
    outage_every: float = 0.0
    outage_seconds: float = 0.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError(f"failure_rate must be between 0 and 1, not {self.failure_rate}")
        for name in ("latency_ms", "jitter_ms", "outage_every", "outage_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.outage_seconds and self.outage_seconds >= self.outage_every:
            raise ValueError("outage_seconds must be shorter than outage_every")


@dataclass(frozen=True, slots=True)
class AckConfig:
    """How the simulator answers: as ``client_id`` with its private JWK, through ``hub``."""

    hub: str  # the hub's base URL (without /fhir)
    client_id: str
    key: Any  # a joserfc key (see sharedcare.iam.client.generate_key)
    code: str = "ok"


@dataclass
class RecipientState:
    faults: RecipientFaults
    ack: AckConfig | None = None
    received: list[dict[str, Any]] = field(default_factory=list)
    seen: dict[str, dict[str, Any]] = field(default_factory=dict)  # bundle id → first receipt
    duplicates: int = 0
    started: float = field(default_factory=time.monotonic)
    rng: random.Random = field(default_factory=random.Random)
    _acks: asyncio.Queue[dict[str, Any]] | None = None
    _token: tuple[float, str] = (0.0, "")
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def down_now(self) -> bool:
        f = self.faults
        if f.down:
            return True
        if f.outage_every and f.outage_seconds:
            return (time.monotonic() - self.started) % f.outage_every < f.outage_seconds
        return False


def create_recipient_app(
    faults: RecipientFaults | None = None, ack: AckConfig | None = None
) -> Starlette:
    """The simulator's ASGI app; its state is ``app.state.recipient``."""
    state = RecipientState(faults or RecipientFaults(), ack)
    state.rng = random.Random(state.faults.seed)

    async def receive(request: Request) -> Response:
        f = state.faults
        if state.down_now():
            return _outcome(503, "transient", "Recipient simulator: down (outage).")
        delay = f.latency_ms + (state.rng.uniform(0, f.jitter_ms) if f.jitter_ms else 0.0)
        if delay:
            await asyncio.sleep(delay / 1000)
        if f.failure_rate and state.rng.random() < f.failure_rate:
            return _outcome(500, "exception", "Recipient simulator: injected failure.")
        try:
            bundle = orjson.loads(await request.body())
            header = bundle["entry"][0]["resource"]
            bundle_id = bundle["id"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            return _outcome(400, "invalid", "Not a FHIR message Bundle.")
        response = header.get("response") or {}
        record = {
            "bundle_id": bundle_id,
            "header_id": header.get("id"),
            "source": (header.get("source") or {}).get("endpoint"),
            "event": header.get("eventCoding") or header.get("eventUri"),
            "response_to": response.get("identifier"),
            "response_code": response.get("code"),
            "at": time.time(),
            "authorization": request.headers.get("authorization", "")[:20],
        }
        state.received.append(record)
        first = state.seen.get(bundle_id)
        if first is not None:
            state.duplicates += 1
            record["duplicate"] = True
        else:
            state.seen[bundle_id] = record
        if state.ack is not None and not response:
            _start_ack_sender(state)
            assert state._acks is not None
            state._acks.put_nowait({"bundle": bundle_id, "header": header})
        return Response(b"", 200)

    async def received(request: Request) -> Response:
        if request.query_params.get("compact"):  # [bundle id, arrival time] pairs, for benchmarks
            pairs = [[r["bundle_id"], r["at"]] for r in state.received]
            return Response(
                orjson.dumps({"messages": pairs, "duplicates": state.duplicates}),
                media_type="application/json",
            )
        return Response(
            orjson.dumps({"messages": state.received, "duplicates": state.duplicates}),
            media_type="application/json",
        )

    async def faults_route(request: Request) -> Response:
        if request.method == "PUT":
            changes = orjson.loads(await request.body() or b"{}")
            known = {f.name for f in fields(RecipientFaults)}
            try:
                state.faults = replace(
                    state.faults, **{k: v for k, v in changes.items() if k in known}
                )
            except (TypeError, ValueError) as exc:
                return _outcome(400, "invalid", str(exc))
        return Response(orjson.dumps(asdict(state.faults)), media_type="application/json")

    app = Starlette(
        routes=[
            Route("/messages", receive, methods=["POST"]),
            Route("/_admin/received", received, methods=["GET"]),
            Route("/_admin/faults", faults_route, methods=["GET", "PUT"]),
        ]
    )
    app.state.recipient = state
    return app


def _outcome(status: int, code: str, text: str) -> Response:
    body = {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}],
    }
    return Response(orjson.dumps(body), status, media_type=FHIR_JSON)


def response_for(
    header: dict[str, Any], bundle_id: str, client_id: str, code: str
) -> dict[str, Any]:
    """The response message answering ``header`` (Bundle.id derived from the original's)."""
    rid = str(uuid.uuid5(uuid.NAMESPACE_URL, f"ack:{client_id}:{bundle_id}"))
    return {
        "resourceType": "Bundle",
        "id": rid,
        "type": "message",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{rid}",
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": rid,
                    "eventCoding": header.get("eventCoding") or {"code": "ack"},
                    "destination": [{"endpoint": (header.get("source") or {}).get("endpoint")}],
                    "source": {"endpoint": f"urn:participant:{client_id}"},
                    "response": {"identifier": header.get("id"), "code": code},
                },
            }
        ],
    }


def _start_ack_sender(state: RecipientState) -> None:
    if state._acks is not None:
        return
    state._acks = asyncio.Queue()
    state._tasks = [asyncio.create_task(_ack_loop(state)) for _ in range(8)]


async def _ack_loop(state: RecipientState) -> None:
    import aiohttp

    from sharedcare.iam.client import sign_assertion, token_form

    ack = state.ack
    assert ack is not None and state._acks is not None
    token_url = f"{ack.hub}/oauth2/token"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

        async def token() -> str:
            if state._token[0] > time.time() + 30:
                return state._token[1]
            assertion = sign_assertion(ack.key, ack.client_id, token_url)
            async with http.post(
                token_url, data=dict(token_form(assertion, "system/MessageHeader.c"))
            ) as r:
                body = await r.json()
                if r.status != 200:
                    raise RuntimeError(f"token refused: {body}")
            state._token = (time.time() + int(body.get("expires_in", 60)), body["access_token"])
            return state._token[1]

        while True:
            job = await state._acks.get()
            body = orjson.dumps(response_for(job["header"], job["bundle"], ack.client_id, ack.code))
            delay = 0.2
            while True:
                try:
                    headers = {
                        "Authorization": f"Bearer {await token()}",
                        "Content-Type": FHIR_JSON,
                    }
                    async with http.post(
                        f"{ack.hub}/fhir/$process-message", data=body, headers=headers
                    ) as r:
                        await r.read()
                        if r.status == 202:
                            record = state.seen.get(job["bundle"])
                            if record is not None and "acked_at" not in record:
                                record["acked_at"] = time.time()
                            break
                        if r.status == 401:
                            state._token = (0.0, "")
                        elif 400 <= r.status < 500 and r.status not in (408, 429):
                            break  # the hub refuses it for good; nothing to retry
                except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError, ValueError):
                    pass
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
