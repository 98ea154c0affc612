"""Tables of identity and access, shared by every hub process (migration ``0002_iam``).

- ``iam_keys``: the hub's own signing keys. One per rotation slot (the kid names the slot,
  so processes racing to create it agree on one key); kept while tokens it signed live.
  The private key sits in the database so that every process signs with the same key.
- ``iam_jti``: client assertion ids seen, until they expire. The primary key makes
  insert-or-fail the replay check (SMART Backend Services: a ``jti`` is used once).
- ``iam_rate``: one token bucket per client (tokens left, time of the last refill).

Times are seconds since the epoch (UTC).
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Column, Float, Index, Integer, String, Table, Text

from sharedcare.store.schema import metadata

iam_keys = Table(
    "iam_keys",
    metadata,
    Column("kid", String(64), primary_key=True),
    Column("alg", String(8), nullable=False),
    Column("private_jwk", Text, nullable=False),
    Column("public_jwk", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("sign_until", BigInteger, nullable=False),
    Column("publish_until", BigInteger, nullable=False),
)

iam_jti = Table(
    "iam_jti",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("jti", String(255), primary_key=True),
    Column("expires_at", BigInteger, nullable=False),
    Index("ix_iam_jti_expires_at", "expires_at"),
)

iam_rate = Table(
    "iam_rate",
    metadata,
    Column("client_id", String(64), primary_key=True),
    Column("tokens", Float, nullable=False),
    Column("updated", Float, nullable=False),
    Column("granted", Integer, nullable=False, default=0),
)
