"""Database connections for the patient index: bounded leases for lookups; failures become 503s, never 500s."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

from asyncpg.exceptions import InterfaceError as _PGInterfaceError
from asyncpg.exceptions import PostgresError as _PGError
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.pool import QueuePool
from sqlalchemy.util import greenlet_spawn

from sharedcare.fhir.errors import FHIRError
from sharedcare.store.db import Database, is_connection_failure

__all__ = [
    "LEASE_IDLE_S",
    "LEASE_WAIT_S",
    "Leases",
    "connection_failures_as_503",
    "driver_connection",
    "is_connection_failure",
    "unavailable",
]


def unavailable() -> FHIRError:
    """The 503 a request gets when the database has no connection for it (never a 500)."""
    return FHIRError.of(
        503,
        "transient",
        "The patient index database has no connection free (the hub is at capacity); retry "
        "shortly.",
        headers={"Retry-After": "1"},
    )


@asynccontextmanager
async def connection_failures_as_503() -> AsyncIterator[None]:
    """Turn a connection failure (see :func:`is_connection_failure`) into :func:`unavailable`."""
    try:
        yield
    except FHIRError:
        raise
    except Exception as exc:
        if is_connection_failure(exc):
            raise unavailable() from exc
        raise


async def driver_connection(conn: AsyncConnection) -> Any:
    """The asyncpg connection under a SQLAlchemy connection (PostgreSQL fast paths).

    SQLAlchemy's asyncpg adapter sends BEGIN lazily, with its first statement: a raw driver
    call made before that would run in autocommit, outside the caller's transaction (a
    killed bulk load then left a chunk's people without their linkages). One statement
    through SQLAlchemy first makes every driver call part of the transaction.
    """
    if conn.in_transaction():
        await conn.exec_driver_sql("SELECT 1")
    raw = await conn.get_raw_connection()
    driver: Any = raw.driver_connection
    return driver


LEASE_WAIT_S: Final = 5.0  # the longest a lookup waits for a connection before answering 503
LEASE_IDLE_S: Final = 1.0  # an idle lookup lease gives its connection back to the pool after this


class Leases:
    """Connections for the patient index's lookups (``PatientIndex._driver``/``_read``)."""

    def __init__(self, db: Database, *, keep_connections: bool = False):
        self.db = db
        # Lookups (PostgreSQL) take one of ``slots`` leases rather than a connection each:
        # more concurrent lookups than the pool holds only made the pool open and close
        # overflow connections per request (a new backend each time, bench/pix.py) and run
        # the server out of connections. Half the pool is left for everything else (audit,
        # registrations, the registry). With ``keep_connections`` (the hub; the owner must
        # call :meth:`close` before closing the database) a lease keeps its pooled
        # connection while lookups keep coming — no pool checkout per lookup, half a
        # lookup's CPU — and gives it back after :data:`LEASE_IDLE_S` without one.
        self._keep = keep_connections and db.dialect == "postgresql"
        self.lease_wait = LEASE_WAIT_S
        pool = db.engine.pool
        size = pool.size() if isinstance(pool, QueuePool) else 2
        slots = max(1, size // 2) if db.dialect == "postgresql" else 8
        self._lookups = asyncio.Semaphore(slots)
        self._idle: list[Any] = []  # pooled connections kept by idle leases
        self._used = 0  # lookups since the last trim
        self._trim: asyncio.TimerHandle | None = None
        self._returning: set[asyncio.Future[Any]] = set()  # keeps the close tasks referenced

    @asynccontextmanager
    async def driver(self) -> AsyncIterator[Any]:
        """PostgreSQL: an asyncpg connection for a lookup, in autocommit; 503 (Retry-After)
        when no lease comes free in :data:`LEASE_WAIT_S` or the server has no connection."""
        try:
            async with asyncio.timeout(self.lease_wait):
                await self._lookups.acquire()
        except TimeoutError:
            raise unavailable() from None
        try:
            if self._idle:
                pooled = self._idle.pop()
            else:
                try:
                    async with connection_failures_as_503(), asyncio.timeout(self.lease_wait):
                        pooled = await self.db.engine.raw_connection()
                except TimeoutError:  # the pool is exhausted by other work
                    raise unavailable() from None
            healthy = True
            try:
                yield pooled.driver_connection
            except _PGError as exc:  # the statement failed; the autocommit connection is fine
                if is_connection_failure(exc):
                    healthy = False
                    raise unavailable() from exc
                if getattr(exc, "sqlstate", None) == "57014":
                    raise FHIRError.of(
                        504, "timeout", "The database did not answer in time; retry later."
                    ) from exc
                raise
            except BaseException as exc:
                # Cancelled or broken mid-statement: the protocol state is unknown. Errors
                # of the caller's own code leave the connection usable.
                healthy = isinstance(exc, Exception) and not isinstance(
                    exc, OSError | _PGInterfaceError
                )
                if isinstance(exc, OSError | _PGInterfaceError):
                    raise unavailable() from exc
                raise
            finally:
                if healthy and not self._keep:
                    await greenlet_spawn(pooled.close)
                elif healthy:
                    self._idle.append(pooled)
                    self._used += 1
                    if self._trim is None:
                        self._trim = asyncio.get_running_loop().call_later(
                            LEASE_IDLE_S, self._trim_idle
                        )
                else:
                    await greenlet_spawn(pooled.invalidate)
        finally:
            self._lookups.release()

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """SQLite (and PostgreSQL's non-lookup reads): :meth:`Database.read`, with the same
        503 as :meth:`driver` when no connection comes free in time."""
        async with connection_failures_as_503(), contextlib.AsyncExitStack() as stack:
            try:
                async with asyncio.timeout(self.lease_wait):
                    conn = await stack.enter_async_context(self.db.read())
            except TimeoutError:
                raise unavailable() from None
            yield conn

    def _trim_idle(self) -> None:
        """Give the idle leases' connections back to the pool once lookups have paused."""
        self._trim = None
        if self._used:
            self._used = 0
            self._trim = asyncio.get_running_loop().call_later(LEASE_IDLE_S, self._trim_idle)
            return
        idle, self._idle = self._idle, []
        for pooled in idle:
            task = asyncio.ensure_future(greenlet_spawn(pooled.close))
            self._returning.add(task)
            task.add_done_callback(self._returning.discard)

    async def close(self) -> None:
        """Give every kept connection back to the pool (before the engine is disposed)."""
        if self._trim is not None:
            self._trim.cancel()
            self._trim = None
        idle, self._idle = self._idle, []
        for pooled in idle:
            with contextlib.suppress(Exception):
                await greenlet_spawn(pooled.close)
