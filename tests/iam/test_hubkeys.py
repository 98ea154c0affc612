"""The hub's signing keys rotate, are shared through the database, and retire after their tokens."""

from __future__ import annotations

from typing import Any

import pytest

from sharedcare.iam.hubkeys import HubKeys
from sharedcare.iam.tokens import AccessTokens, TokenInvalid

ISSUER, AUDIENCE = "http://hub", "http://hub/fhir"


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def process(db: Any, clock: Clock, alg: str = "ES384") -> AccessTokens:
    """The key and token objects one hub process would have."""
    keys = HubKeys(db, alg=alg, rotation_seconds=100, token_lifetime=300, clock=clock)
    return AccessTokens(keys, issuer=ISSUER, audience=AUDIENCE, lifetime=300, clock=clock)


async def issue(tokens: AccessTokens) -> str:
    return (await tokens.issue(client_id="c", scopes=["system/*.read"], participant_organization=None, end_user=None))[0]


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
async def test_keys_rotate_and_old_ones_stay_until_their_tokens_expire(app: Any, alg: str) -> None:
    db = app.state.db
    clock = Clock(1_000_000.0)
    one, two = process(db, clock, alg), process(db, clock, alg)
    old = await issue(one)
    assert (await two.verify(old)).client_id == "c"  # another process finds the key in the database
    assert (await one.keys.jwks())["keys"][0]["kid"] == f"hub-{alg.lower()}-10000"

    clock.now += 100  # next slot: a new key signs, the old one is still published
    new = await issue(two)
    kids = [k["kid"] for k in (await one.keys.jwks())["keys"]]
    assert kids == [f"hub-{alg.lower()}-10001", f"hub-{alg.lower()}-10000"]
    assert (await process(db, clock, alg).verify(old)).client_id == "c"
    assert (await one.verify(new)).client_id == "c"

    clock.now += 300 + 60  # the old key's last token has expired: it is retired
    await issue(process(db, clock, alg))  # a new slot's key is created, and old rows pruned
    kids = [k["kid"] for k in (await one.keys.jwks())["keys"]]
    assert f"hub-{alg.lower()}-10000" not in kids
    with pytest.raises(TokenInvalid):
        await process(db, clock, alg).verify(old)


async def test_random_kids_never_reach_the_database(app: Any) -> None:
    keys = HubKeys(app.state.db, alg="ES384", rotation_seconds=100, token_lifetime=300, clock=Clock(1_000_000.0))
    assert await keys.public_key("anything") is None
    assert await keys.public_key("hub-es384-1") is None  # a slot long gone
