"""The hub's messaging housekeeping deletes finished pushes once they are older than the keep time."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import update

from sharedcare.messaging.service import PUSH_QUEUE
from sharedcare.queue import store as q
from sharedcare.queue.schema import queue_items
from sharedcare.settings import Settings
from sharedcare.store import migrate
from sharedcare.store.db import Database
from sharedcare.store.repository import now_utc


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"queue_keep_done_hours": 1.0, "messaging_workers": True})


@pytest_asyncio.fixture
async def pushes(database_url: str) -> dict[str, int]:
    """Pushes in the queue before the hub starts: finished 2 h ago, finished now, dead 2 h ago."""
    db = Database(database_url)
    try:
        await migrate.upgrade(db)

        async def work(conn: Any) -> None:
            for n in range(3):
                await q.enqueue(conn, PUSH_QUEUE, {"m": -1 - n})

        await db.write(work)
        old, recent, dead = await q.claim(db, PUSH_QUEUE, limit=3)
        await q.complete(db, [old.id, recent.id])
        await q.fail(db, dead, "recipient gone", q.Backoff(), permanent=True)
        then = now_utc() - timedelta(hours=2)

        async def age(conn: Any) -> None:
            await conn.execute(
                update(queue_items)
                .where(queue_items.c.id.in_([old.id, dead.id]))
                .values(available_at=then, updated_at=then)
            )

        await db.write(age)
        return {"old": old.id, "recent": recent.id, "dead": dead.id}
    finally:
        await db.close()


async def test_finished_pushes_past_the_keep_time_are_deleted(
    pushes: dict[str, int], app: Any
) -> None:
    db = app.state.db
    for _ in range(100):  # the first housekeeping round runs as the hub starts
        if await q.get(db, pushes["old"]) is None:
            break
        await asyncio.sleep(0.05)
    assert await q.get(db, pushes["old"]) is None
    assert (await q.get(db, pushes["recent"]) or {}).get("state") == q.DONE
    assert (await q.get(db, pushes["dead"]) or {}).get("state") == q.DEAD
