"""The durable queue: outbox semantics, exclusive claims, order, backoff, dead letters."""

from __future__ import annotations

import asyncio
import random
import time
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import update

from sharedcare.queue import store as q
from sharedcare.queue.schema import queue_items
from sharedcare.queue.worker import Permanent, Worker
from sharedcare.store import migrate
from sharedcare.store.db import Database
from sharedcare.store.repository import now_utc


@pytest.fixture
async def db(database_url: str):
    database = Database(database_url)
    await migrate.upgrade(database)
    yield database
    await database.close()


async def put(db: Database, queue: str, n: int, **kw: object) -> None:
    async def work(conn):
        for i in range(n):
            await q.enqueue(conn, queue, {"n": i}, **kw)  # type: ignore[arg-type]

    await db.write(work)


async def test_enqueue_is_part_of_the_callers_transaction(db: Database) -> None:
    class Boom(Exception):
        pass

    async def work(conn):
        await q.enqueue(conn, "t", {"n": 1})
        raise Boom

    with pytest.raises(Boom):
        await db.write(work)
    assert await q.claim(db, "t") == []  # rolled back with the business write


async def test_same_key_is_queued_once(db: Database) -> None:
    async def work(conn):
        return [await q.enqueue(conn, "t", {"n": i}, key="bundle-1") for i in range(3)]

    assert await db.write(work) == [True, False, False]
    assert [i.payload for i in await q.claim(db, "t")] == [{"n": 0}]


async def test_concurrent_claimers_never_share_an_item(db: Database) -> None:
    await put(db, "t", 200)
    claimed: list[int] = []

    async def claimer() -> None:
        while items := await q.claim(db, "t", limit=7):
            claimed.extend(i.id for i in items)

    await asyncio.gather(*(claimer() for _ in range(4)))
    assert len(claimed) == 200 and len(set(claimed)) == 200


async def test_partition_items_are_handed_out_one_at_a_time_in_order(db: Database) -> None:
    async def work(conn):
        for i in range(3):
            await q.enqueue(conn, "t", {"n": i}, partition="a->b")
        await q.enqueue(conn, "t", {"n": 99}, partition="c->d")

    await db.write(work)
    first = await q.claim(db, "t")
    assert sorted(i.payload["n"] for i in first) == [0, 99]
    assert await q.claim(db, "t") == []  # n=1 waits for n=0
    zero = next(i for i in first if i.payload["n"] == 0)
    # a retry keeps the later items waiting behind it
    await q.fail(db, zero, "recipient down", q.Backoff(base=0.01, cap=0.01))
    await asyncio.sleep(0.05)
    again = await q.claim(db, "t")
    assert [i.payload["n"] for i in again] == [0]
    await q.complete(db, [again[0].id])
    assert [i.payload["n"] for i in await q.claim(db, "t")] == [1]


async def test_expired_lease_is_claimed_again(db: Database) -> None:
    await put(db, "t", 1)
    (item,) = await q.claim(db, "t", lease=30)
    assert await q.claim(db, "t") == []

    async def expire(conn):
        await conn.execute(update(queue_items).values(leased_until=now_utc() - timedelta(seconds=1)))

    await db.write(expire)  # as if its worker had died
    (again,) = await q.claim(db, "t")
    assert again.id == item.id and again.attempts == 2


async def test_failures_back_off_then_dead_letter_and_redrive(db: Database) -> None:
    await put(db, "t", 1)
    backoff = q.Backoff(base=1.0, cap=1.0, max_attempts=2)  # delay in [0.5, 1.0] s
    (item,) = await q.claim(db, "t")
    assert await q.fail(db, item, "timeout", backoff) == q.READY
    assert await q.claim(db, "t") == []  # not before its backoff
    await asyncio.sleep(1.05)
    (item,) = await q.claim(db, "t")
    assert await q.fail(db, item, "timeout again", backoff) == q.DEAD
    info = await q.get(db, item.id)
    assert info is not None and info["state"] == q.DEAD and info["last_error"] == "timeout again"
    assert (await q.sizes(db))[("t", q.DEAD)] == 1
    assert await q.redrive(db, item.id)
    assert [i.id for i in await q.claim(db, "t")] == [item.id]


async def test_expiry_dead_letters_regardless_of_attempts(db: Database) -> None:
    await put(db, "t", 1)
    (item,) = await q.claim(db, "t")
    assert await q.fail(db, item, "down", q.Backoff(expire_after=0)) == q.DEAD


async def test_worker_processes_retries_and_dead_letters(db: Database) -> None:
    await put(db, "w", 30)
    seen: dict[int, int] = {}

    async def handler(item: q.Item) -> None:
        n = item.payload["n"]
        seen[n] = seen.get(n, 0) + 1
        if n == 7:
            raise Permanent("malformed")
        if n % 5 == 0 and seen[n] == 1:
            raise ConnectionError("flaky")

    worker = Worker(db, "w", handler, backoff=q.Backoff(base=0.01, cap=0.02), idle_poll=0.02)
    task = asyncio.create_task(worker.run())
    give_up = time.monotonic() + 20  # ~0.5 s normally; a slow machine must not cut it short
    while time.monotonic() < give_up:
        if len(seen) == 30 and all(seen[n] == 2 for n in range(0, 30, 5)):
            break
        await asyncio.sleep(0.02)
    worker.stop()
    await task
    sizes = await q.sizes(db)
    assert sizes == {("w", q.DEAD): 1}
    assert seen[7] == 1 and seen[5] == 2 and seen[1] == 1


@given(attempts=st.integers(min_value=1, max_value=60), base=st.floats(0.01, 10), cap=st.floats(0.1, 600))
def test_backoff_is_bounded_and_jittered(attempts: int, base: float, cap: float) -> None:
    backoff = q.Backoff(base=base, cap=cap)
    ceiling = min(cap, base * 2 ** (attempts - 1))
    delay = backoff.delay(attempts, random.Random(attempts))
    assert ceiling / 2 <= delay <= ceiling <= cap


async def test_enqueue_many_keeps_partition_order_and_a_backlog_costs_claims_nothing(db: Database) -> None:
    async def work(conn):
        await q.enqueue_many(conn, "t", [({"n": i}, "a->b") for i in range(500)] + [({"n": -1}, None)])

    await db.write(work)
    sizes = await q.sizes(db)
    assert sizes[("t", q.WAITING)] == 499 and sizes[("t", q.READY)] == 2  # one head + the unpartitioned
    seen = []
    while items := await q.claim(db, "t", limit=50):
        seen += [i.payload["n"] for i in items]
        await q.complete(db, [i.id for i in items])
    assert seen == [0, -1, *range(1, 500)]  # the partition one at a time, in order


async def _table_stats(db: Database, table: str) -> tuple[int, int]:
    """(dead rows, vacuums so far) of ``table``, as PostgreSQL's statistics report them."""
    from sqlalchemy import text

    async with db.read() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT n_dead_tup, vacuum_count FROM pg_stat_user_tables "
                    "WHERE schemaname = current_schema() AND relname = :t"
                ),
                {"t": table},
            )
        ).one()
    return int(row.n_dead_tup), int(row.vacuum_count)


async def test_the_hub_vacuums_its_queue_once_finished_items_leave_dead_rows(
    backend: str, db: Database
) -> None:
    """Every item leaves dead row versions behind (ready → leased → done, none in place);
    left there, every claim walks them. The hub vacuums the table itself once they pass a
    threshold, whether or not the server's autovacuum would have."""
    if backend != "postgresql":
        pytest.skip("PostgreSQL's dead row versions; SQLite reuses freed pages itself")
    await put(db, "churn", 300)
    while items := await q.claim(db, "churn", limit=100):
        await q.complete(db, [item.id for item in items])
    deadline = asyncio.get_running_loop().time() + 20
    while (stats := await _table_stats(db, "queue_items"))[0] < 300:
        # The backends report their dead rows to the statistics within a second or so.
        assert asyncio.get_running_loop().time() < deadline, f"dead rows never reported: {stats}"
        await asyncio.sleep(0.2)
    dead, vacuums = stats
    assert await db.vacuum_hot(("queue_items",), min_dead=10 * dead) == []  # below threshold
    assert await db.vacuum_hot(("queue_items",), min_dead=100) == ["queue_items"]
    while (after := await _table_stats(db, "queue_items"))[1] == vacuums:
        assert asyncio.get_running_loop().time() < deadline, "the VACUUM never showed"
        await asyncio.sleep(0.2)
    assert after[0] < dead  # the dead versions are gone


async def _states(db: Database, queue: str) -> dict[str, int]:
    from sqlalchemy import func, select

    c = queue_items.c
    async with db.read() as conn:
        rows = (await conn.execute(select(c.state, func.count()).where(c.queue == queue).group_by(c.state))).all()
    return {state: n for state, n in rows}


async def _age(db: Database, queue: str, ids: list[int], days: float) -> None:
    then = now_utc() - timedelta(days=days)

    async def work(conn):
        await conn.execute(
            update(queue_items).where(queue_items.c.id.in_(ids)).values(available_at=then, updated_at=then)
        )

    await db.write(work)


async def test_finished_items_are_pruned_after_the_keep_time_and_nothing_else_is(db: Database) -> None:
    async def work(conn):
        for i in range(6):
            await q.enqueue(conn, "p", {"n": i}, key=f"k{i}")

    await db.write(work)
    items = await q.claim(db, "p", limit=6)
    by_n = {i.payload["n"]: i for i in items}
    await q.complete(db, [by_n[n].id for n in (0, 1, 2, 3)])
    await q.fail(db, by_n[4], "bad", q.Backoff(), permanent=True)  # a dead letter
    await q.fail(db, by_n[5], "flaky", q.Backoff())  # waiting for a retry
    await _age(db, "p", [by_n[n].id for n in (0, 1, 4, 5)], days=8)  # 0, 1 finished 8 days ago

    assert await q.prune_done(db, "p", keep_seconds=7 * 86400, chunk=1) == 2
    assert await _states(db, "p") == {q.DONE: 2, q.DEAD: 1, q.READY: 1}
    assert await q.get(db, by_n[0].id) is None and await q.get(db, by_n[2].id) is not None

    async def again(conn):
        return [await q.enqueue(conn, "p", {"n": n}, key=f"k{n}") for n in (0, 2)]

    # A key still kept dedupes; a pruned one is queued afresh.
    assert await db.write(again) == [True, False]
    assert await q.prune_done(db, "other", keep_seconds=0) == 0


@pytest.mark.parametrize(("hours", "seconds"), [(0, None), (168, 604800.0), (0.5, 1800.0)])
def test_keep_done_hours(hours: float, seconds: float | None) -> None:
    assert q.keep_done_seconds(hours) == seconds


async def test_a_worker_prunes_its_finished_items(db: Database) -> None:
    await put(db, "w", 5)
    await put(db, "x", 1)
    await q.complete(db, [i.id for i in await q.claim(db, "x")])  # another queue's: kept
    handled: list[int] = []

    async def handler(item: q.Item) -> None:
        handled.append(item.payload["n"])

    worker = Worker(db, "w", handler, idle_poll=0.02, keep_done=0.0, prune_every=0.0)
    task = asyncio.create_task(worker.run())
    for _ in range(250):
        if len(handled) == 5 and await _states(db, "w") == {}:
            break
        await asyncio.sleep(0.02)
    worker.stop()
    await task
    assert sorted(handled) == [0, 1, 2, 3, 4]
    assert await _states(db, "w") == {}
    assert await _states(db, "x") == {q.DONE: 1}


# Each row: how the only item of the queue stands, and whether a worker may take it now.
ITEM_STATES = [
    ("ready now", {"state": q.READY, "available_at": -1}, True),
    ("ready in a minute", {"state": q.READY, "available_at": 60}, False),
    ("leased, lease live", {"state": q.LEASED, "leased_until": 30}, False),
    ("leased, lease expired", {"state": q.LEASED, "leased_until": -1}, True),
    ("waiting behind its partition", {"state": q.WAITING, "available_at": -1}, False),
    ("done", {"state": q.DONE, "available_at": -1}, False),
    ("dead", {"state": q.DEAD, "available_at": -1}, False),
]


@pytest.mark.parametrize(("case", "values", "takeable"), ITEM_STATES, ids=[c[0] for c in ITEM_STATES])
async def test_the_idle_probe_agrees_with_the_claim(
    db: Database, case: str, values: dict[str, object], takeable: bool
) -> None:
    await put(db, "t", 1)
    now = now_utc()
    moved = {k: now + timedelta(seconds=v) if k != "state" else v for k, v in values.items()}

    async def set_state(conn):
        await conn.execute(update(queue_items).values(**moved))

    await db.write(set_state)
    assert await q.claimable(db, "t") is takeable
    assert bool(await q.claim(db, "t")) is takeable
    assert await q.claimable(db, "other") is False


async def test_an_empty_poll_takes_no_write_lock(db: Database, database_url: str) -> None:
    """A worker polling an empty queue must not queue behind (or hold up) the hub's writers."""
    if db.dialect != "sqlite":
        pytest.skip("SQLite has one write lock for the whole file; PostgreSQL locks rows")
    import sqlite3

    from sharedcare.store.db import sqlite_path

    holder = sqlite3.connect(sqlite_path(database_url), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write transaction, in progress
    try:
        started = time.monotonic()
        assert await q.claim(db, "t") == []
        assert time.monotonic() - started < 1.0  # not the 5 s busy timeout of a write
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    await put(db, "t", 1)  # and with an item, the claim still takes it
    assert len(await q.claim(db, "t")) == 1
