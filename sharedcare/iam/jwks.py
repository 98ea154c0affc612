"""Fetched client JWKS documents, cached as their ``Cache-Control`` allows.

SMART (client-confidential-asymmetric.html#signature-verification): a server must not
cache a JWKS longer than the client's Cache-Control allows, and re-fetches it when an
assertion names a kid it does not know (the client rotated its key). Here:

- ``no-store`` / ``no-cache`` / ``max-age=0``: used for the one assertion, not kept;
- ``max-age=N``: kept N seconds (at most a day); no header: kept ``DEFAULT_TTL`` seconds;
- an unknown kid forces one re-fetch, then at most one per ``FORCED_REFRESH_INTERVAL``
  seconds per URL, so random kids cannot make the hub hammer a client's server;
- at most ``max_entries`` URLs (least recently used go first), documents of at most
  ``MAX_BYTES`` bytes; concurrent misses for one URL share one fetch.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import orjson
from joserfc.jwk import KeySet

from sharedcare.registry.model import RegistryError, check_url, parse_jwks

DEFAULT_TTL = 300.0
MAX_TTL = 86_400.0
FORCED_REFRESH_INTERVAL = 5.0
MAX_BYTES = 64 * 1024
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?", re.IGNORECASE)


class JwksUnavailable(Exception):
    """The JWKS could not be fetched or is not a usable key set."""


def ttl_from(cache_control: str | None) -> float:
    """Seconds a response may be reused, per RFC 9111 §5.2.2 (no-store, no-cache, max-age)."""
    if not cache_control:
        return DEFAULT_TTL
    lowered = cache_control.lower()
    if "no-store" in lowered or "no-cache" in lowered:
        return 0.0
    match = _MAX_AGE.search(lowered)
    return min(float(match.group(1)), MAX_TTL) if match else DEFAULT_TTL


@dataclass
class _Entry:
    keys: KeySet | None = None
    expires: float = 0.0
    forced_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class JwksCache:
    """Client key sets by URL, bounded and shared by the requests of one process."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        max_entries: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.http = http
        self.max_entries = max_entries
        self.clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self.fetches = 0  # for tests and the benchmark

    async def keys(self, url: str, *, refresh: bool = False) -> KeySet:
        """The key set at ``url``; ``refresh`` asks for a re-fetch (an unknown kid was seen)."""
        entry = self._entries.get(url)
        if entry is None:
            entry = self._entries[url] = _Entry()
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        self._entries.move_to_end(url)
        async with entry.lock:
            now = self.clock()
            if entry.keys is not None and now < entry.expires:
                if not refresh or now - entry.forced_at < FORCED_REFRESH_INTERVAL:
                    return entry.keys
                entry.forced_at = now
            keys, ttl = await self._fetch(url)
            entry.keys, entry.expires = keys, self.clock() + ttl
            return keys

    async def _fetch(self, url: str) -> tuple[KeySet, float]:
        try:
            check_url(url, "the JWKS URL", https_unless_local=True)
            self.fetches += 1
            async with self.http.stream("GET", url, headers={"Accept": "application/json"}) as response:
                if response.status_code != 200:
                    raise JwksUnavailable(f"GET {url} answered {response.status_code}")
                body = b""
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_BYTES:
                        raise JwksUnavailable(f"the JWKS at {url} is larger than {MAX_BYTES} bytes")
                ttl = ttl_from(response.headers.get("cache-control"))
            return parse_jwks(orjson.loads(body)), ttl
        except (httpx.HTTPError, orjson.JSONDecodeError, RegistryError) as exc:
            raise JwksUnavailable(f"the JWKS at {url} is unavailable: {exc}") from None
