"""Group-committed audit writing: a request gets its answer only once its AuditEvent is durable.

``await writer.record(record)`` returns after the transaction holding the record's AuditEvent
has committed (REQUIREMENTS §3: audit records must never be lost; issue 5.7: no response
carrying patient data is sent before its audit record is durable). To make that cheap,
concurrent callers share transactions (group commit): a flush takes every record pending
(up to ``max_batch``), writes them all in ONE transaction (one row each in ``audit_events``,
:mod:`sharedcare.audit.insert`; on PostgreSQL one autocommit statement on the writer's own
connection, so one round trip), then wakes every waiter. A flush starts as soon as a record
arrives and a flush slot is free, and a finishing flush starts the next with whatever
arrived meanwhile: no timer and no flusher task in between. When idle the first record is
written at once (a batch of one); under load a caller waits for the commit in progress plus
its own. One flush is in flight at a time by default (``concurrency``): on SQLite there is
one writer anyway, and on PostgreSQL two concurrent commits wait on each other's WAL flush.

The CPU work (building the AuditEvent, its row, its id) happens in the caller before it joins
the queue, so a flush holds the database (the single SQLite writer) only for the SQL. If
a transaction fails, every waiter in it gets a 503 FHIRError: the caller must not release
the data.

A caller that gives up waiting (timeout, client gone) answers 503 and releases nothing. Its
record is still written if its flush had begun (over-reporting is safe, under-reporting is
not); if it had not, a release record is dropped, since no release happened, so that after
an overload the writer does not spend the database on work nobody waits for. Refusals are
always written: REQUIREMENTS §3 wants every refused request on the trail.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import asyncpg
import structlog
from sqlalchemy import make_url, text

from sharedcare.audit.columns import EventRow, event_row, new_id
from sharedcare.audit.insert import (
    insert_rows,
    insert_rows_autocommit,
    insert_rows_sqlite,
    sqlite_values,
)
from sharedcare.audit.metrics import get_audit_metrics, hot_audit_metrics
from sharedcare.audit.record import SUCCESS, AuditRecord, to_audit_event
from sharedcare.fhir.errors import FHIRError
from sharedcare.registry.model import HUB
from sharedcare.store.db import (
    WAL_FILE_LIMIT_BYTES,
    Database,
    begin_inline,
    configure_sqlite,
    sqlite_path,
)

__all__ = ["AuditWriter", "Ticket", "audit_unavailable"]

log = structlog.get_logger("sharedcare.audit")
BUSY_TIMEOUT_S = 10.0  # the longest a flush waits for another writer's lock (busy_timeout)


def audit_unavailable(reason: str) -> FHIRError:
    """The 503 a request gets when its release could not be audited (and so was not made)."""
    return FHIRError.of(
        503,
        "transient",
        f"The audit trail could not record this request ({reason}); no data was released. "
        "Retry shortly.",
        headers={"Retry-After": "1"},
    )


class _Connections:
    """The writer's own PostgreSQL connections, one per flush in flight.

    Kept out of the hub's pool: a flush never queues behind request traffic for a
    connection, and skips the pool's checkout and return work (about a third of a flush's
    CPU through SQLAlchemy). A connection that failed is closed, and a new one is opened
    by the next flush.
    """

    def __init__(self, url: str):
        self.dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
        self._idle: list[Any] = []

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Any]:
        # Bounded: a database that does not answer fails this batch (503) rather than
        # holding the flush slot for asyncpg's default minute.
        conn = self._idle.pop() if self._idle else await asyncpg.connect(self.dsn, timeout=5)
        try:
            yield conn
        except BaseException:
            conn.terminate()  # its state is unknown (failed or cancelled mid-statement)
            raise
        self._idle.append(conn)

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await conn.close()


class _SqliteConnection:
    """The writer's own SQLite connections.

    A flush is one whole transaction (BEGIN IMMEDIATE, inserts, COMMIT: about 10 µs of
    SQLite work in WAL mode), where the hub's write path (SQLAlchemy over aiosqlite) costs
    five hops and about 1.4 ms per transaction. SQLite's own lock serialises it with every
    other writer, in this process or another.

    With ``synchronous`` OFF or NORMAL (the default) a commit does not wait for the disk,
    and the transaction runs on the event loop's own thread. It takes the write lock
    without waiting: when another writer holds it, the flush tries again every
    :data:`~sharedcare.store.db.LOCK_RETRY_S` while the loop goes on, for up to
    :data:`BUSY_TIMEOUT_S`. It used to run on a thread of its own, and under load each of
    its handoffs of the interpreter's
    lock waited for the busy event loop (up to its 5 ms switch interval), while it held
    SQLite's write lock; the other hub processes' writers then slept in SQLite's busy
    handler (1, 2, 5, 10 ms...). On a federated query at half of saturation, that wait was
    most of the internal round trip's 99th percentile (bench/sync_query.py). With FULL or
    EXTRA a commit waits for the disk, and the transaction runs on the writer's thread,
    where a busy database is waited out (``busy_timeout``), never on the event loop.

    Checkpoints: by default the commit that takes the WAL past 1,000 pages copies it into
    the database and syncs both files, several milliseconds that at 1,000 records/s fell
    on one audit commit in a hundred (its p99: 6.2 ms with, 1.0 ms without). So this
    connection never checkpoints in its commits; after every ``CHECKPOINT_ROWS`` records
    a PASSIVE checkpoint (one that never waits for readers or writers) runs on a second
    connection in a second thread while flushes go on. The hub's other write connections
    keep SQLite's automatic checkpoints.

    Under writes with no pause a background checkpoint never catches the log's end, and the
    log is only reused from its start once a checkpoint has: measured, it grew to 850 MB in
    20 s at 3,600 records/s. So when a background checkpoint ends with more than
    ``WAL_LIMIT_BYTES`` in the log, the writer's own thread runs one more right away, before
    any further audit write: it copies what arrived meanwhile, and the next commit starts
    the log again from its beginning. That checkpoint holds audit commits for its duration
    (10-30 ms measured, once per 64 MB of log: every 2 s or so at a sustained 1,000
    records/s).

    A disk whose checkpoints are slower than the writes would still let the log grow while
    one runs. So once a background checkpoint has run for ``CHECKPOINT_ROWS`` records, each
    flush looks at the ``-wal`` file's size (one ``stat``); past twice the limit, the next
    flush waits for that checkpoint and then checkpoints on the writer's thread: the file
    stays under twice the limit plus one flush, and the writes wait for the disk (counted in
    ``sharedcare_audit_wal_waits_total``). Starting the log again cuts a file larger than
    that back to twice the limit (``journal_size_limit``); a smaller one is kept and reused.
    A reader still using the log's end keeps it from starting again; the next check tries
    again.
    """

    CHECKPOINT_ROWS = 250
    WAL_LIMIT_BYTES = WAL_FILE_LIMIT_BYTES // 2  # 64 MB

    def __init__(self, path: str, synchronous: str):
        self.path = path
        self.synchronous = synchronous
        self.inline = synchronous.upper() in ("OFF", "NORMAL")
        self._queued: asyncio.Future[Any] | None = None  # a catch-up queued on the thread
        self._conns: dict[str, sqlite3.Connection] = {}
        self._threads: dict[str, ThreadPoolExecutor] = {}
        self._since_checkpoint = 0
        self._checkpoint: asyncio.Future[tuple[int, int, int]] | None = None
        self._behind = False  # past twice the limit: checkpoint before the next write
        self._frame_bytes = 24 + 4096  # a WAL frame: its header and one page

    def _connection(self, role: str) -> sqlite3.Connection:
        conn = self._conns.get(role)
        if conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            configure_sqlite(conn, self.synchronous, 2 * self.WAL_LIMIT_BYTES)
            conn.execute("PRAGMA wal_autocheckpoint=0")
            self._frame_bytes = 24 + int(conn.execute("PRAGMA page_size").fetchone()[0])
            self._conns[role] = conn
        return conn

    def _run(self, role: str, work: Any, *args: Any) -> Any:
        conn = self._connection(role)
        try:
            return work(conn, *args)
        except sqlite3.Error:
            # Reopened next time: a connection that failed is not trusted again.
            self._conns.pop(role, None)
            conn.close()
            raise

    def _submit(self, role: str, work: Any, *args: Any) -> asyncio.Future[Any]:
        thread = self._threads.get(role)
        if thread is None:
            thread = self._threads[role] = ThreadPoolExecutor(
                1, thread_name_prefix=f"sharedcare-audit-{role}"
            )
        return asyncio.get_running_loop().run_in_executor(thread, self._run, role, work, *args)

    async def write(self, rows: list[EventRow]) -> None:
        values, people = sqlite_values(rows)  # CPU work stays out of the writer's thread
        if self._behind:
            await self._catch_up()
        elif self._queued is not None:  # a catch-up checkpoint goes before these inserts
            await asyncio.gather(self._queued, return_exceptions=True)
        if self.inline:
            await self._write_inline(values, people)
        else:
            await self._submit("write", insert_rows_sqlite, values, people)
        self._since_checkpoint += len(rows)
        if self._since_checkpoint < self.CHECKPOINT_ROWS:
            return
        if self._checkpoint is not None:
            if self._log_bytes() > 2 * self.WAL_LIMIT_BYTES:
                self._behind = True  # this flush's callers are told now; the next one waits
        else:
            self._since_checkpoint = 0
            self._checkpoint = self._submit("checkpoint", _checkpoint)
            self._checkpoint.add_done_callback(self._checkpointed)

    async def _write_inline(
        self, values: list[tuple[Any, ...]], people: list[tuple[str, str]]
    ) -> None:
        conn = self._connection("inline")
        try:
            await begin_inline(conn, BUSY_TIMEOUT_S)
            insert_rows_sqlite(conn, values, people, begun=True)
        except sqlite3.Error:
            self._close("inline")  # reopened next time, as in _run
            raise

    def _log_bytes(self) -> int:
        try:
            return os.stat(self.path + "-wal").st_size
        except OSError:
            return 0

    async def _catch_up(self) -> None:
        """Checkpoint on the writer's thread (one checkpointer at a time: after any other)."""
        get_audit_metrics().wal_waits_total.inc()
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
        self._behind = False
        self._since_checkpoint = 0
        try:
            await self._submit("write", _checkpoint)
        except sqlite3.Error as exc:  # the records still go in; the next check tries again
            log.warning("audit WAL checkpoint failed", error=repr(exc)[:300])

    def _checkpointed(self, done: asyncio.Future[tuple[int, int, int]]) -> None:
        self._checkpoint = None
        if done.cancelled() or done.exception() is not None:
            self._report_failure(done)
            return
        _busy, in_log, _copied = done.result()
        if in_log * self._frame_bytes > self.WAL_LIMIT_BYTES and self._threads and not self._behind:
            # Queued on the writer's thread now, while the log's end is near what this one
            # copied: it runs before the next flush's inserts. (A flush that is behind
            # waits for this checkpoint and runs that one itself: not twice.)
            self._queued = self._submit("write", _checkpoint)
            self._queued.add_done_callback(self._caught_up)

    def _caught_up(self, done: asyncio.Future[tuple[int, int, int]]) -> None:
        if self._queued is done:
            self._queued = None
        self._report_failure(done)

    @staticmethod
    def _report_failure(done: asyncio.Future[tuple[int, int, int]]) -> None:
        if not done.cancelled() and done.exception() is not None:
            log.warning("audit WAL checkpoint failed", error=repr(done.exception())[:300])

    def _close(self, role: str) -> None:
        conn = self._conns.pop(role, None)
        if conn is not None:
            conn.close()

    async def close(self) -> None:
        for pending in (self._checkpoint, self._queued):
            if pending is not None:
                await asyncio.gather(pending, return_exceptions=True)
        self._close("inline")
        loop = asyncio.get_running_loop()
        threads, self._threads = self._threads, {}
        for role, thread in threads.items():
            await loop.run_in_executor(thread, self._close, role)
            thread.shutdown(wait=False)


def _checkpoint(conn: sqlite3.Connection) -> tuple[int, int, int]:
    """A PASSIVE checkpoint: (1 if it could not finish, pages in the WAL, pages copied)."""
    busy, in_log, copied = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
    return int(busy), int(in_log), int(copied)


@dataclass(slots=True)
class Ticket:
    """A record queued by :meth:`AuditWriter.submit`, not yet known to be durable."""

    future: asyncio.Future[str]
    submitting: float  # seconds submit() took (building the event and its row)
    timeout: float
    flushing: bool  # a flush started for this record: it sends once the caller yields

    async def committed(self) -> str:
        """The record's id once its transaction has committed; a 503 FHIRError if it did not."""
        started = perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                rid = await self.future  # cancelled on timeout; see the module docstring
        except TimeoutError:
            raise audit_unavailable(f"the database did not commit within {self.timeout:g} s") from None
        # What audit added to the request: its own work, and the wait its caller saw (not
        # the time the caller spent rendering while the commit ran).
        waited = perf_counter() - started
        hot_audit_metrics().record_duration_seconds.observe(self.submitting + waited)
        return rid

    def abandon(self) -> None:
        """The caller will not release: as for a caller that gave up waiting (see above)."""
        if not self.future.done():
            self.future.cancel()


@dataclass(slots=True)
class _Pending:
    row: EventRow
    outcome: int
    future: asyncio.Future[str]


class AuditWriter:
    """Writes AuditEvents into the audit trail in group-committed batches."""

    def __init__(
        self,
        db: Database,
        *,
        hub_base: str = HUB,
        max_batch: int = 500,
        max_pending: int = 2_000,
        timeout: float = 5.0,
        concurrency: int | None = None,
    ):
        """Options:

        - ``max_pending``: records allowed to wait for a flush; beyond it ``record()`` fails
          at once with 503, so an overloaded database sheds load instead of making every
          caller wait out the timeout (after which nobody gets data at all).
        - ``timeout``: the longest a caller waits for its commit before answering 503.
        - ``concurrency``: transactions in flight at once (default 1).
        """
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if concurrency is None:
            # One flush at a time: on SQLite there is one writer anyway; on PostgreSQL two
            # commits in flight wait on each other's WAL flush, which measured no better at
            # p50 and worse at p99 than one (bench/audit.py, grouped against paired).
            concurrency = 1
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.db = db
        self.hub_base = hub_base
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.timeout = timeout
        self.concurrency = concurrency
        self.flushes = 0  # committed transactions
        self.written = 0  # records committed
        self.largest_batch = 0
        self._pending: list[_Pending] = []
        self._started = False
        self._closing = False
        self._force_sync = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self._connections = _Connections(db.url) if db.dialect == "postgresql" else None
        path = sqlite_path(db.url) if db.dialect == "sqlite" else None
        self._sqlite = _SqliteConnection(path, db.sqlite_synchronous) if path else None

    @property
    def running(self) -> bool:
        """Taking records: started and not stopping (readiness checks)."""
        return self._started and not self._closing

    async def start(self) -> None:
        """Start taking records (idempotent)."""
        if not self._started:
            if self.db.dialect == "postgresql":
                await self._check_synchronous_commit()
            self._closing = False
            self._started = True

    async def _check_synchronous_commit(self) -> None:
        # A commit is durable only if PostgreSQL waits for its WAL flush. Should the server
        # be set not to (synchronous_commit off/local, for throughput), audit transactions
        # ask for it themselves: "never lost" must not depend on a tuning knob.
        try:
            async with self.db.read() as conn:
                value = str((await conn.execute(text("SHOW synchronous_commit"))).scalar_one())
        except Exception as exc:  # noqa: BLE001 - the database may come up after the hub
            value = f"unknown ({type(exc).__name__})"
        self._force_sync = value not in ("on", "remote_write", "remote_apply")
        if self._force_sync:
            log.warning("audit transactions will set synchronous_commit on", server_setting=value)

    async def stop(self) -> None:
        """Refuse new records, write every pending one, then close the writer's connections."""
        if not self._started:
            return
        self._closing = True
        try:
            while self._pending or self._in_flight:
                self._kick()
                if self._in_flight:
                    await asyncio.gather(*self._in_flight, return_exceptions=True)
        finally:
            self._started = False
            if self._connections is not None:
                await self._connections.close()
            if self._sqlite is not None:
                await self._sqlite.close()

    def prepare(self, record: AuditRecord) -> EventRow:
        """The AuditEvent for ``record`` as its row, with a new id (CPU only; no I/O)."""
        # Server-built events skip the pydantic pass on the hot path (ARCHITECTURE: model
        # classes validate at the edges); tests validate to_audit_event's output instead.
        return event_row(to_audit_event(record, hub_base=self.hub_base), new_id())

    async def record(self, record: AuditRecord) -> str:
        """Write ``record``'s AuditEvent; return its id once committed, or raise a 503."""
        return await self.submit(record).committed()

    def submit(self, record: AuditRecord) -> Ticket:
        """Queue ``record`` without waiting; ``await ticket.committed()`` before releasing.

        For a caller with CPU work left (rendering the answer): when the record started a
        flush, one yield lets that flush send its statement, and the commit then runs while
        the caller works instead of after. Raises the 503 at once when the writer is stopped
        or overloaded.
        """
        started = perf_counter()
        if not self.running:
            raise audit_unavailable("the audit writer is not running")
        if len(self._pending) >= self.max_pending:
            get_audit_metrics().write_failures_total.inc()
            raise audit_unavailable("too many records are waiting for the database")
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(self.prepare(record), record.outcome, future))
        flushes = len(self._in_flight)
        self._kick()
        flushing = len(self._in_flight) > flushes
        return Ticket(future, perf_counter() - started, self.timeout, flushing)

    def _kick(self) -> None:
        """Start flushes while records wait and a flush slot is free (no timer, no flusher task)."""
        while self._pending and len(self._in_flight) < self.concurrency:
            batch = self._take()
            if not batch:
                continue
            task = asyncio.create_task(self._flush(batch), name="sharedcare-audit-flush")
            self._in_flight.add(task)
            task.add_done_callback(self._flushed)

    def _take(self) -> list[_Pending]:
        """The next batch, without release records whose caller has given up (see above)."""
        batch: list[_Pending] = []
        taken = 0
        for p in self._pending:
            taken += 1
            if p.future.cancelled() and p.outcome == SUCCESS:
                get_audit_metrics().abandoned_total.inc()
                continue
            batch.append(p)
            if len(batch) == self.max_batch:
                break
        del self._pending[:taken]
        return batch

    def _flushed(self, task: asyncio.Task[None]) -> None:
        if task in self._in_flight:  # a flush cancelled before it ran
            self._in_flight.discard(task)
            self._kick()

    async def _flush(self, batch: list[_Pending]) -> None:
        try:
            await self._write(batch)
        finally:
            # The slot is free as soon as the waiters are told, not a loop turn later when
            # the task's callbacks run: a record arriving meanwhile starts its own flush
            # (and its caller can render while it commits; see submit).
            self._in_flight.discard(asyncio.current_task())  # type: ignore[arg-type]
            self._kick()  # what arrived during this flush goes now, as one batch

    async def _write(self, batch: list[_Pending]) -> None:
        metrics = get_audit_metrics()
        metrics.pending.set(len(self._pending))
        rows = [p.row for p in batch]
        started = perf_counter()

        async def write(conn: Any) -> None:
            if self._force_sync:
                await conn.execute(text("SET LOCAL synchronous_commit TO on"))
            await insert_rows(conn, rows)

        try:
            if self._connections is not None and not self._force_sync:
                # One autocommit statement: atomic and durable on return, one round trip.
                async with self._connections.connection() as driver:
                    await insert_rows_autocommit(driver, rows)
            elif self._sqlite is not None:
                await self._sqlite.write(rows)
            else:
                await self.db.write(write)
        except asyncio.CancelledError:
            self._fail(batch, "the hub is shutting down")
            raise
        except Exception as exc:  # noqa: BLE001 - every waiter must hear of any failure
            log.error("audit flush failed", records=len(batch), error=repr(exc)[:500])
            metrics.write_failures_total.inc(len(batch))
            self._fail(batch, f"the database refused the write: {type(exc).__name__}", exc)
            return
        elapsed = perf_counter() - started
        self.flushes += 1
        self.written += len(batch)
        self.largest_batch = max(self.largest_batch, len(batch))
        for p in batch:
            if not p.future.done():
                p.future.set_result(p.row.id)
        hot = hot_audit_metrics()
        hot.flush_batch_size.observe(len(batch))
        hot.flush_duration_seconds.observe(elapsed)
        for outcome, n in Counter(p.outcome for p in batch).items():
            hot.records_total.inc(str(outcome), amount=n)

    @staticmethod
    def _fail(batch: list[_Pending], reason: str, cause: BaseException | None = None) -> None:
        for p in batch:
            if not p.future.done():
                error = audit_unavailable(reason)
                error.__cause__ = cause
                p.future.set_exception(error)
