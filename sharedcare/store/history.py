"""Instance and type history (hl7.org/fhir/R4/http.html#history), newest first, keyset-paged."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select, tuple_

from sharedcare.fhir.errors import bad_request, not_found
from sharedcare.store.db import Database
from sharedcare.store.indexing import date_range
from sharedcare.store.schema import resource_versions, resources
from sharedcare.store.search_parse import encode_cursor


@dataclass(frozen=True, slots=True)
class Version:
    type: str
    id: str
    version: int
    last_updated: datetime
    method: str
    body: bytes


@dataclass(frozen=True, slots=True)
class HistoryPage:
    versions: list[Version]
    next_cursor: str | None


def parse_since(value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return date_range(value)[0]
    except ValueError:
        raise bad_request(f"_since={value!r} is not a FHIR instant (e.g. 2024-01-31T09:00:00Z).") from None


async def history(
    db: Database,
    rtype: str,
    rid: str | None,
    *,
    count: int,
    since: datetime | None,
    cursor: tuple[str, datetime | None, int] | None,
) -> HistoryPage:
    """Versions of one resource (``rid``) or of a whole type, newest first."""
    v = resource_versions.c
    query = select(v.type, v.id, v.version, v.last_updated, v.method, v.body, v.rid)
    if rid is not None:
        async with db.read() as conn:
            key = (
                await conn.execute(
                    select(resources.c.rid).where(resources.c.type == rtype, resources.c.id == rid)
                )
            ).scalar()
        if key is None:
            raise not_found(f"{rtype}/{rid} is not known to this server.")
        query = query.where(v.rid == key)
    else:
        query = query.where(v.type == rtype)
    if since is not None:
        query = query.where(v.last_updated >= since)
    if cursor is not None:
        direction, ts, packed = cursor
        if direction != "after" or ts is None:  # e.g. a search's cursor pasted into a history
            raise bad_request(
                "The _cursor value is not one this history issued; follow its next links."
            )
        # The cursor packs (rid, version) of the last entry shown into one integer.
        last_rid, last_version = divmod(packed, 1 << 20)
        query = query.where(
            tuple_(v.last_updated, v.rid, v.version) < tuple_(ts, last_rid, last_version)
        )
    query = query.order_by(v.last_updated.desc(), v.rid.desc(), v.version.desc()).limit(count + 1)
    async with db.read() as conn:
        rows: list[Any] = list((await conn.execute(query)).all())
    more = len(rows) > count
    rows = rows[:count]
    versions = [Version(*row[:6]) for row in rows]
    next_cursor = None
    if more and rows:
        last = rows[-1]
        next_cursor = encode_cursor("after", last.last_updated, (last.rid << 20) + last.version)
    return HistoryPage(versions, next_cursor)
