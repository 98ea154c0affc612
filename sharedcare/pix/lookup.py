"""Finding a person in the index: the statements and how their rows become a :class:`Person`.

PostgreSQL lookups go straight to asyncpg with these prebuilt statements (one round trip);
SQLite uses :data:`PERSON_LINKS`, and the same statement as PostgreSQL when another
capability's data comes with the person. Merges are followed to the survivor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import DateTime, select
from sqlalchemy.dialects import sqlite

from sharedcare.pix.model import MAX_MERGE_HOPS, Linkage, Person
from sharedcare.pix.schema import pix_links, pix_people

PERSON_LINKS = select(
    pix_people.c.id,
    pix_people.c.nhs_number,
    pix_people.c.merged_into,
    pix_links.c.provider,
    pix_links.c.system,
    pix_links.c.value,
    pix_links.c.status,
    pix_links.c.updated,
).select_from(pix_people.outerjoin(pix_links, pix_links.c.person_id == pix_people.c.id))


_FIND_COLUMNS = (
    "SELECT p.id, p.nhs_number, p.merged_into, l.provider, l.system, l.value, l.status, l.updated "
    "FROM pix_people p LEFT OUTER JOIN pix_links l ON l.person_id = p.id WHERE "
)
FIND_BY_NHS = _FIND_COLUMNS + "p.nhs_number = $1"
FIND_BY_ID = _FIND_COLUMNS + "p.id = $1"


def find_with(key: str, attached: str, parameter: str = "$1") -> str:
    """FIND_BY_NHS (``key`` "nhs_number") or FIND_BY_ID ("id") with one more column, ``attached``.

    ``attached`` is a SELECT of one value named ``value``, computed once from the CTE
    ``person`` (columns id, nhs_number, merged_into: the row found, before merges are
    followed): another capability's data about the person, fetched in the same round trip.
    ``parameter`` is how the statement names the key's value (asyncpg's ``$1``, sqlite3's ``?``).
    """
    if key not in ("nhs_number", "id"):
        raise ValueError(f"cannot find a person by {key!r}")
    return (
        f"WITH person AS (SELECT p.id, p.nhs_number, p.merged_into FROM pix_people p "
        f"WHERE p.{key} = {parameter}), attached AS ({attached}) "
        "SELECT person.id, person.nhs_number, person.merged_into, l.provider, l.system, "
        "l.value, l.status, l.updated, (SELECT value FROM attached) AS attached "
        "FROM person LEFT OUTER JOIN pix_links l ON l.person_id = person.id"
    )


_SQLITE = sqlite.dialect()
_SQLITE_DATETIME = DateTime().dialect_impl(_SQLITE).result_processor(_SQLITE, None)


def person_of_sqlite(rows: Sequence[Any]) -> Person | None:
    """:func:`person_of_rows` of raw SQLite rows (``Database.inline``): their timestamps are
    text, read back as SQLAlchemy reads its own DateTime columns there."""
    return person_of_rows([{**row, "updated": _SQLITE_DATETIME(row["updated"])} for row in rows])


# A local identifier → its linkage and the person it claims, in one round trip (the person's
# rows come from the same statement; merges are followed afterwards by id).
FIND_LINK = (
    "SELECT k.id AS link_id, k.provider AS link_provider, k.system AS link_system, "
    "k.value AS link_value, k.status AS link_status, k.person_id AS link_person, "
    "k.nhs_number AS link_nhs, k.reasons AS link_reasons, k.updated AS link_updated, "
    "p.id, p.nhs_number, p.merged_into, l.provider, l.system, l.value, l.status, l.updated "
    "FROM pix_links k LEFT OUTER JOIN pix_people p ON p.id = k.person_id "
    "LEFT OUTER JOIN pix_links l ON l.person_id = p.id WHERE k.system = $1 AND k.value = $2"
)


def person_of_rows(rows: Sequence[Any]) -> Person | None:
    if not rows:
        return None
    first = rows[0]
    links = tuple(
        Linkage(r["provider"], r["system"], r["value"], r["status"], r["updated"])
        for r in rows
        if r["provider"] is not None
    )
    return Person(first["id"], first["nhs_number"], links)


async def follow_merges_pg(driver: Any, rows: Sequence[Any]) -> Person | None:
    """The person of ``rows`` (people ⟕ links), following merges to the survivor."""
    for _ in range(MAX_MERGE_HOPS):
        if not rows or rows[0]["id"] is None:
            return None
        survivor = rows[0]["merged_into"]
        if survivor is None:
            return person_of_rows(rows)
        rows = await driver.fetch(FIND_BY_ID, survivor)
    return person_of_rows(rows)
