"""The migrations build exactly the schema the code declares, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import sharedcare.audit.schema
import sharedcare.iam.schema
import sharedcare.messaging.schema
import sharedcare.pix.schema
import sharedcare.queue.schema  # noqa: F401 - each registers its tables on the metadata
from sharedcare.store import migrate
from sharedcare.store.db import Database
from sharedcare.store.schema import metadata


async def test_the_migrated_schema_is_the_declared_one(database_url: str) -> None:
    db = Database(database_url)
    try:
        await migrate.upgrade(db)
        async with db.engine.connect() as conn:
            diff = await conn.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), metadata)
            )
    finally:
        await db.close()
    # A table, column or index declared in code but missing from the migrations (or the
    # reverse) is something a fresh database and an upgraded one would disagree on.
    assert diff == []
