"""Database access for every capability: one engine per process, one writer on SQLite.

Reads and writes go through :class:`Database`. Writes run as a function of a connection
inside one transaction (:meth:`Database.write`), so that the business write, its search
index, its change-log row and any outbox item commit together or not at all. Driver
errors are translated here, at the edge (STYLE §3): unique violation → 409,
serialization failure/deadlock → retried, statement timeout → 504, SQLite busy → 503.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, TypeVar
from urllib.parse import quote

import structlog
from asyncpg.exceptions import IntegrityConstraintViolationError as _PG_INTEGRITY
from asyncpg.exceptions import InterfaceError as _PG_INTERFACE
from asyncpg.exceptions import InternalClientError as _PG_INTERNAL
from asyncpg.exceptions import PostgresConnectionError as _PG_CONNECTION
from asyncpg.exceptions import PostgresError as _PG_ERROR
from sqlalchemy import event, make_url, text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import greenlet_spawn

from sharedcare.fhir.errors import FHIRError

T = TypeVar("T")
log = structlog.get_logger("sharedcare.store")

_RETRYABLE_PG = {"40001", "40P01"}  # serialization_failure, deadlock_detected
_WRITE_ATTEMPTS = 5


def _sqlstate(exc: DBAPIError) -> str | None:
    orig = exc.orig
    for attr in ("sqlstate", "pgcode"):
        code = getattr(orig, attr, None) or getattr(getattr(orig, "__cause__", None), attr, None)
        if code:
            return str(code)
    return None


# SQLSTATE classes of a connection that failed or was refused: connection exception,
# insufficient resources (too many clients), operator intervention (shutdown, starting up).
_CONNECTION_SQLSTATES: Final = ("08", "53", "57P01", "57P02", "57P03")


def is_connection_failure(exc: BaseException) -> bool:
    """Pool exhausted, server out of connections, or a connection lost: retryable, a 503."""
    if isinstance(exc, PoolTimeout | OSError | _PG_INTERFACE | _PG_CONNECTION | _PG_INTERNAL):
        return True
    if isinstance(exc, _PG_ERROR):  # straight from asyncpg (Database.driver()): its class
        return str(getattr(exc, "sqlstate", "") or "").startswith(_CONNECTION_SQLSTATES)
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        orig = exc.orig
        cause = getattr(orig, "__cause__", None)
        if isinstance(orig, OSError) or isinstance(cause, OSError | _PG_CONNECTION):
            return True
        state = str(getattr(orig, "sqlstate", None) or getattr(cause, "sqlstate", None) or "")
        return state.startswith(_CONNECTION_SQLSTATES)
    return False


def translate_error(exc: DBAPIError) -> FHIRError | None:
    """Map a driver error to the FHIRError a client should see, or None to re-raise."""
    message = str(exc.orig).lower()
    busy = isinstance(exc, OperationalError) and "database is locked" in message  # SQLite
    return _translate(_sqlstate(exc), message, isinstance(exc, IntegrityError), busy)


def _translate(
    state: str | None, message: str, integrity: bool, busy: bool = False
) -> FHIRError | None:
    if integrity or state == "23505" or "unique constraint" in message:
        return FHIRError.of(409, "conflict", "A concurrent write changed this resource; retry.")
    if state == "57014":
        return FHIRError.of(504, "timeout", "The database did not answer in time; retry later.")
    if busy:
        return FHIRError.of(
            503, "transient", "The database is busy; retry shortly.", headers={"Retry-After": "1"}
        )
    return None


def sqlite_path(url: str) -> str | None:
    """The file of a SQLite URL, as SQLAlchemy reads it (query options such as ``?timeout=``
    are not part of it); None for an in-memory database or a ``file:`` URI."""
    parsed = make_url(url)
    path = parsed.database
    if not path or path == ":memory:" or parsed.query.get("uri") == "true":
        return None
    return path


WAL_FILE_LIMIT_BYTES: Final = 128 * 1024 * 1024  # what a SQLite -wal file is cut back to
BUSY_TIMEOUT_MS: Final = 10_000  # the longest a SQLite statement waits for a locked file


def configure_sqlite(
    dbapi_conn: Any, synchronous: str, wal_limit: int = WAL_FILE_LIMIT_BYTES
) -> None:
    """The settings every SQLite connection of the hub runs with (WAL, durability, waits).

    Autocommit at the driver: callers issue BEGIN themselves (SQLAlchemy's "begin" event
    below; pysqlite's implicit BEGIN is DEFERRED and would hide our IMMEDIATE).

    ``journal_size_limit``: whichever connection starts the write-ahead log again from its
    beginning also cuts a file larger than ``wal_limit`` bytes back to that, so a burst of
    writes (or a long reader) does not leave a file of its size behind, and the audit writer
    can tell a log past that size from the file's size (see ``sharedcare.audit.writer``).
    """
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA synchronous={synchronous}")
    cur.execute(f"PRAGMA journal_size_limit={int(wal_limit)}")
    cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


INLINE_BUSY_MS: Final = 50  # the longest an inline read waits for a locked SQLite file


class _OwnConnection:
    """A ``sqlite3`` connection of this object's own, opened on first use."""

    _conn: sqlite3.Connection | None = None

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


class InlineReader(_OwnConnection):
    """SQLite only: one read statement run in the calling thread, on a connection of its own.

    Through SQLAlchemy and aiosqlite, every read on SQLite is a checkout, a BEGIN, the
    statement and a ROLLBACK, each a hop to the connection's thread and back: about 2 ms of
    CPU on a slow 2-core VM even for ``SELECT 1``, where the federated query's lookup of
    a person, their links and consent records takes under 0.1 ms inline. For such short
    indexed reads on the hot path, the hop costs far more than the work. The trade: the
    event loop waits for the statement itself. Only a few index probes belong here.

    In WAL mode a reader never waits for the writer, and it sees every transaction
    committed before the statement starts: a write the hub acknowledged is read back. A
    busy database (WAL recovery after a crash, or another program holding the file locked)
    waits at most :data:`INLINE_BUSY_MS`, then answers 503 with Retry-After like any busy
    SQLite read. That wait holds the event loop, once per query while the lock lasts.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        try:
            return self._connection().execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            message = str(exc).lower()
            busy = "locked" in message or "busy" in message
            raise _translate(None, message, False, busy) or exc from None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            # mode=rw: never create an empty database where the hub's file should be.
            conn = sqlite3.connect(
                f"file:{quote(self.path)}?mode=rw",
                uri=True,
                isolation_level=None,
                timeout=INLINE_BUSY_MS / 1000,
                check_same_thread=False,
            )
            conn.execute("PRAGMA query_only=ON")
            conn.row_factory = sqlite3.Row
            self._conn = conn
        return self._conn


LOCK_RETRY_S: Final = 0.001  # how soon an inline write tries a taken write lock again


def try_begin(conn: sqlite3.Connection) -> bool:
    """``BEGIN IMMEDIATE`` if SQLite's write lock is free now; False if another writer has it.

    The statements after it may wait :data:`INLINE_BUSY_MS` (the write lock is held, so only
    a WAL recovery could make them wait), then fail: never longer on the event loop.
    """
    conn.execute("PRAGMA busy_timeout=0")
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if "locked" in str(exc) or "busy" in str(exc):
            return False
        raise
    finally:
        conn.execute(f"PRAGMA busy_timeout={INLINE_BUSY_MS}")
    return True


async def begin_inline(conn: sqlite3.Connection, timeout_s: float = BUSY_TIMEOUT_MS / 1000) -> None:
    """Take SQLite's write lock on ``conn`` from the event loop without blocking it: while
    another writer holds the lock, try again every :data:`LOCK_RETRY_S` and let the loop
    go on; SQLite's "database is locked" after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not try_begin(conn):
        if loop.time() >= deadline:
            raise sqlite3.OperationalError("database is locked")
        await asyncio.sleep(LOCK_RETRY_S)


class InlineWriter(_OwnConnection):
    """SQLite only: short write transactions run on the event loop's own thread.

    A write through SQLAlchemy and aiosqlite takes the write lock at its BEGIN and gives it
    back at its COMMIT, four or more hops to the connection's thread later; each hop waits
    for the event loop, and on a busy hub the lock was held for 27 ms on average (123 ms at
    most, bench/sync_query.py), while every other writer of every hub process waited.
    Here the lock is taken without waiting (:func:`begin_inline`) and the transaction's
    statements run at once, for a few microseconds of SQLite's work. For a few small
    statements on the hot path only, like :class:`InlineReader`: with ``synchronous`` FULL
    or EXTRA each commit waits for the disk, so :attr:`Database.inline_writer` is None.
    """

    def __init__(self, path: str, synchronous: str) -> None:
        self.path = path
        self.synchronous = synchronous
        self.timeout_s = BUSY_TIMEOUT_MS / 1000  # the longest a write waits for the lock
        self._conn: sqlite3.Connection | None = None

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """``fn(conn)`` in one transaction; a busy database answers 503 like any other write."""
        conn = self._connection()
        try:
            await begin_inline(conn, self.timeout_s)
            try:
                result = fn(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            self.close()  # reopened next time: a connection that failed is not trusted again
            message = str(exc).lower()
            raise _translate(None, message, False, "locked" in message or "busy" in message) or exc from None
        return result

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            configure_sqlite(conn, self.synchronous)
            # No checkpoint in these commits: one copies the log into the database and syncs
            # both files, milliseconds on the event loop. The hub's other connections (and
            # the audit writer, every 250 records) checkpoint the same log.
            conn.execute("PRAGMA wal_autocheckpoint=0")
            self._conn = conn
        return self._conn


class Database:
    """The process's database engines and the one way to run a write transaction."""

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 10,
        sqlite_synchronous: str = "NORMAL",
        pool_timeout: float = 5.0,
    ):
        """``pool_timeout``: the longest a caller waits for a pooled connection before
        :class:`PoolTimeout` (a 503 with Retry-After at the HTTP edge), instead of
        SQLAlchemy's 30 s, which holds a consumer for half a minute before saying so."""
        self.url = url
        self.dialect = "sqlite" if url.startswith("sqlite") else "postgresql"
        self.sqlite_synchronous = sqlite_synchronous
        if self.dialect == "sqlite":
            path = sqlite_path(url)
            if path is None:
                raise ValueError(
                    f"{url}: SQLite needs a database file (sqlite+aiosqlite:///path/to/hub.db); "
                    "an in-memory database is not shared between the hub's connections"
                )
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.engine = self._sqlite_engine(
                url, sqlite_synchronous, immediate=False, pool_timeout=pool_timeout
            )
            # One writer connection with BEGIN IMMEDIATE: SQLite allows one writer at a time,
            # and taking the lock at BEGIN avoids deadlocking read→write upgrades
            # (the datasette `execute_write_fn` idea, STYLE §4).
            self.write_engine = self._sqlite_engine(
                url, sqlite_synchronous, immediate=True, pool_timeout=pool_timeout
            )
            self._write_lock: asyncio.Lock | None = asyncio.Lock()
            self.inline: InlineReader | None = InlineReader(path)
            self.inline_writer: InlineWriter | None = (
                InlineWriter(path, sqlite_synchronous)
                if sqlite_synchronous.upper() in ("OFF", "NORMAL")
                else None
            )
        else:
            # LIFO keeps the busiest connections warm; a small overflow avoids reconnect churn.
            self.engine = create_async_engine(
                url,
                pool_size=pool_size,
                max_overflow=pool_size // 2,
                pool_use_lifo=True,
                pool_timeout=pool_timeout,
            )
            self.write_engine = self.engine
            self._write_lock = None
            self.inline = None
            self.inline_writer = None

    @staticmethod
    def _sqlite_engine(
        url: str, synchronous: str, *, immediate: bool, pool_timeout: float = 5.0
    ) -> AsyncEngine:
        # The writer keeps one connection (writes are serialised anyway); readers pool a few.
        # The writer's callers queue on the write lock, not the pool, so only readers can
        # run into pool_timeout.
        engine = create_async_engine(
            url, pool_size=1 if immediate else 8, max_overflow=0, pool_timeout=pool_timeout
        )

        @event.listens_for(engine.sync_engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            configure_sqlite(dbapi_conn, synchronous)

        @event.listens_for(engine.sync_engine, "begin")
        def _on_begin(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")

        return engine

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads.

        On PostgreSQL it runs in autocommit: under READ COMMITTED each statement takes its
        own snapshot anyway, so BEGIN/ROLLBACK around reads only cost two round trips
        (13% of an identifier search's CPU in bench/store.py's profile). SQLite keeps its
        deferred transaction, which gives a search's statements one snapshot.
        """
        try:
            async with self.engine.connect() as conn:
                if self.dialect == "postgresql":
                    await conn.execution_options(isolation_level="AUTOCOMMIT")
                yield conn
        except DBAPIError as exc:
            raise translate_error(exc) or exc from None

    @asynccontextmanager
    async def driver(self) -> AsyncIterator[Any]:
        """PostgreSQL only: the asyncpg connection of a pooled connection, in autocommit.

        For the store's hot paths (read, search, one-statement create): each statement
        goes to asyncpg directly (its own prepared-statement cache), skipping SQLAlchemy's
        execution layers, about 0.3-0.5 ms of CPU per statement (bench/README.md). The
        connection comes from, and returns to, the same pool as every other; no
        transaction is open, so one statement is one atomic, durable unit. Errors are
        translated as in :meth:`write`; a connection that failed or was cancelled
        mid-statement is discarded, not pooled.
        """
        if self.dialect != "postgresql":
            raise RuntimeError("Database.driver() is for PostgreSQL only")
        try:
            pooled = await self.engine.raw_connection()
        except DBAPIError as exc:
            raise translate_error(exc) or exc from None
        healthy = True
        try:
            yield pooled.driver_connection
        except _PG_ERROR as exc:
            # A statement failed: the autocommit connection is fine, unless the server ended
            # it (a restart or pg_terminate_backend: 57P01, class 08...). Pooled again, such a
            # connection failed the next request that took it, with asyncpg's "another
            # operation is in progress".
            if is_connection_failure(exc):
                healthy = False
                raise
            state = getattr(exc, "sqlstate", None)
            integrity = isinstance(exc, _PG_INTEGRITY)
            raise _translate(state, str(exc).lower(), integrity) or exc from None
        except BaseException as exc:
            # Cancelled or broken mid-statement: the protocol state is unknown. Errors
            # raised by the caller's own code (a 404, a bad cursor) leave it usable.
            healthy = isinstance(exc, Exception) and not isinstance(
                exc, (_PG_INTERFACE, _PG_INTERNAL, OSError)
            )
            raise
        finally:
            await greenlet_spawn(pooled.close if healthy else pooled.invalidate)

    async def write(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """Run ``fn(conn)`` in one transaction; retry it on serialization failures."""
        for attempt in range(1, _WRITE_ATTEMPTS + 1):
            try:
                if self._write_lock is not None:
                    async with self._write_lock:
                        return await self._run_write(fn)
                return await self._run_write(fn)
            except DBAPIError as exc:
                retryable = self.dialect == "postgresql" and _sqlstate(exc) in _RETRYABLE_PG
                if retryable and attempt < _WRITE_ATTEMPTS:
                    await asyncio.sleep(0.005 * 2**attempt)
                    continue
                raise translate_error(exc) or exc from None
        raise AssertionError("unreachable")

    async def _run_write(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async with self.write_engine.begin() as conn:
            return await fn(conn)

    async def vacuum_hot(
        self, tables: tuple[str, ...], *, min_dead: int = 10_000, fraction: float = 0.05
    ) -> list[str]:
        """PostgreSQL: VACUUM (and ANALYZE) each of ``tables`` that holds more than
        ``min_dead`` dead rows and more than ``fraction`` of its live ones; the vacuumed.

        For the few tables whose rows change state many times a second (the durable queue,
        messages in flight). Each message leaves about three dead row versions in the queue,
        none of them HOT (the state column is indexed), and every claim walks their index
        entries until a VACUUM removes them: without one, PostgreSQL's CPU per message grew
        from 1.2 to 2.2 ms over a 10-minute run at 500 messages/s and delivery fell behind.
        autovacuum's default trigger (20% of the table dead) comes late for such tables, and
        on a server with autovacuum off never. ``SKIP_LOCKED``: when another hub process is
        vacuuming the table already, this one does not wait. SQLite reuses freed pages by
        itself: nothing to do.
        """
        if self.dialect != "postgresql" or not tables:
            return []
        async with self.engine.connect() as conn:
            await conn.execution_options(isolation_level="AUTOCOMMIT")
            stats = (
                await conn.execute(
                    text(
                        "SELECT relname, n_dead_tup, n_live_tup FROM pg_stat_user_tables "
                        "WHERE schemaname = current_schema() AND relname = ANY(:tables)"
                    ),
                    {"tables": list(tables)},
                )
            ).all()
            due = [
                row.relname
                for row in stats
                if row.n_dead_tup > min_dead and row.n_dead_tup > fraction * row.n_live_tup
            ]
            for table in sorted(due):
                await conn.exec_driver_sql(f'VACUUM (ANALYZE, SKIP_LOCKED) "{table}"')
        return sorted(due)

    async def ping(self) -> None:
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    async def close(self) -> None:
        if self.inline is not None:
            self.inline.close()
        if self.inline_writer is not None:
            self.inline_writer.close()
        await self.engine.dispose()
        if self.write_engine is not self.engine:
            await self.write_engine.dispose()
