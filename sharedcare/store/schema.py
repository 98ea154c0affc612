"""Tables of the regional FHIR store (SQLAlchemy Core; the same schema on SQLite and PostgreSQL).

- ``resources``: the current version of every resource, keyed by a compact surrogate ``rid``
  so that search-index rows stay small and joins stay cheap.
- ``resource_versions``: every version ever written (history, vread).
- ``idx_*``: one search-index table per search parameter type (token, string, reference,
  date, uri), rebuilt for a resource on every write.
- ``change_log``: every write in commit order, with its body; point-in-time recovery
  replays it (REQUIREMENTS §5).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    UniqueConstraint,
)

# SQLite only auto-increments an INTEGER PRIMARY KEY (a rowid alias).
BigId = BigInteger().with_variant(Integer(), "sqlite")
# Byte-order collation on PostgreSQL so that prefix searches are plain btree range scans.
SortableText = String().with_variant(String(collation="C"), "postgresql")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "pk": "pk_%(table_name)s",
}
metadata = MetaData(naming_convention=NAMING)

resources = Table(
    "resources",
    metadata,
    Column("rid", BigId, primary_key=True, autoincrement=True),
    Column("type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("last_updated", DateTime, nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("body", LargeBinary, nullable=False),
    UniqueConstraint("type", "id"),
    Index("ix_resources_type_rid", "type", "rid"),
    Index("ix_resources_type_last_updated", "type", "last_updated", "rid"),
)

resource_versions = Table(
    "resource_versions",
    metadata,
    Column("rid", BigId, primary_key=True),
    Column("version", Integer, primary_key=True),
    Column("type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("last_updated", DateTime, nullable=False),
    Column("method", String(8), nullable=False),
    Column("deleted", Boolean, nullable=False, default=False),
    Column("body", LargeBinary, nullable=False),
    Index("ix_resource_versions_type_last_updated", "type", "last_updated"),
)

change_log = Table(
    "change_log",
    metadata,
    Column("seq", BigId, primary_key=True, autoincrement=True),
    Column("ts", DateTime, nullable=False),
    Column("type", String(64), nullable=False),
    Column("id", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("op", String(8), nullable=False),
    Column("body", LargeBinary, nullable=True),
)

idx_token = Table(
    "idx_token",
    metadata,
    Column("rid", BigId, nullable=False),
    Column("type", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("system", String, nullable=True),
    Column("code", String, nullable=False),
    Index("ix_idx_token_lookup", "type", "param", "code", "system"),
    Index("ix_idx_token_rid", "rid"),
)

idx_string = Table(
    "idx_string",
    metadata,
    Column("rid", BigId, nullable=False),
    Column("type", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("norm", SortableText, nullable=False),
    Column("exact", String, nullable=False),
    # rid too: a string clause finds its ids in the index alone (migration 0007).
    Index("ix_idx_string_lookup", "type", "param", "norm", "rid"),
    Index("ix_idx_string_rid", "rid"),
)

idx_reference = Table(
    "idx_reference",
    metadata,
    Column("rid", BigId, nullable=False),
    Column("type", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("target_type", String(64), nullable=True),
    Column("target_id", String(64), nullable=True),
    Column("url", String, nullable=False),
    Index("ix_idx_reference_target", "target_id", "target_type", "param"),
    Index("ix_idx_reference_url", "url"),
    Index("ix_idx_reference_rid", "rid"),
)

idx_date = Table(
    "idx_date",
    metadata,
    Column("rid", BigId, nullable=False),
    Column("type", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("low", DateTime, nullable=False),
    Column("high", DateTime, nullable=False),
    Index("ix_idx_date_low", "type", "param", "low"),
    Index("ix_idx_date_high", "type", "param", "high"),
    Index("ix_idx_date_rid", "rid"),
)

idx_uri = Table(
    "idx_uri",
    metadata,
    Column("rid", BigId, nullable=False),
    Column("type", String(64), nullable=False),
    Column("param", String(64), nullable=False),
    Column("value", String, nullable=False),
    Index("ix_idx_uri_lookup", "type", "param", "value"),
    Index("ix_idx_uri_rid", "rid"),
)

INDEX_TABLES = {
    "token": idx_token,
    "string": idx_string,
    "reference": idx_reference,
    "date": idx_date,
    "uri": idx_uri,
}
