"""The client JWKS cache: Cache-Control, forced refresh on an unknown kid, bounded size."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from sharedcare.iam.jwks import DEFAULT_TTL, MAX_TTL, JwksCache, JwksUnavailable, ttl_from


@pytest.mark.parametrize(
    ("header", "ttl"),
    [
        (None, DEFAULT_TTL),
        ("max-age=60", 60.0),
        ("public, max-age=120, must-revalidate", 120.0),
        ('max-age="30"', 30.0),
        ("max-age=99999999", MAX_TTL),
        ("no-store", 0.0),
        ("no-cache, max-age=600", 0.0),
        ("private", DEFAULT_TTL),
    ],
)
def test_ttl_follows_cache_control(header: str | None, ttl: float) -> None:
    assert ttl_from(header) == ttl


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_cached_until_max_age_then_fetched_again(jwks_server: Any, es_key: Any) -> None:
    jwks_server.jwks = {"keys": [es_key.as_dict(private=False)]}
    jwks_server.cache_control = "max-age=60"
    clock = Clock()
    async with httpx.AsyncClient() as http:
        cache = JwksCache(http, clock=clock)
        await cache.keys(jwks_server.url)
        clock.now = 59
        await cache.keys(jwks_server.url)
        assert jwks_server.requests == 1
        clock.now = 61
        await cache.keys(jwks_server.url)
        assert jwks_server.requests == 2


async def test_unknown_kid_forces_a_refresh_at_most_every_few_seconds(jwks_server: Any, es_key: Any) -> None:
    jwks_server.jwks = {"keys": [es_key.as_dict(private=False)]}
    clock = Clock()
    async with httpx.AsyncClient() as http:
        cache = JwksCache(http, clock=clock)
        await cache.keys(jwks_server.url)
        await cache.keys(jwks_server.url, refresh=True)  # the first forced refresh goes through
        await cache.keys(jwks_server.url, refresh=True)  # a burst of random kids does not
        assert jwks_server.requests == 2
        clock.now = 6
        await cache.keys(jwks_server.url, refresh=True)
        assert jwks_server.requests == 3


async def test_cache_is_bounded(jwks_servers: list[Any], es_key: Any) -> None:
    for server in jwks_servers:
        server.jwks = {"keys": [es_key.as_dict(private=False)]}
    async with httpx.AsyncClient() as http:
        cache = JwksCache(http, max_entries=2)
        for server in jwks_servers:
            await cache.keys(server.url)
        assert len(cache._entries) == 2
        await cache.keys(jwks_servers[0].url)  # evicted (least recently used): fetched again
        assert jwks_servers[0].requests == 2 and jwks_servers[2].requests == 1


async def test_bad_documents_are_unavailable(jwks_server: Any) -> None:
    jwks_server.jwks = {"keys": [{"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0", "kid": "hmac"}]}
    async with httpx.AsyncClient() as http:
        with pytest.raises(JwksUnavailable):
            await JwksCache(http).keys(jwks_server.url)
        with pytest.raises(JwksUnavailable):
            await JwksCache(http).keys("http://jwks.example.org/keys")  # plain http off this machine
