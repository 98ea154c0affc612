"""Group-committed audit writing: a request gets its answer only once its AuditEvent is durable.

``await writer.record(record)`` returns after the transaction holding the record's AuditEvent
has committed (REQUIREMENTS §3: audit records must never be lost; issue 5.7: no response
carrying patient data is sent before its audit record is durable). To make that cheap,
concurrent callers share transactions (group commit): one background flusher takes every
record pending (up to ``max_batch``), writes them all in ONE transaction (with
:meth:`Store.create_many_in`, or on PostgreSQL its one-statement equivalent in
:mod:`sharedcare.audit.pgwrite`), then wakes every waiter. A new flush starts as soon as a flush slot is
free, with no timer: when idle the first record is written at once (a batch of one), and
under load a caller waits for the commit in progress plus its own. On PostgreSQL two
flushes may be in flight (``concurrency``), so a record arriving during a commit starts
its own at once instead of waiting for the running one's fsync: about one commit of added
latency instead of two (PostgreSQL's WAL flush serves concurrent commits together). On
SQLite there is one writer anyway, so one flush at a time.

The CPU work (building the AuditEvent, its search-index rows, its id) happens in the caller
before it joins the queue, so the flusher holds the database (the single SQLite writer)
only for the SQL. If a transaction fails, every waiter in it gets a 503 FHIRError: the
caller must not release the data.

A caller that gives up waiting (timeout, client gone) answers 503 and releases nothing. Its
record is still written if its flush had begun (over-reporting is safe, under-reporting is
not); if it had not, a release record is dropped, since no release happened, so that after
an overload the writer does not spend the database on work nobody waits for. Refusals are
always written: REQUIREMENTS §3 wants every refused request on the trail.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from dataclasses import dataclass
from time import perf_counter
from typing import Any

import structlog
from sqlalchemy import text

from sharedcare.audit.metrics import get_audit_metrics
from sharedcare.audit.pgwrite import insert_events
from sharedcare.audit.record import SUCCESS, AuditRecord, to_audit_event
from sharedcare.audit.rows import audit_rows
from sharedcare.audit.sqlitewrite import insert_events_sqlite
from sharedcare.fhir.errors import FHIRError
from sharedcare.registry.model import HUB
from sharedcare.store.db import Database
from sharedcare.store.repository import Prepared, Store

__all__ = ["AuditWriter", "audit_unavailable"]

log = structlog.get_logger("sharedcare.audit")


def audit_unavailable(reason: str) -> FHIRError:
    """The 503 a request gets when its release could not be audited (and so was not made)."""
    return FHIRError.of(
        503,
        "transient",
        f"The audit trail could not record this request ({reason}); no data was released. "
        "Retry shortly.",
        headers={"Retry-After": "1"},
    )


@dataclass(slots=True)
class _Pending:
    prepared: Prepared
    rid: str
    outcome: int
    future: asyncio.Future[str]


class AuditWriter:
    """Writes AuditEvents into the regional store in group-committed batches."""

    def __init__(
        self,
        db: Database,
        store: Store,
        *,
        hub_base: str = HUB,
        max_batch: int = 500,
        max_pending: int = 2_000,
        timeout: float = 5.0,
        concurrency: int | None = None,
        fast_path: bool | None = None,
        validate: bool = False,
    ):
        """Options:

        - ``max_pending``: records allowed to wait for a flush; beyond it ``record()`` fails
          at once with 503, so an overloaded database sheds load instead of making every
          caller wait out the timeout (after which nobody gets data at all).
        - ``timeout``: the longest a caller waits for its commit before answering 503.
        - ``concurrency``: transactions in flight at once (default 2 on PostgreSQL, 1 on SQLite).
        - ``fast_path``: write each batch without SQLAlchemy's per-row work, the same rows as
          ``Store.create_many_in``: one statement on PostgreSQL (:mod:`sharedcare.audit.pgwrite`),
          one ``executemany`` of tuples per table on SQLite (:mod:`sharedcare.audit.sqlitewrite`).
          Default on.
        - ``validate``: run the store's full R4 validation on every event (slow; for tests:
          the events are built by :func:`to_audit_event`, whose output the tests validate).
        """
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if concurrency is None:
            concurrency = 1 if db.dialect == "sqlite" else 2
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        if fast_path is None:
            fast_path = True
        self.db = db
        self.store = store
        self.hub_base = hub_base
        self.max_batch = max_batch
        self.max_pending = max_pending
        self.timeout = timeout
        self.validate = validate
        self.concurrency = concurrency
        self.fast_path = fast_path
        self.flushes = 0  # committed transactions
        self.written = 0  # records committed
        self.largest_batch = 0
        self._pending: list[_Pending] = []
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._force_sync = False
        self._in_flight: set[asyncio.Task[None]] = set()
        self._slot_free = asyncio.Event()

    @property
    def running(self) -> bool:
        """Taking records: started, not stopping, and the flusher alive (readiness checks)."""
        return self._task is not None and not self._closing and not self._task.done()

    async def start(self) -> None:
        """Start the flusher (idempotent)."""
        if self._task is None:
            if self.db.dialect == "postgresql":
                await self._check_synchronous_commit()
            self._closing = False
            self._task = asyncio.create_task(self._run(), name="sharedcare-audit-writer")

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
        """Refuse new records, write every pending one, then stop the flusher."""
        task = self._task
        if task is None:
            return
        self._closing = True
        self._wakeup.set()
        try:
            await task
        finally:
            self._task = None

    def prepare(self, record: AuditRecord) -> Prepared:
        """The AuditEvent for ``record`` with its index rows (CPU only; no I/O)."""
        body = to_audit_event(record, hub_base=self.hub_base)
        if self.validate:
            return self.store.prepare("AuditEvent", body)
        # Server-built events skip the pydantic pass on the hot path (ARCHITECTURE: model
        # classes validate at the edges); tests validate to_audit_event's output instead.
        # Their index rows are read straight from their known shape (audit.rows).
        rows = audit_rows(body)
        return Prepared("AuditEvent", body, rows if rows is not None else self.store.indexer.extract(body))

    async def record(self, record: AuditRecord) -> str:
        """Write ``record``'s AuditEvent; return its id once committed, or raise a 503."""
        started = perf_counter()
        if not self.running:
            raise audit_unavailable("the audit writer is not running")
        if len(self._pending) >= self.max_pending:
            get_audit_metrics().write_failures_total.inc()
            raise audit_unavailable("too many records are waiting for the database")
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(self.prepare(record), str(uuid.uuid4()), record.outcome, future))
        self._wakeup.set()
        try:
            async with asyncio.timeout(self.timeout):
                rid = await future  # cancelled on timeout; see the module docstring
        except TimeoutError:
            raise audit_unavailable(f"the database did not commit within {self.timeout:g} s") from None
        get_audit_metrics().record_duration_seconds.observe(perf_counter() - started)
        return rid

    async def _run(self) -> None:
        try:
            while True:
                if not self._pending:
                    if self._closing:
                        return
                    self._wakeup.clear()
                    await self._wakeup.wait()
                    continue
                if len(self._in_flight) >= self.concurrency:
                    self._slot_free.clear()
                    await self._slot_free.wait()
                    continue
                batch = self._take()
                if not batch:
                    continue
                if self.concurrency == 1:
                    await self._flush(batch)  # no task per flush where none can overlap
                    continue
                task = asyncio.create_task(self._flush(batch))
                self._in_flight.add(task)
                task.add_done_callback(self._flushed)
        finally:
            if self._in_flight:  # stop() drains: in-flight flushes finish (or fail) first
                await asyncio.gather(*self._in_flight, return_exceptions=True)

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
        self._in_flight.discard(task)
        self._slot_free.set()

    async def _flush(self, batch: list[_Pending]) -> None:
        metrics = get_audit_metrics()
        metrics.pending.set(len(self._pending))
        items: list[tuple[Prepared, str]] = [(p.prepared, p.rid) for p in batch]
        started = perf_counter()

        async def write(conn: Any) -> None:
            if self._force_sync:
                await conn.execute(text("SET LOCAL synchronous_commit TO on"))
            if self.fast_path and self.db.dialect == "postgresql":
                await insert_events(conn, items)
            elif self.fast_path:
                await insert_events_sqlite(conn, items)
            else:
                await self.store.create_many_in(conn, [(p, rid) for p, rid in items])

        try:
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
                p.future.set_result(p.rid)
        metrics.flush_batch_size.observe(len(batch))
        metrics.flush_duration_seconds.observe(elapsed)
        for outcome, n in Counter(p.outcome for p in batch).items():
            metrics.records_total.labels(outcome=str(outcome)).inc(n)

    @staticmethod
    def _fail(batch: list[_Pending], reason: str, cause: BaseException | None = None) -> None:
        for p in batch:
            if not p.future.done():
                error = audit_unavailable(reason)
                error.__cause__ = cause
                p.future.set_exception(error)
