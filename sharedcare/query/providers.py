"""Outbound HTTP to providers: one pooled aiohttp session per provider, deadlines, a circuit breaker.

aiohttp was measured against httpx for this job (``bench/http_clients.py``): fetching the
same ~65 KB searchset from three local servers in parallel, aiohttp used a fraction of
httpx's CPU per request, and CPU is what limits a hub node.

Every call returns a :class:`Fetched` value, never raises: a provider that times out,
refuses connections, answers an HTTP error or something that is not FHIR JSON, or whose
breaker is open, becomes a failure with a *class* (``timeout``, ``unavailable``,
``error``, ``invalid``, ``circuit_open``) and a message fit for a consumer: no stack
trace, no internal URL. A timeout the hub caused, by asking with less than
``FAIR_SHARE`` of the wait left, is counted as ``hub_busy`` and never opens the breaker.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import structlog
from yarl import URL

from sharedcare.query.metrics import record_provider

log = structlog.get_logger("sharedcare.query")
MAX_PROVIDER_BODY = 64 * 1024 * 1024  # a searchset page larger than this is not a sane answer
_FHIR_ACCEPT = {"Accept": "application/fhir+json"}
READ_BUFSIZE = 256 * 1024
FAIR_SHARE = 0.5  # a provider asked with less than this share of the wait left is not blamed
_ENCODED = re.compile(r"https?://[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


@dataclass(slots=True)
class Fetched:
    """What one provider request gave: a parsed JSON body, or a failure class and message."""

    provider: str
    status: int = 0
    body: Any = None
    failure: str | None = None  # timeout | unavailable | error | invalid | circuit_open
    message: str = ""
    seconds: float | None = None  # external round trip (None when never sent)
    sent_at: float = 0.0  # perf_counter() when the request went
    done_at: float = 0.0  # ... when the answer's last byte arrived, or the request ended

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass(slots=True)
class Breaker:
    """A consecutive-failure circuit breaker (closed → open → half-open with one trial)."""

    threshold: int
    open_seconds: float
    failures: int = 0
    open_until: float = 0.0
    trial: bool = False

    def allow(self, now: float) -> bool:
        if self.failures < self.threshold:
            return True
        if now < self.open_until or self.trial:
            return False
        self.trial = True  # half-open: this request is the trial
        return True

    def success(self) -> None:
        self.failures = 0
        self.trial = False

    @property
    def is_open(self) -> bool:
        """Open or half-open: only a trial request is let through."""
        return self.failures >= self.threshold

    def abandon(self) -> None:
        """The trial request ended without an answer either way: let another one through."""
        self.trial = False

    def failure(self, now: float) -> None:
        self.failures += 1
        self.trial = False
        if self.failures >= self.threshold:
            self.open_until = now + self.open_seconds


@dataclass
class ProviderClients:
    """The pooled clients of one hub process, keyed by provider id (made on first use)."""

    connections: int = 64
    connect_timeout: float = 0.5
    breaker_failures: int = 5
    breaker_open_seconds: float = 10.0
    _sessions: dict[str, aiohttp.ClientSession] = field(default_factory=dict)
    _breakers: dict[str, Breaker] = field(default_factory=dict)

    def breaker(self, provider: str) -> Breaker:
        found = self._breakers.get(provider)
        if found is None:
            found = self._breakers[provider] = Breaker(
                self.breaker_failures, self.breaker_open_seconds
            )
        return found

    def _session(self, provider: str) -> aiohttp.ClientSession:
        session = self._sessions.get(provider)
        if session is None or session.closed:
            connector = aiohttp.TCPConnector(
                limit=self.connections,
                limit_per_host=self.connections,
                keepalive_timeout=30,
                ttl_dns_cache=60,
            )
            session = aiohttp.ClientSession(
                connector=connector,
                # The deadline is asyncio.timeout(wait) around each request; the session only
                # bounds connecting (one timer fewer per request than a per-request timeout).
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_timeout),
                headers=_FHIR_ACCEPT,
                # Providers' cookies are never kept: one session serves every consumer, and
                # a cookie set for one consumer's request must not travel with the next.
                cookie_jar=aiohttp.DummyCookieJar(),
                # A searchset page is tens of KB: read it in one or two chunks, not many.
                read_bufsize=READ_BUFSIZE,
            )
            self._sessions[provider] = session
        return session

    def reset(self) -> None:
        """Close every breaker (tests; an operator restarting a process gets the same)."""
        self._breakers.clear()

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        for session in sessions:
            await session.close()

    async def get(
        self,
        provider: str,
        url: str,
        wait: float,
        *,
        request_id: str | None = None,
        check: Callable[[Any], str | None] | None = None,
        deadline: float | None = None,
        excuse_late: bool = True,
    ) -> Fetched:
        """GET ``url`` from ``provider`` within ``wait`` seconds; always returns.

        ``deadline`` (a ``time.perf_counter()`` instant) ends the wait earlier: the federated
        query counts the wait from when the hub received the consumer's request, so the
        consumer's own wait is bounded by it; with ``excuse_late`` (the hub's own work is
        all that came before this request), a timeout after the hub left the provider less
        than ``FAIR_SHARE`` of the wait is ``hub_busy``. ``check(body)`` returns why a parsed 2xx body
        is unusable (None when it is fine); an unusable body is an ``invalid`` failure, which
        counts against the breaker.
        """
        now = time.perf_counter()
        allowed = wait if deadline is None else min(wait, deadline - now)
        if allowed <= 0:
            record_provider(provider, "hub_busy", None)
            return Fetched(
                provider,
                failure="timeout",
                message=f"the hub was too busy to ask it within the {round(wait * 1000)} ms wait",
                sent_at=now,
                done_at=now,
            )
        # The hub used most of the wait before asking: a timeout is then not held against
        # the provider (its breaker and timeout count), or a busy hub would open every
        # provider's breaker. Such a request is never an open breaker's trial either.
        hub_late = excuse_late and allowed < wait * FAIR_SHARE
        breaker = self.breaker(provider)
        if (hub_late and breaker.is_open) or not breaker.allow(time.monotonic()):
            record_provider(provider, "circuit_open", None)
            return Fetched(
                provider,
                failure="circuit_open",
                message="it failed repeatedly just before, so the hub is not asking it for a few seconds",
                sent_at=now,
                done_at=now,
            )
        trial = breaker.trial
        result = Fetched(provider, sent_at=now)
        headers = {"X-Request-ID": request_id} if request_id else None
        try:
            async with asyncio.timeout(allowed):
                async with self._session(provider).get(_url(url), headers=headers) as response:
                    result.status = response.status
                    if response.content_length and response.content_length > MAX_PROVIDER_BODY:
                        raise _Invalid("its answer is too large")
                    raw = await response.read()
            # The provider's part ends with its last byte: parsing and checking the answer
            # are the hub's own time (the internal round trip), not the provider's.
            result.done_at = time.perf_counter()
            if result.status >= 400:
                result.failure = "error"
                result.message = f"it answered HTTP {result.status}"
            else:
                try:
                    result.body = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    raise _Invalid("its answer is not JSON") from None
                problem = check(result.body) if check is not None else None
                if problem:
                    result.body = None
                    raise _Invalid(problem)
        except (TimeoutError, aiohttp.ServerTimeoutError):
            result.failure = "timeout"
            result.message = f"it did not answer within {round(wait * 1000)} ms"
            if hub_late:
                result.message = (
                    f"it did not answer in the {round(allowed * 1000)} ms left of the "
                    f"{round(wait * 1000)} ms wait when the hub, busy, got to ask it"
                )
                result.done_at = time.perf_counter()
                record_provider(provider, "hub_busy", None)
                return result
        except asyncio.CancelledError:
            if trial:  # the consumer went away mid-trial: let the next request be the trial
                breaker.abandon()
            raise
        except _Invalid as exc:
            result.failure = "invalid"
            result.message = str(exc)
        except (aiohttp.ClientError, OSError) as exc:
            result.failure = "unavailable"
            result.message = "the hub could not reach it"
            log.info("provider unreachable", provider=provider, error=type(exc).__name__)
        result.done_at = result.done_at or time.perf_counter()
        result.seconds = result.done_at - now
        self.settle(result)
        return result

    def settle(self, result: Fetched) -> None:
        """Count the outcome and feed the breaker (a 4xx is our question's fault, not the provider's)."""
        outcome = result.failure or "ok"
        record_provider(result.provider, outcome, result.seconds)
        breaker = self.breaker(result.provider)
        if result.failure is None or (
            result.failure == "error" and result.status < 500 and result.status != 429
        ):
            breaker.success()
        else:
            breaker.failure(time.monotonic())


def _url(url: str) -> URL | str:
    """``url`` as a yarl URL that is not parsed and encoded again, when it is already encoded.

    The hub builds its provider URLs with urlencode, so re-encoding them is wasted work; a
    URL that came from elsewhere (a provider's next link) with anything outside RFC 3986's
    characters is left to aiohttp to encode.
    """
    if _ENCODED.fullmatch(url):
        return URL(url, encoded=True)
    return url


class _Invalid(Exception):
    """A provider answered something that is not a usable FHIR response."""
