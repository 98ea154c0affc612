"""The ``jti`` replay guard, shared by every hub process through the database.

SMART Backend Services (backend-services.html#signature-verification): the server must
reject an assertion whose ``jti`` it has already seen from that client within the
assertion's lifetime. The check is one statement: INSERT ... ON CONFLICT (client_id, jti)
DO UPDATE ... WHERE the stored row has expired. A row comes back when the jti is new (or
its earlier use has expired); nothing comes back when it is a replay. Two processes
racing with the same assertion are serialised by the primary key: exactly one wins.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import delete

from sharedcare.iam.schema import iam_jti
from sharedcare.iam.sql import insert_for
from sharedcare.store.db import Database

PRUNE_INTERVAL = 60.0


class ReplayGuard:
    """Remembers client assertion ids until they expire."""

    def __init__(self, db: Database, *, clock: Callable[[], float] = time.time):
        self.db = db
        self.clock = clock
        self._pruned_at = float("-inf")

    async def first_use(self, client_id: str, jti: str, expires_at: int) -> bool:
        """True the first time ``(client_id, jti)`` is presented before ``expires_at``."""
        now = int(self.clock())
        stmt = insert_for(self.db.dialect, iam_jti).values(client_id=client_id, jti=jti, expires_at=expires_at)
        stmt = stmt.on_conflict_do_update(
            index_elements=[iam_jti.c.client_id, iam_jti.c.jti],
            set_={"expires_at": stmt.excluded.expires_at},
            where=iam_jti.c.expires_at < now,
        ).returning(iam_jti.c.jti)
        prune = now - self._pruned_at >= PRUNE_INTERVAL
        if prune:
            self._pruned_at = now

        async def write(conn: Any) -> bool:
            fresh = (await conn.execute(stmt)).first() is not None
            if prune:
                await conn.execute(delete(iam_jti).where(iam_jti.c.expires_at < now))
            return fresh

        return bool(await self.db.write(write))
