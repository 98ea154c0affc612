"""AuditWriter on both databases: group commit, durability before return, failures; the trail's search."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from helpers import loop_ticks
from prometheus_client import REGISTRY
from sqlalchemy import func, select, text

from sharedcare.audit import AuditRecord, AuditWriter, request_id_of
from sharedcare.audit import writer as writer_module
from sharedcare.audit.metrics import get_audit_metrics
from sharedcare.audit.schema import audit_events
from sharedcare.audit.trail import AuditTrail
from sharedcare.fhir.errors import FHIRError
from sharedcare.metrics.buffer import flush as flush_metrics
from sharedcare.store import migrate
from sharedcare.store.db import Database, sqlite_path
from sharedcare.store.schema import resources

Make = Callable[..., AuditRecord]
FHIR_BASE = "http://testserver/fhir"  # as the writer fixture's


Writes = Callable[[Any, Any], Awaitable[Any]]


def wrap_batch_write(
    monkeypatch: pytest.MonkeyPatch, writer: AuditWriter, wrapper: Callable[[Writes], Writes]
) -> None:
    """Wrap what the writer writes a batch with (a stalled or failing database).

    On PostgreSQL the writer sends one autocommit statement; with a server that does not wait
    for the WAL, it opens a transaction instead; on SQLite a transaction on its own
    connection in its own thread (``_SqliteConnection.write(self, rows)``).
    """
    monkeypatch.setattr(writer_module, "insert_rows", wrapper(writer_module.insert_rows))
    sqlite = writer_module._SqliteConnection
    monkeypatch.setattr(sqlite, "write", wrapper(sqlite.write))
    monkeypatch.setattr(
        writer_module, "insert_rows_autocommit", wrapper(writer_module.insert_rows_autocommit)
    )


def slow_by(seconds: float) -> Callable[[Writes], Writes]:
    def wrapper(real: Writes) -> Writes:
        async def slow(conn: Any, items: Any) -> Any:
            await asyncio.sleep(seconds)  # a stalled database
            return await real(conn, items)

        return slow

    return wrapper


def _sample(name: str) -> float:
    flush_metrics()  # hot-path values are added up in the process first
    return REGISTRY.get_sample_value(name) or 0.0


async def audit_count(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(audit_events))).scalar_one())


async def search_request_ids(trail: AuditTrail, items: list[tuple[str, str]]) -> set[str]:
    bundle = orjson.loads(await trail.search(items))
    return {request_id_of(e["resource"]) or "" for e in bundle.get("entry", ())}


async def request_ids_on_trail(db: Database) -> set[str | None]:
    async with db.read() as conn:
        bodies = (await conn.execute(select(audit_events.c.body))).scalars()
        return {request_id_of(orjson.loads(b)) for b in bodies}


async def test_concurrent_records_share_transactions_and_are_durable_on_return(
    writer: AuditWriter, trail: AuditTrail, make_record: Make
) -> None:
    get_audit_metrics()
    batched_before = _sample("sharedcare_audit_flush_batch_size_sum")
    flushes_before = _sample("sharedcare_audit_flush_batch_size_count")

    async def one(i: int) -> str:
        record = make_record(request_id=f"gc-{i}", patient=f"Patient/p{i % 7}")
        rid = await writer.record(record)
        # Back from record() means committed: readable at once, from another connection.
        stored = orjson.loads(await trail.read(rid))
        assert request_id_of(stored) == f"gc-{i}" and stored["id"] == rid
        return rid

    ids = await asyncio.gather(*(one(i) for i in range(200)))
    assert len(set(ids)) == 200
    assert writer.written == 200
    assert writer.flushes <= 20, f"200 records took {writer.flushes} transactions"
    assert writer.largest_batch >= 10
    assert _sample("sharedcare_audit_flush_batch_size_sum") - batched_before == 200
    assert _sample("sharedcare_audit_flush_batch_size_count") - flushes_before == writer.flushes
    assert await audit_count(trail.db) == 200
    async with trail.db.read() as conn:  # one lean row each: nothing in the store's tables
        stored = (await conn.execute(select(func.count()).select_from(resources))).scalar_one()
    assert stored == 0


async def test_an_idle_writer_commits_a_single_record_at_once(writer: AuditWriter, make_record: Make) -> None:
    started = asyncio.get_running_loop().time()
    await writer.record(make_record())
    assert writer.flushes == 1
    assert asyncio.get_running_loop().time() - started < 1.0  # no timer, no batching wait


async def test_unreachable_database_fails_every_waiter(
    backend: str, tmp_path: Any, make_record: Make
) -> None:
    # A database that cannot be opened: a directory in place of the SQLite file, or a closed port.
    if backend == "sqlite":
        (tmp_path / "not-a-file.db").mkdir()
        broken = Database(f"sqlite+aiosqlite:///{tmp_path / 'not-a-file.db'}")
    else:
        broken = Database("postgresql+asyncpg://nobody@127.0.0.1:1/none")
    writer = AuditWriter(broken)
    await writer.start()
    try:
        outcomes = await asyncio.gather(
            *(writer.record(make_record()) for _ in range(50)), return_exceptions=True
        )
    finally:
        await writer.stop()
        await broken.close()
    assert all(isinstance(o, FHIRError) and o.status == 503 for o in outcomes), outcomes
    assert writer.written == 0


async def test_failed_transaction_fails_its_waiters_writes_nothing_and_the_writer_recovers(
    writer: AuditWriter, trail: AuditTrail, make_record: Make
) -> None:
    def fail_at_the_last_row(real: Writes) -> Writes:
        async def write(conn: Any, rows: Any) -> Any:
            # The batch's last row repeats its first one's id: the database refuses it only
            # after taking the others, so the batch must go back whole.
            return await real(conn, [*rows, rows[0]])

        return write

    with pytest.MonkeyPatch.context() as patch:
        wrap_batch_write(patch, writer, fail_at_the_last_row)
        outcomes = await asyncio.gather(
            *(writer.record(make_record()) for _ in range(30)), return_exceptions=True
        )
    assert all(isinstance(o, FHIRError) and o.status == 503 for o in outcomes)
    assert all(o.__cause__ is not None for o in outcomes if isinstance(o, BaseException))
    assert await audit_count(trail.db) == 0  # rolled back: nothing claims success
    rid = await writer.record(make_record())
    assert orjson.loads(await trail.read(rid))["meta"]["versionId"] == "1"


async def test_stop_drains_pending_records_then_refuses_new_ones(
    db: Database, make_record: Make
) -> None:
    writer = AuditWriter(db)
    await writer.start()
    tasks = [asyncio.create_task(writer.record(make_record())) for _ in range(50)]
    await asyncio.sleep(0)  # every task has queued its record
    await writer.stop()
    assert len({await t for t in tasks}) == 50
    assert await audit_count(db) == 50
    with pytest.raises(FHIRError) as refused:
        await writer.record(make_record())
    assert refused.value.status == 503


async def test_a_caller_that_times_out_gets_503_and_its_record_is_still_written(
    db: Database, make_record: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = AuditWriter(db, timeout=0.05)
    wrap_batch_write(monkeypatch, writer, slow_by(0.2))
    await writer.start()
    with pytest.raises(FHIRError) as timed_out:
        await writer.record(make_record(request_id="slow-1"))
    assert timed_out.value.status == 503
    await writer.stop()  # drains: the record the caller gave up on is written anyway
    assert await audit_count(db) == 1  # over-reporting a release is safe; under-reporting is not


async def test_abandoned_releases_are_shed_but_refusals_are_always_written(
    db: Database, make_record: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = AuditWriter(db, timeout=0.05, concurrency=1)
    wrap_batch_write(monkeypatch, writer, slow_by(0.2))  # callers behind this flush time out
    await writer.start()
    first = asyncio.create_task(writer.record(make_record(request_id="in-flight")))
    await asyncio.sleep(0.01)  # its flush has begun
    queued = [
        asyncio.create_task(writer.record(make_record(request_id="gave-up"))),
        asyncio.create_task(writer.record(make_record(request_id="refused", outcome=4, released=0))),
    ]
    outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
    assert all(isinstance(o, FHIRError) and o.status == 503 for o in outcomes)
    await writer.stop()
    written = await request_ids_on_trail(db)
    # Nothing was released to any of them; the refusal is on the trail regardless.
    assert written == {"in-flight", "refused"}


async def test_a_backlog_beyond_max_pending_is_refused_at_once(
    db: Database, make_record: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = AuditWriter(db, max_pending=5, concurrency=1)
    wrap_batch_write(monkeypatch, writer, slow_by(0.1))
    await writer.start()
    tasks = [asyncio.create_task(writer.record(make_record())) for _ in range(20)]
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    await writer.stop()
    refused = [o for o in outcomes if isinstance(o, FHIRError)]
    # The first record goes into a flush at once; five wait behind it; the rest are shed.
    assert len(refused) == 14 and all(o.status == 503 for o in refused)
    assert await audit_count(db) == 6 == writer.written


async def test_audit_commits_wait_for_the_wal_even_if_the_server_does_not(
    backend: str, database_url: str, make_record: Make
) -> None:
    if backend != "postgresql":
        pytest.skip("a PostgreSQL setting")
    name = database_url.rsplit("/", 1)[1]
    admin = Database(database_url)
    async with admin.engine.connect() as conn:
        await conn.execute(text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
        await conn.commit()
    seen: list[str] = []
    db = Database(database_url)  # new connections get the database's setting
    try:
        writer = AuditWriter(db)

        def spy(real: Writes) -> Writes:
            async def write(conn: Any, items: Any) -> Any:
                seen.append((await conn.execute(text("SHOW synchronous_commit"))).scalar_one())
                return await real(conn, items)

            return write

        with pytest.MonkeyPatch.context() as patch:
            wrap_batch_write(patch, writer, spy)
            await writer.start()
            await writer.record(make_record())
            await writer.stop()
    finally:
        async with admin.engine.connect() as conn:
            await conn.execute(text(f'ALTER DATABASE "{name}" RESET synchronous_commit'))
            await conn.commit()
        await db.close()
        await admin.close()
    assert seen == ["on"]


def _day(month: int) -> datetime:
    return datetime(2026, month, 1, 12, 0, tzinfo=UTC)


TRAIL: list[dict[str, Any]] = [
    {"request_id": "a", "recorded": _day(1), "patient": "Patient/p1", "user_id": "u-1", "organization": "RR8"},
    {"request_id": "b", "recorded": _day(2), "patient": "Patient/p1", "user_id": "u-2", "user_name": "Sam Taylor",
     "organization": "B82005", "organization_ref": "Organization/org-b"},
    {"request_id": "c", "recorded": _day(3), "patient": "Patient/p2", "user_id": "u-1", "organization": "RR8",
     "outcome": 4, "outcome_desc": "consent withheld", "released": 0, "withheld": 9},
    {"request_id": "d", "recorded": _day(4), "patient": "Patient/p2", "user_id": "u-3", "organization": "RR8",
     "action": "read", "resource": "providers/gp-1/Observation/o-1", "providers": ("gp-1",)},
]

SEARCHES: list[tuple[str, list[tuple[str, str]], set[str]]] = [
    ("by patient", [("patient", "Patient/p1")], {"a", "b"}),
    ("by patient, bare id", [("patient", "p2")], {"c", "d"}),
    ("by entity", [("entity", "Patient/p2")], {"c", "d"}),
    ("by user id", [("altid", "u-1")], {"a", "c"}),
    ("by user name", [("agent-name", "sam")], {"b"}),
    ("by user role", [("agent-role", "R8000")], {"a", "b", "c", "d"}),
    ("by organisation ODS code", [("altid", "B82005")], {"b"}),
    ("by organisation resource", [("agent", "Organization/org-b")], {"b"}),
    ("from a date", [("date", "ge2026-02-01")], {"b", "c", "d"}),
    ("in a month", [("date", "eq2026-03")], {"c"}),
    ("patient and date", [("patient", "Patient/p2"), ("date", "lt2026-04-01")], {"c"}),
    ("user and organisation", [("altid", "u-1"), ("altid", "RR8")], {"a", "c"}),
    ("refusals", [("outcome", "4")], {"c"}),
    ("reads", [("subtype", "http://hl7.org/fhir/restful-interaction|read")], {"d"}),
    ("searches", [("action", "E")], {"a", "b", "c"}),
    ("user name contains", [("agent-name:contains", "taylor")], {"b"}),
    ("role, by its system", [("agent-role", "https://fhir.nhs.uk/CodeSystem/NHSDigital-SDS-JobRoleCode|R8000")], {"a", "b", "c", "d"}),
    ("organisation resource, bare id", [("agent", "org-b")], {"b"}),
    ("entity, a patient", [("entity", "Patient/p1")], {"a", "b"}),
    ("not a refusal", [("outcome:not", "4")], {"a", "b", "d"}),
    ("any of two people", [("patient", "Patient/p1,Patient/p2"), ("date", "le2026-01-31")], {"a"}),
    ("by id is empty for a stranger", [("_id", "no-such-event")], set()),
    ("resource released", [("entity", "Observation/o-1")], {"d"}),
]


async def test_auditors_find_events_through_fhir_search(
    writer: AuditWriter, trail: AuditTrail, make_record: Make
) -> None:
    await asyncio.gather(*(writer.record(make_record(**row)) for row in TRAIL))
    # One trail, every search of the table (one database setup instead of one per search).
    failures = []
    for name, items, expected in SEARCHES:
        found = await search_request_ids(trail, items)
        if found != expected:
            failures.append(f"{name} {items}: found {sorted(found)}, expected {sorted(expected)}")
    assert failures == []


async def _sqlite_writer(backend: str, db: Database, **limits: int) -> tuple[AuditWriter, str]:
    """A started writer on SQLite that checkpoints every 20 records, and its database file."""
    if backend != "sqlite":
        pytest.skip("SQLite's write-ahead log")
    from sharedcare.store.db import sqlite_path

    path = sqlite_path(db.url)
    assert path is not None
    writer = AuditWriter(db)
    assert writer._sqlite is not None
    writer._sqlite.CHECKPOINT_ROWS = 20
    for name, value in limits.items():
        setattr(writer._sqlite, name, value)
    await writer.start()
    return writer, path


async def _event_bytes(db: Database) -> int:
    async with db.read() as conn:
        return int((await conn.execute(select(func.sum(func.length(audit_events.c.body))))).scalar_one())


async def test_sqlite_audit_wal_is_checkpointed_so_it_stops_growing(
    backend: str, db: Database, make_record: Make
) -> None:
    """The writer's SQLite connection never checkpoints in a commit (that cost fell on one
    audit commit in a hundred); its background checkpoints must still keep the WAL file
    from growing with the trail, or an operator's disk fills with a log nobody reads."""
    writer, path = await _sqlite_writer(backend, db)
    assert writer._sqlite is not None
    try:
        for _ in range(30):  # 600 records, ~4 KB each: 2.4 MB of events
            await asyncio.gather(*(writer.record(make_record()) for _ in range(20)))
            # The checkpoint thread runs beside the flushes; let the one this batch started
            # finish (a pause in traffic, as real traffic has), however slow the machine.
            for _ in range(500):
                await asyncio.sleep(0.01)
                if writer._sqlite._checkpoint is None:
                    break
    finally:
        await writer.stop()
    bodies = await _event_bytes(db)
    wal = os.path.getsize(path + "-wal")
    assert bodies > 2_000_000
    assert wal < bodies / 4, f"WAL {wal} bytes after {bodies} bytes of events"


@pytest.mark.parametrize("slow_checkpoints", [0, 3], ids=["disk-keeps-up", "slow-disk"])
async def test_sqlite_audit_wal_stays_bounded_under_writes_that_never_pause(
    backend: str, db: Database, make_record: Make, monkeypatch: pytest.MonkeyPatch,
    slow_checkpoints: int,
) -> None:
    """With no pause in the writes a background checkpoint never catches the log's end, so
    the log would never start again from the beginning; past its limit the writer's own
    thread must checkpoint once more, or the WAL grows with every record written. On a disk
    whose checkpoints are slower than the writes (CI once saw the file reach 8.8 MB against
    a 400 KB limit) the bound must still hold: the writes wait for the disk, and say so."""
    limit = 400_000
    checkpoint = writer_module._checkpoint
    slow = iter(range(slow_checkpoints))

    def waits() -> float:
        return REGISTRY.get_sample_value("sharedcare_audit_wal_waits_total") or 0.0

    def slow_disk(conn: Any) -> tuple[int, int, int]:
        # The first background checkpoints last until the writes wait for them, or the log
        # passes four times its limit: a disk slower than the writes, on any machine.
        background = threading.current_thread().name.startswith("sharedcare-audit-checkpoint")
        if background and next(slow, None) is not None:
            waited, give_up = waits(), time.monotonic() + 10
            while (
                waits() == waited
                and os.path.getsize(path + "-wal") <= 4 * limit
                and time.monotonic() < give_up
            ):
                time.sleep(0.005)
        return checkpoint(conn)

    monkeypatch.setattr(writer_module, "_checkpoint", slow_disk)
    waited = waits()
    writer, path = await _sqlite_writer(backend, db, WAL_LIMIT_BYTES=limit)
    largest = 0
    try:
        for _ in range(75):  # 1,500 records, ~4 KB each, back to back
            await asyncio.gather(*(writer.record(make_record()) for _ in range(20)))
            largest = max(largest, os.path.getsize(path + "-wal"))
    finally:
        await writer.stop()
    written = await audit_count(db)
    bodies = await _event_bytes(db)
    assert written == 1500
    # Past twice the limit by at most what one flush of 20 records adds (a record's frames
    # are its body plus table and index pages: well under 3x the body); the test allows
    # twice that. Without the catch-up the WAL is about 0.8 x the bodies, 4.7 MB.
    allowance = 3 * (20 + 20) * bodies // written
    assert largest <= 2 * limit + allowance, f"WAL reached {largest} bytes ({bodies} of events)"
    if slow_checkpoints:
        assert waits() - waited >= slow_checkpoints


async def test_sqlite_audit_wal_is_cut_back_after_a_reader_held_it_open(
    backend: str, db: Database, make_record: Make
) -> None:
    """A reader that keeps one snapshot open (a long report) stops the log starting again,
    so it grows while the reader lasts; once the reader is gone the next catch-up starts it
    again and the file is cut back to twice its limit, not left at the size it reached."""
    limit = 400_000
    writer, path = await _sqlite_writer(backend, db, WAL_LIMIT_BYTES=limit)
    reader = sqlite3.connect(path, isolation_level=None)
    try:
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM audit_events").fetchone()
        for _ in range(30):  # 600 records while the reader's snapshot holds the log
            await asyncio.gather(*(writer.record(make_record()) for _ in range(20)))
        during = os.path.getsize(path + "-wal")
        reader.execute("ROLLBACK")
        for _ in range(10):  # 200 more: past CHECKPOINT_ROWS (20) several times over
            await asyncio.gather(*(writer.record(make_record()) for _ in range(20)))
        after = os.path.getsize(path + "-wal")
    finally:
        reader.close()
        await writer.stop()
    bodies = await _event_bytes(db)
    assert during > 4 * limit, f"the reader should have held the log: {during} bytes"
    allowance = 3 * (20 + 20) * bodies // 800  # as in the test above
    assert after <= 2 * limit + allowance, f"WAL left at {after} bytes after {during}"


def _rows_seen_elsewhere(url: str, wait_s: float) -> int:
    """Audit rows another connection sees within ``wait_s``, asked from another thread while
    the test's event loop is kept busy (a caller rendering its answer)."""
    seen: list[int] = []

    async def poll() -> None:
        other = Database(url)
        try:
            deadline = asyncio.get_running_loop().time() + wait_s
            while True:
                seen.append(await audit_count(other))
                if seen[-1] > 1 or asyncio.get_running_loop().time() > deadline:
                    return
                await asyncio.sleep(0.02)
        finally:
            await other.close()

    thread = threading.Thread(target=asyncio.run, args=(poll(),))
    thread.start()
    thread.join()  # blocks this loop: nothing here runs until the poll is done
    return seen[-1]


@pytest.mark.parametrize(
    ("yields", "committed_meanwhile"),
    [
        (True, True),  # one yield: the flush has sent its statement; it commits meanwhile
        (False, False),  # no yield: nothing is sent until the caller awaits the ticket
    ],
)
async def test_a_submitted_record_commits_while_its_caller_works(
    writer: AuditWriter, make_record: Make, database_url: str, yields: bool, committed_meanwhile: bool
) -> None:
    await writer.record(make_record(request_id="warm"))  # its connection and statement are ready
    ticket = writer.submit(make_record(request_id="rendering"))
    assert ticket.flushing  # the writer was idle: this record started a flush
    if yields:
        await asyncio.sleep(0)
    busy_from = time.perf_counter()
    assert (_rows_seen_elsewhere(database_url, 1.0 if yields else 0.3) == 2) is committed_meanwhile
    busy = time.perf_counter() - busy_from
    added_before = _sample("sharedcare_audit_record_duration_seconds_sum")
    assert await ticket.committed()
    assert await audit_count(writer.db) == 2
    if committed_meanwhile:  # the latency audit added excludes the caller's own busy time
        assert _sample("sharedcare_audit_record_duration_seconds_sum") - added_before < busy / 2


async def test_an_abandoned_ticket_is_shed_like_a_caller_that_gave_up(
    db: Database, make_record: Make, monkeypatch: pytest.MonkeyPatch
) -> None:
    writer = AuditWriter(db, concurrency=1)
    wrap_batch_write(monkeypatch, writer, slow_by(0.1))
    await writer.start()
    first = writer.submit(make_record(request_id="released"))
    await asyncio.sleep(0)  # its flush has begun
    behind = writer.submit(make_record(request_id="not-released"))
    assert first.flushing and not behind.flushing  # it waits for the flush in flight
    behind.abandon()  # the caller failed before answering: nothing was released
    await first.committed()
    await writer.stop()
    assert await request_ids_on_trail(db) == {"released"}


@pytest.mark.parametrize("synchronous", ["OFF", "NORMAL", "FULL", "EXTRA"])
async def test_every_synchronous_setting_commits_before_record_returns(
    backend: str, database_url: str, make_record: Make, synchronous: str
) -> None:
    """OFF and NORMAL commit on the event loop, FULL and EXTRA (which wait for the disk) on
    the writer's thread: either way a record is on the trail, for every other connection,
    when record() returns."""
    if backend != "sqlite":
        pytest.skip("SQLite's synchronous setting")
    db = Database(database_url, sqlite_synchronous=synchronous)
    await migrate.upgrade(db)
    writer = AuditWriter(db, hub_base=FHIR_BASE)
    await writer.start()
    try:
        ids = await asyncio.gather(*(writer.record(make_record(request_id=f"s-{i}")) for i in range(60)))
        other = sqlite3.connect(sqlite_path(database_url))
        try:
            stored = {row[0] for row in other.execute("SELECT id FROM audit_events")}
        finally:
            other.close()
        assert stored == set(ids) and len(ids) == 60
    finally:
        await writer.stop()
        await db.close()


@pytest.mark.parametrize("held_s", [0.3, 1.0])
async def test_a_flush_waits_for_another_writer_while_the_event_loop_goes_on(
    backend: str,
    db: Database,
    writer: AuditWriter,
    make_record: Make,
    monkeypatch: pytest.MonkeyPatch,
    held_s: float,
) -> None:
    """Another process holds SQLite's write lock: the record waits for it (up to the busy
    timeout, here 0.6 s, then a 503) and the hub's other requests are served meanwhile."""
    if backend != "sqlite":
        pytest.skip("SQLite's single write lock")
    monkeypatch.setattr(writer_module, "BUSY_TIMEOUT_S", 0.6)
    await writer.record(make_record())  # the connections are open
    holder = sqlite3.connect(sqlite_path(db.url), isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    pending = asyncio.ensure_future(writer.record(make_record(request_id="behind-the-lock")))
    try:
        async with loop_ticks() as ticks:
            await asyncio.sleep(min(held_s, 0.5))
        assert ticks[0] >= 10  # the loop went on (about 30-50 ticks in that time)
        if held_s < 0.6:
            assert not pending.done()  # not committed while the lock is held
            holder.execute("ROLLBACK")
            rid = await asyncio.wait_for(pending, 5)
            assert rid in {r.id for r in await _event_ids(db)}
        else:
            with pytest.raises(FHIRError) as refused:  # at the busy timeout, not the writer's 5 s
                await asyncio.wait_for(pending, 2)
            assert refused.value.status == 503
            holder.execute("ROLLBACK")
            await writer.record(make_record())  # the writer recovers once the lock is free
    finally:
        if holder.in_transaction:
            holder.execute("ROLLBACK")
        holder.close()


async def _event_ids(db: Database) -> list[Any]:
    async with db.read() as conn:
        return list((await conn.execute(select(audit_events.c.id))).all())
