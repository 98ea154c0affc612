"""Dialect-specific INSERT for the IAM tables (ON CONFLICT works alike on both databases)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite


def insert_for(dialect: str, table: Table) -> Any:
    """An INSERT supporting ``on_conflict_do_nothing/do_update`` on ``dialect``."""
    if dialect == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)
