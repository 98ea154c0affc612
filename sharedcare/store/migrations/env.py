"""Alembic environment: runs on the connection handed over by ``sharedcare.store.migrate``."""

from __future__ import annotations

from alembic import context

import sharedcare.store.migrate  # noqa: F401 - registers every capability's tables
from sharedcare.store.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:  # pragma: no cover - we never run alembic's own CLI
    raise RuntimeError("run migrations with `sharedcare db upgrade`")

context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    transactional_ddl=True,
)
with context.begin_transaction():
    context.run_migrations()
