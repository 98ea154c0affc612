"""SQLite's inline reader (``Database.inline``): the hot path's short reads, in the caller's thread.

It must see what the hub has committed, never wait for a write in progress, and never hold
the event loop for long when the file is locked: it answers 503 instead.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from helpers import loop_ticks

from sharedcare.fhir.errors import FHIRError
from sharedcare.store.db import INLINE_BUSY_MS, Database, InlineReader, sqlite_path


def _writer(path: Path, journal_mode: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA journal_mode={journal_mode}")
    conn.execute("CREATE TABLE IF NOT EXISTS t (x INTEGER)")
    return conn


def test_it_reads_every_commit_and_never_waits_for_a_write_in_progress(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    writer = _writer(path, "WAL")
    reader = InlineReader(str(path))
    writer.execute("INSERT INTO t VALUES (1)")
    assert [r["x"] for r in reader.fetch("SELECT x FROM t ORDER BY x")] == [1]

    writer.execute("BEGIN IMMEDIATE")  # the hub's writer, mid-transaction
    writer.execute("INSERT INTO t VALUES (2)")
    # Read while the write holds the lock throughout: a reader that waited for it would
    # give up after INLINE_BUSY_MS with a 503 instead of answering.
    assert [r["x"] for r in reader.fetch("SELECT x FROM t ORDER BY x")] == [1]
    writer.execute("COMMIT")
    assert [r["x"] for r in reader.fetch("SELECT x FROM t ORDER BY x")] == [1, 2]
    reader.close()
    writer.close()


def test_it_cannot_write(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    _writer(path, "WAL").close()
    reader = InlineReader(str(path))
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.fetch("INSERT INTO t VALUES (3)")
    reader.close()


def test_a_locked_file_answers_503_after_a_short_wait(tmp_path: Path) -> None:
    """Outside WAL mode (a file another program holds locked), the reader gives up after
    INLINE_BUSY_MS, not the 5 s sqlite3 waits by default, and says retry."""
    path = tmp_path / "locked.db"
    holder = _writer(path, "DELETE")
    holder.execute("BEGIN EXCLUSIVE")
    reader = InlineReader(str(path))
    started = time.perf_counter()
    with pytest.raises(FHIRError) as refused:
        reader.fetch("SELECT x FROM t")
    waited = time.perf_counter() - started
    assert refused.value.status == 503
    assert refused.value.headers.get("Retry-After") == "1"
    assert INLINE_BUSY_MS / 1000 * 0.8 <= waited < 1.0
    holder.execute("ROLLBACK")
    assert reader.fetch("SELECT x FROM t") == []
    reader.close()
    holder.close()


@pytest.mark.parametrize(
    ("url", "inline"),
    [
        ("sqlite+aiosqlite:///{tmp}/hub.db", True),
        ("postgresql+asyncpg://postgres@127.0.0.1:5432/test", False),
    ],
)
async def test_only_sqlite_reads_inline(tmp_path: Path, url: str, inline: bool) -> None:
    db = Database(url.format(tmp=tmp_path))
    try:
        assert (db.inline is not None) is inline
    finally:
        await db.close()


@pytest.mark.parametrize("url", ["sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite://"])
def test_an_in_memory_database_is_refused_with_a_reason(url: str) -> None:
    # Each connection would open a database of its own: writes would vanish between them.
    with pytest.raises(ValueError, match="SQLite needs a database file"):
        Database(url)


@pytest.mark.parametrize(
    ("url", "path"),
    [
        ("sqlite+aiosqlite:////srv/hub/hub.db", "/srv/hub/hub.db"),
        ("sqlite+aiosqlite:///data/hub.db", "data/hub.db"),
        (
            "sqlite+aiosqlite:////srv/hub/hub.db?timeout=30",
            "/srv/hub/hub.db",
        ),  # an option, not the name
        ("sqlite+aiosqlite:///:memory:", None),
        ("sqlite+aiosqlite://", None),
        ("sqlite+aiosqlite:///file:hub?mode=memory&cache=shared&uri=true", None),
    ],
)
def test_the_file_of_a_sqlite_url(url: str, path: str | None) -> None:
    assert sqlite_path(url) == path


def test_it_never_creates_a_database_of_its_own(tmp_path: Path) -> None:
    """Pointed at a file that is not there, it fails: an empty database created in its place
    would answer every lookup with "no such table" while the hub's own file sat elsewhere."""
    missing = tmp_path / "not-here.db"
    reader = InlineReader(str(missing))
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        reader.fetch("SELECT 1")
    assert not missing.exists()


# -- the inline writer (Database.inline_writer) ------------------------------------------


async def _inline_db(tmp_path: Path, synchronous: str = "NORMAL") -> Database:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'hub.db'}", sqlite_synchronous=synchronous)
    _writer(tmp_path / "hub.db", "WAL").close()  # the table t
    return db


@pytest.mark.parametrize(("synchronous", "inline"), [("OFF", True), ("NORMAL", True), ("FULL", False), ("EXTRA", False)])
async def test_only_writes_that_do_not_wait_for_the_disk_run_inline(
    tmp_path: Path, synchronous: str, inline: bool
) -> None:
    db = await _inline_db(tmp_path, synchronous)
    try:
        assert (db.inline_writer is not None) is inline
    finally:
        await db.close()


async def test_an_inline_write_waits_for_another_writer_while_the_loop_goes_on(tmp_path: Path) -> None:
    db = await _inline_db(tmp_path)
    assert db.inline_writer is not None
    other = _writer(tmp_path / "hub.db", "WAL")
    other.execute("BEGIN IMMEDIATE")  # another process's write transaction
    pending = asyncio.ensure_future(db.inline_writer.write(lambda c: c.execute("INSERT INTO t VALUES (7)").rowcount))
    try:
        async with loop_ticks() as ticks:
            await asyncio.sleep(0.3)
        assert ticks[0] >= 10 and not pending.done()
        other.execute("COMMIT")
        assert await asyncio.wait_for(pending, 5) == 1
        assert [r["x"] for r in db.inline.fetch("SELECT x FROM t")] == [7]  # type: ignore[union-attr]
    finally:
        other.close()
        await db.close()


async def test_an_inline_write_is_all_or_nothing_and_a_held_lock_answers_503(tmp_path: Path) -> None:
    db = await _inline_db(tmp_path)
    writer = db.inline_writer
    assert writer is not None

    def half(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (1)")
        raise ValueError("the second statement's input was bad")

    with pytest.raises(ValueError, match="bad"):
        await writer.write(half)
    assert db.inline.fetch("SELECT x FROM t") == []  # type: ignore[union-attr]
    other = _writer(tmp_path / "hub.db", "WAL")
    other.execute("BEGIN IMMEDIATE")
    writer.timeout_s = 0.2
    try:
        with pytest.raises(FHIRError) as busy:
            async with asyncio.timeout(3):  # at its own timeout, not whenever the lock comes free
                await writer.write(lambda c: c.execute("INSERT INTO t VALUES (2)"))
        assert busy.value.status == 503 and busy.value.headers.get("Retry-After")
    finally:
        other.execute("ROLLBACK")
        other.close()
    await writer.write(lambda c: c.execute("INSERT INTO t VALUES (3)"))  # a fresh connection
    assert [r["x"] for r in db.inline.fetch("SELECT x FROM t")] == [3]  # type: ignore[union-attr]
    await db.close()
