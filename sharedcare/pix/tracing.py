"""Tracing: check a registration's demographics against a PDS-compatible FHIR endpoint.

The tracer reads ``GET {base}/Patient/{nhs_number}`` (as the NHS PDS FHIR API serves it)
and compares what the provider sent with what PDS holds. Each trace ends in one
:class:`TraceOutcome`:

* ``verified`` — PDS knows the number and every rule below holds: the registration may be linked;
* ``mismatch`` — PDS knows the number but the demographics disagree: flag, do not link;
* ``not_found`` — PDS answered 404;
* ``transient_error`` — 5xx, 408, 429, a timeout or a connection failure: retried through
  the durable queue with backoff;
* ``permanent_error`` — any other 4xx, a body that is not a Patient (malformed JSON
  included), a Patient that does not carry the requested NHS number (superseded or
  merged records), or an NHS number that fails Modulus 11 (refused without a request).

Matching rules (:func:`match_demographics`). A wrong link puts one person's records in
another's, so every rule errs towards ``mismatch``, which a person then reviews:

1. Birth date is required and must equal PDS's ``birthDate`` exactly (the same precision too:
   "1970-01" does not match "1970-01-02").
2. Family name is required and must equal, after normalisation, the family name of any of
   PDS's names (current or previous, any ``use``). Normalisation: Unicode NFKD, accents
   dropped, case folded, and whitespace, hyphens/dashes, apostrophes and full stops removed
   ("O'Brien" = "OBRIEN", "Smith-Jones" = "smith jones", "Zoë" = "Zoe"). Nothing looser:
   "Smith" does not match "Smith-Jones".
3. Given name, when supplied and when PDS holds any: the first letter of the first given
   name (normalised as above) must equal that of the first given name of any PDS name.
4. Gender, when both sides know it (male, female, other; HL7 v2 M/F/O accepted; unknown
   and absent are not compared), must be equal.
5. Postcode, when supplied and when PDS holds any (restricted records carry no address),
   must equal a postcode of any PDS address after removing spaces and upper-casing.

A mismatch's reasons name each differing field ("birth_date: does not match PDS") and never
carry PDS's values, so they are safe to log and to show to the submitting provider. The
PDS Patient itself is kept out of ``repr`` and logs.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import time
import unicodedata
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from enum import StrEnum
from types import TracebackType
from typing import Any, Final, Self

import httpx
import orjson
import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.pix.metrics import record_trace
from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM, explain_invalid, normalise_nhs_number
from sharedcare.queue import store as queue
from sharedcare.queue.worker import Handler, Permanent, Retry, Worker
from sharedcare.store.db import Database
from sharedcare.store.repository import now_utc

__all__ = [
    "TRACE_BACKOFF",
    "TRACE_QUEUE",
    "Demographics",
    "TraceOutcome",
    "TraceResult",
    "Tracer",
    "enqueue_trace",
    "match_demographics",
    "normalise_name",
    "normalise_postcode",
    "trace_handler",
    "trace_item",
    "trace_worker",
]

log = structlog.get_logger("sharedcare.pix")
FHIR_JSON: Final = "application/fhir+json"
TRACE_QUEUE: Final = "pix.trace"
# Retry a PDS outage every few minutes (at most 10) for a day, then report the trace as a
# final transient error so the index can show it instead of waiting for ever.
TRACE_BACKOFF: Final = queue.Backoff(base=1.0, cap=600.0, max_attempts=1000, expire_after=86_400.0)


class TraceOutcome(StrEnum):
    VERIFIED = "verified"
    MISMATCH = "mismatch"
    NOT_FOUND = "not_found"
    TRANSIENT_ERROR = "transient_error"
    PERMANENT_ERROR = "permanent_error"


@dataclass(frozen=True, slots=True)
class Demographics:
    """What a provider says about a person (FHIR value formats; all optional)."""

    family: str | None = None
    given: str | None = None
    birth_date: str | None = None  # FHIR date, YYYY-MM-DD
    gender: str | None = None  # FHIR administrative gender, or HL7 v2 M/F/O/U
    postcode: str | None = None

    @classmethod
    def from_patient(cls, patient: dict[str, Any]) -> Demographics:
        """The demographics of a provider's FHIR Patient (its official or first name, home address)."""
        names = [n for n in patient.get("name") or [] if isinstance(n, dict)]
        name = next(
            (n for n in names if n.get("use") in ("official", "usual")), names[0] if names else {}
        )
        addresses = [a for a in patient.get("address") or [] if isinstance(a, dict)]
        address = next(
            (a for a in addresses if a.get("use") == "home"), addresses[0] if addresses else {}
        )
        given = name.get("given") or []
        return cls(
            family=name.get("family"),
            given=given[0] if given else None,
            birth_date=patient.get("birthDate"),
            gender=patient.get("gender"),
            postcode=address.get("postalCode"),
        )


@dataclass(frozen=True, slots=True)
class TraceResult:
    """The outcome of one trace; ``pds_patient`` is PDS's record (never logged, not in repr)."""

    outcome: TraceOutcome
    reasons: tuple[str, ...] = ()
    latency_s: float = 0.0
    pds_patient: dict[str, Any] | None = field(default=None, repr=False)


# --- matching --------------------------------------------------------------------------------

# Whitespace, hyphen and dash variants, apostrophes (straight, curly, modifier letter), full stops.
_NAME_PUNCTUATION = re.compile(r"[\s\-\u2010-\u2015\u2212'\u2018\u2019\u02bc`\u00b4.]+")
_GENDERS: Final = {
    "male": "male",
    "female": "female",
    "other": "other",
    "m": "male",
    "f": "female",
    "o": "other",
}


def normalise_name(value: str) -> str:
    """A name reduced for comparison: no accents, case, spaces, hyphens, apostrophes or dots."""
    decomposed = unicodedata.normalize("NFKD", value)
    bare = "".join(c for c in decomposed if not unicodedata.combining(c))
    return _NAME_PUNCTUATION.sub("", bare.casefold())


def normalise_postcode(value: str) -> str:
    """A UK postcode without spaces, upper-cased ("ls1 1aa" → "LS11AA")."""
    return re.sub(r"\s+", "", value).upper()


def _gender(value: str | None) -> str | None:
    return _GENDERS.get((value or "").strip().lower())


def _strings(values: Iterable[Any]) -> list[str]:
    return [v for v in values if isinstance(v, str) and v.strip()]


def _initial(name: str) -> str:
    parts = name.split()
    normalised = normalise_name(parts[0]) if parts else ""
    return normalised[:1]


def match_demographics(submitted: Demographics, pds_patient: dict[str, Any]) -> tuple[str, ...]:
    """Reasons ``submitted`` does not match ``pds_patient``; empty when every rule holds."""
    reasons: list[str] = []
    names = [n for n in pds_patient.get("name") or [] if isinstance(n, dict)]

    birth_date, pds_birth = (submitted.birth_date or "").strip(), pds_patient.get("birthDate")
    if not birth_date:
        reasons.append("birth_date: not supplied; required to verify")
    elif not isinstance(pds_birth, str) or not pds_birth:
        reasons.append("birth_date: PDS holds none to compare")
    elif birth_date != pds_birth.strip():
        reasons.append("birth_date: does not match PDS")

    families = {normalise_name(f) for f in _strings(n.get("family") for n in names)}
    family = (submitted.family or "").strip()
    if not family:
        reasons.append("family: not supplied; required to verify")
    elif normalise_name(family) not in families:
        reasons.append("family: matches no current or previous PDS family name")

    pds_initials = {_initial(g[0]) for g in (_strings(n.get("given") or []) for n in names) if g}
    given = (submitted.given or "").strip()
    if given and pds_initials and _initial(given) not in pds_initials:
        reasons.append("given: first initial matches no PDS given name")

    mine, theirs = _gender(submitted.gender), _gender(pds_patient.get("gender"))
    if mine and theirs and mine != theirs:
        reasons.append("gender: does not match PDS")

    pds_postcodes = {
        normalise_postcode(a["postalCode"])
        for a in pds_patient.get("address") or []
        if isinstance(a, dict) and isinstance(a.get("postalCode"), str)
    }
    postcode = (submitted.postcode or "").strip()
    if postcode and pds_postcodes and normalise_postcode(postcode) not in pds_postcodes:
        reasons.append("postcode: matches no PDS address postcode")
    return tuple(reasons)


def _carries_number(patient: dict[str, Any], nhs_number: str) -> bool:
    identifiers = [i for i in patient.get("identifier") or [] if isinstance(i, dict)]
    listed = any(
        i.get("system") == NHS_NUMBER_SYSTEM and i.get("value") == nhs_number for i in identifiers
    )
    return listed and patient.get("id", nhs_number) == nhs_number


# --- the tracer --------------------------------------------------------------------------------


class Tracer:
    """Traces NHS numbers against a PDS-compatible FHIR base URL over one pooled client.

    Pass ``client`` to share a configured one (authentication, proxies, TLS); otherwise the
    tracer makes its own, closed by :meth:`aclose`. ``timeout_s`` bounds each trace end to end.
    """

    def __init__(
        self, base_url: str, client: httpx.AsyncClient | None = None, timeout_s: float = 5.0
    ):
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"the PDS base URL must be http:// or https://, not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        self._owns_client = client is None
        self.client = client or httpx.AsyncClient(
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 2.0)),
            limits=httpx.Limits(max_connections=50, max_keepalive_connections=20),
        )

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def trace(self, nhs_number: str, demographics: Demographics) -> TraceResult:
        """Trace one person; never raises for anything PDS or the network does."""
        problem = explain_invalid(nhs_number)
        if problem is not None:  # refused locally: not a tracing request, so not measured
            return TraceResult(TraceOutcome.PERMANENT_ERROR, (f"nhs_number: {problem}",))
        nhs = normalise_nhs_number(nhs_number)
        started = time.perf_counter()
        status: int | None = None
        outcome: TraceOutcome
        reasons: tuple[str, ...]
        patient: dict[str, Any] | None
        try:
            # httpx's timeouts are per phase; this bounds the whole exchange, body included.
            async with asyncio.timeout(self.timeout_s):
                response = await self.client.get(
                    f"{self.base_url}/Patient/{nhs}",
                    headers={"Accept": FHIR_JSON, "X-Request-ID": str(uuid.uuid4())},
                )
        except (TimeoutError, httpx.HTTPError) as exc:
            outcome, reasons, patient = (*_request_failure(exc, self.timeout_s), None)
        else:
            status = response.status_code
            outcome, reasons, patient = _interpret(response, nhs, demographics)
        latency = time.perf_counter() - started
        record_trace(outcome.value, latency)
        log.info(
            "pds trace",
            outcome=outcome.value,
            status=status,
            latency_ms=round(latency * 1000, 1),
            reasons=list(reasons),
        )
        return TraceResult(outcome, reasons, latency, patient)


def _request_failure(exc: Exception, timeout_s: float) -> tuple[TraceOutcome, tuple[str, ...]]:
    if isinstance(exc, TimeoutError | httpx.TimeoutException):
        return TraceOutcome.TRANSIENT_ERROR, (f"pds: no answer within {timeout_s:g} s",)
    if isinstance(exc, httpx.TransportError):  # refused, reset, DNS, protocol errors
        return TraceOutcome.TRANSIENT_ERROR, (f"pds: connection failed ({type(exc).__name__})",)
    return TraceOutcome.PERMANENT_ERROR, (f"pds: unusable response ({type(exc).__name__})",)


def _interpret(
    response: httpx.Response, nhs: str, demographics: Demographics
) -> tuple[TraceOutcome, tuple[str, ...], dict[str, Any] | None]:
    status = response.status_code
    if status == 404:
        return TraceOutcome.NOT_FOUND, ("pds: no record for this NHS number",), None
    if status >= 500 or status in (408, 429):
        return TraceOutcome.TRANSIENT_ERROR, (f"pds: HTTP {status}",), None
    if status != 200:
        return TraceOutcome.PERMANENT_ERROR, (f"pds: HTTP {status}{_spine_code(response)}",), None
    try:
        patient = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return TraceOutcome.PERMANENT_ERROR, ("pds: response is not valid JSON",), None
    if not isinstance(patient, dict) or patient.get("resourceType") != "Patient":
        return TraceOutcome.PERMANENT_ERROR, ("pds: response is not a Patient",), None
    if not _carries_number(patient, nhs):
        # PDS serves a superseded number's record under the new number: a merge to review.
        reason = "pds: the Patient returned does not carry this NHS number (superseded or merged?)"
        return TraceOutcome.PERMANENT_ERROR, (reason,), None
    reasons = match_demographics(demographics, patient)
    return (TraceOutcome.MISMATCH if reasons else TraceOutcome.VERIFIED), reasons, patient


def _spine_code(response: httpx.Response) -> str:
    """`` (CODE)`` from a PDS OperationOutcome, for operators; empty when there is none."""
    try:
        body = orjson.loads(response.content)
        code = body["issue"][0]["details"]["coding"][0]["code"]
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
        return ""
    return f" ({code})" if isinstance(code, str) and code.isidentifier() else ""


# --- durable queue -----------------------------------------------------------------------------

OnResult = Callable[[str, TraceResult], Awaitable[None]]


async def enqueue_trace(
    conn: AsyncConnection,
    registration_id: str,
    nhs_number: str,
    demographics: Demographics,
    *,
    key: str | None = None,
) -> bool:
    """Queue a trace in the caller's transaction; False if the same trace is already queued.

    The default idempotency key is the registration id plus a digest of the number and
    demographics, so resubmitting identical data queues nothing, while changed demographics
    queue a new trace. Traces of one registration run in enqueue order. Raises ValueError for
    an NHS number that fails Modulus 11 (refuse the registration instead).
    """
    payload, default_key = trace_item(registration_id, nhs_number, demographics)
    return await queue.enqueue(
        conn, TRACE_QUEUE, payload, key=key or default_key, partition=registration_id
    )


def trace_item(
    registration_id: str, nhs_number: str, demographics: Demographics
) -> tuple[dict[str, Any], str]:
    """The queue payload and default idempotency key of one trace (bulk loads insert many at once)."""
    if not registration_id or len(registration_id) > 200:
        raise ValueError("registration_id must be 1..200 characters")
    problem = explain_invalid(nhs_number)
    if problem is not None:
        raise ValueError(problem)
    payload = {
        "registration_id": registration_id,
        "nhs_number": normalise_nhs_number(nhs_number),
        "demographics": asdict(demographics),
    }
    digest = hashlib.sha256(orjson.dumps(payload, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]
    return payload, f"{registration_id}:{digest}"


def _gave_up(item: queue.Item, backoff: queue.Backoff) -> bool:
    if item.attempts >= backoff.max_attempts:
        return True
    return backoff.expire_after is not None and now_utc() >= item.created_at + timedelta(
        seconds=backoff.expire_after
    )


def trace_handler(
    tracer: Tracer, on_result: OnResult, backoff: queue.Backoff = TRACE_BACKOFF
) -> Handler:
    """A queue handler tracing each item and reporting final results to ``on_result``.

    Transient errors raise :class:`Retry` (the queue backs off with jitter) until ``backoff``
    would dead-letter the item; then the transient error is reported as final instead. Every
    other outcome is reported once and the item completes. Delivery is at least once: if
    ``on_result`` raises, the item is traced again later, so ``on_result`` must be idempotent.
    Run it with the same ``backoff`` (:func:`trace_worker` does).
    """

    async def handle(item: queue.Item) -> None:
        try:
            registration_id = item.payload["registration_id"]
            nhs_number = item.payload["nhs_number"]
            demographics = Demographics(**item.payload["demographics"])
        except (KeyError, TypeError) as exc:
            raise Permanent(f"malformed trace item: {exc!r}") from None
        result = await tracer.trace(nhs_number, demographics)
        if result.outcome is TraceOutcome.TRANSIENT_ERROR:
            if not _gave_up(item, backoff):
                raise Retry("; ".join(result.reasons))
            result = TraceResult(
                result.outcome,
                (*result.reasons, f"gave up after {item.attempts} attempts"),
                result.latency_s,
                None,
            )
        await on_result(registration_id, result)

    return handle


def trace_worker(
    db: Database,
    tracer: Tracer,
    on_result: OnResult,
    *,
    backoff: queue.Backoff = TRACE_BACKOFF,
    **options: Any,
) -> Worker:
    """A :class:`Worker` on :data:`TRACE_QUEUE` whose retry policy matches its handler's."""
    return Worker(
        db, TRACE_QUEUE, trace_handler(tracer, on_result, backoff), backoff=backoff, **options
    )
