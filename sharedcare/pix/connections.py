"""Database connections for the patient index: failures become 503s, never 500s."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.fhir.errors import FHIRError
from sharedcare.store.db import is_connection_failure

__all__ = [
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
