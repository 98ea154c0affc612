"""The hub's own signing keys: stored in the database, rotated, published as a JWKS.

Time is cut into rotation slots (setting ``hub_key_rotation_hours``). The key of slot
``n`` has kid ``hub-<alg>-<n>``: the first process that needs it generates it and inserts it
with ON CONFLICT DO NOTHING, and every process then reads the one row that won, so all
processes sign with the same key. A key signs during its slot and stays published (and
accepted) until the last token it signed has expired; then it is deleted.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import orjson
from joserfc.jwk import ECKey, RSAKey
from sqlalchemy import delete, select

from sharedcare.iam.client import generate_key
from sharedcare.iam.schema import iam_keys
from sharedcare.iam.sql import insert_for
from sharedcare.store.db import Database

KID_RE = re.compile(r"^hub-(rs384|es384)-(\d{1,12})$")
LEEWAY = 60  # seconds a retired key stays published beyond the tokens it signed
MISS_TTL = 5.0  # seconds an unknown kid is remembered as unknown


def import_jwk(text: str) -> ECKey | RSAKey:
    data = orjson.loads(text)
    return ECKey.import_key(data) if data["kty"] == "EC" else RSAKey.import_key(data)


class HubKeys:
    """The signing key of the current slot, and the public keys still accepted."""

    def __init__(
        self,
        db: Database,
        *,
        alg: str,
        rotation_seconds: int,
        token_lifetime: int,
        clock: Callable[[], float] = time.time,
    ):
        self.db = db
        self.alg = alg
        self.rotation = max(1, int(rotation_seconds))
        self.token_lifetime = token_lifetime
        self.clock = clock
        self._current: tuple[ECKey | RSAKey, int] | None = None  # (key, sign_until)
        self._public: dict[str, tuple[ECKey | RSAKey, int]] = {}  # kid -> (key, publish_until)
        self._missing: dict[str, float] = {}
        self._lock = asyncio.Lock()

    def _slot(self, now: float) -> int:
        return int(now // self.rotation)

    async def signing_key(self) -> ECKey | RSAKey:
        """The key to sign with now, created in the database if this slot has none yet."""
        now = self.clock()
        if self._current is not None and now < self._current[1]:
            return self._current[0]
        async with self._lock:
            if self._current is not None and now < self._current[1]:
                return self._current[0]
            slot = self._slot(now)
            kid = f"hub-{self.alg.lower()}-{slot}"
            row = await self._row(kid)
            if row is None:
                await self._create(kid, slot, now)
                row = await self._row(kid)
            assert row is not None
            key = import_jwk(row.private_jwk)
            self._current = (key, row.sign_until)
            self._public[kid] = (import_jwk(row.public_jwk), row.publish_until)
            return key

    async def _row(self, kid: str) -> Any:
        async with self.db.read() as conn:
            return (await conn.execute(select(iam_keys).where(iam_keys.c.kid == kid))).first()

    async def _create(self, kid: str, slot: int, now: float) -> None:
        # RSA key generation takes tens of milliseconds: keep it off the event loop.
        key = await asyncio.to_thread(generate_key, self.alg, kid)  # type: ignore[arg-type]
        sign_until = (slot + 1) * self.rotation
        row = {
            "kid": kid,
            "alg": self.alg,
            "private_jwk": orjson.dumps(key.as_dict(private=True)).decode(),
            "public_jwk": orjson.dumps(key.as_dict(private=False)).decode(),
            "created_at": int(now),
            "sign_until": sign_until,
            "publish_until": sign_until + self.token_lifetime + LEEWAY,
        }

        async def write(conn: Any) -> None:
            await conn.execute(insert_for(self.db.dialect, iam_keys).values(**row).on_conflict_do_nothing())
            await conn.execute(delete(iam_keys).where(iam_keys.c.publish_until < int(now)))

        await self.db.write(write)

    def cached_public_key(self, kid: str) -> ECKey | RSAKey | None:
        """A public key already known to this process (no I/O), if still published."""
        hit = self._public.get(kid)
        if hit is not None and self.clock() < hit[1]:
            return hit[0]
        return None

    async def public_key(self, kid: str) -> ECKey | RSAKey | None:
        """The public key for ``kid`` if the hub signed with it and it is still published."""
        key = self.cached_public_key(kid)
        if key is not None:
            return key
        now = self.clock()
        match = KID_RE.match(kid)
        # Only kids of plausible slots reach the database: random kids cost nothing.
        if match is None or abs(int(match.group(2)) - self._slot(now)) > 2 + self.token_lifetime // self.rotation:
            return None
        if now - self._missing.get(kid, float("-inf")) < MISS_TTL:
            return None
        row = await self._row(kid)
        if row is None or row.publish_until <= now:
            self._missing[kid] = now
            if len(self._missing) > 1000:
                self._missing.clear()
            return None
        self._public[kid] = (import_jwk(row.public_jwk), row.publish_until)
        return self._public[kid][0]

    async def jwks(self) -> dict[str, Any]:
        """The hub's published keys (the current one is created first if needed)."""
        await self.signing_key()
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(iam_keys.c.public_jwk)
                    .where(iam_keys.c.publish_until > int(self.clock()))
                    .order_by(iam_keys.c.created_at.desc())
                )
            ).all()
        return {"keys": [{**orjson.loads(r.public_jwk), "use": "sig"} for r in rows]}
