"""Stateless, signed paging cursors for federated searches.

A ``next`` link is ``{hub}/fhir/{Type}?_cursor={token}``. The token is a compact JWS signed
with the hub's current signing key (the same keys as access tokens, shared by every hub
process through the database, rotated and published the same way), holding:

- ``typ`` ``query-cursor``; ``t`` the resource type; ``p`` the hub person id; ``c`` the
  consumer's client id (another client cannot use the link); ``n`` the page size; ``exp``;
- ``s``: per provider still holding matches, ``[url, skip]``: the provider's own page to
  fetch (its ``next`` link, or the page it gave last) and how many of its entries were
  already returned (a merged page keeps to ``_count``, so part of a provider page may be left
  for later).

Why stateless: any hub process can continue any query with no database write per page and
nothing to expire; the signature stops a consumer from pointing the hub at other URLs or at
another person's records (the hub also checks each URL is under the provider's registered
FHIR base, and consent and audit run again on every page).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
from joserfc import jws
from joserfc.errors import JoseError

from sharedcare.fhir.errors import FHIRError
from sharedcare.iam.hubkeys import HubKeys

CURSOR_TYPE = "query-cursor"
MAX_CURSOR_BYTES = 16 * 1024


@dataclass(frozen=True, slots=True)
class Cursor:
    rtype: str
    person_id: str
    client_id: str
    count: int
    providers: dict[str, tuple[str, int]]  # provider -> (url, skip)


def _expired() -> FHIRError:
    return FHIRError.of(
        410,
        "expired",
        "This next link has expired or is not valid; run the search again from the start.",
    )


async def sign(keys: HubKeys, cursor: Cursor, lifetime: int) -> str:
    key = await keys.signing_key()
    payload = {
        "typ": CURSOR_TYPE,
        "t": cursor.rtype,
        "p": cursor.person_id,
        "c": cursor.client_id,
        "n": cursor.count,
        "s": {p: [u, k] for p, (u, k) in cursor.providers.items()},
        "exp": int(time.time()) + lifetime,
    }
    header = {"alg": key.alg, "kid": key.kid}
    return jws.serialize_compact(header, orjson.dumps(payload), key, algorithms=[str(key.alg)])


async def verify(keys: HubKeys, token: str, *, rtype: str, client_id: str) -> Cursor:
    """The cursor in ``token``; 410 when it is forged, expired or for another type or client."""
    if len(token) > MAX_CURSOR_BYTES:
        raise _expired()
    try:
        obj = jws.extract_compact(token.encode("ascii"))
        kid = obj.headers().get("kid")
        key = await keys.public_key(kid) if isinstance(kid, str) else None
        if key is None or not jws.validate_compact(obj, key, algorithms=[str(key.alg)]):
            raise _expired()
        claims: dict[str, Any] = orjson.loads(obj.payload or b"")
        providers = {str(p): (str(v[0]), int(v[1])) for p, v in claims["s"].items()}
        cursor = Cursor(
            str(claims["t"]), str(claims["p"]), str(claims["c"]), int(claims["n"]), providers
        )
        ok = claims.get("typ") == CURSOR_TYPE and int(claims["exp"]) > time.time()
    except (
        JoseError,
        ValueError,
        UnicodeError,
        KeyError,
        TypeError,
        IndexError,
        orjson.JSONDecodeError,
    ):
        raise _expired() from None
    if not ok or cursor.client_id != client_id:
        raise _expired()
    if cursor.rtype != rtype:
        raise FHIRError.of(
            400, "invalid", f"This next link is for a {cursor.rtype} search, not {rtype}."
        )
    return cursor
