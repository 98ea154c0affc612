"""Alembic migrations run in-process on our async engine (``sharedcare db upgrade``)."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection

import sharedcare.audit.schema
import sharedcare.messaging.schema
import sharedcare.pix.schema

# Every capability's tables live on one metadata and one migration history: import them
# here so that whoever migrates (or truncates, in tests) sees all of them.
import sharedcare.queue.schema  # noqa: F401
from sharedcare.store.db import Database

MIGRATIONS = Path(__file__).with_name("migrations")
# Alembic narrates every connection at INFO; the CLI and app report the outcome themselves.
logging.getLogger("alembic").setLevel(logging.WARNING)


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def _current(conn: Connection) -> str | None:
    return MigrationContext.configure(conn).get_current_revision()


async def current_revision(db: Database) -> str | None:
    async with db.engine.connect() as conn:
        return await conn.run_sync(_current)


async def upgrade(db: Database, revision: str = "head") -> tuple[str | None, str | None]:
    """Apply migrations up to ``revision``; idempotent. Returns (before, after)."""
    return await _run(db, "upgrade", revision)


async def downgrade(db: Database, revision: str) -> tuple[str | None, str | None]:
    """Roll migrations back to ``revision`` (REQUIREMENTS §9: migrations run forward and back)."""
    return await _run(db, "downgrade", revision)


async def _run(db: Database, action: str, revision: str) -> tuple[str | None, str | None]:
    def work(conn: Connection) -> tuple[str | None, str | None]:
        before = _current(conn)
        cfg = alembic_config()
        cfg.attributes["connection"] = conn
        getattr(command, action)(cfg, revision)
        return before, _current(conn)

    async with db.write_engine.begin() as conn:
        return await conn.run_sync(work)


async def is_current(db: Database) -> bool:
    return await current_revision(db) == head_revision()
