"""The federated query's first step, as the region's Consent records grow: does it slow down?

Each federated query finds the person and their active Consent records in one statement
(``PatientIndex.find_with`` with ``ReleaseGate.consent_sql()``). This measures that
statement on PostgreSQL and SQLite, for a person with three Consents of their own, while
``--others`` other people's active Consents are added to the region. For comparison it
also times the previous statement (PostgreSQL's until stop 17, run the same way on
SQLite), which listed every active Consent in the region and then kept the person's.

The person's own records, and one other person's, are written through the store. The
other records are copies of that one (resource row, reference and status index rows)
with new ids and targets, so that tens of thousands of them take seconds, not minutes.

    python bench/consent_lookup.py [--others 0,1000,5000,20000] [--calls 200]
        [--backend postgresql,sqlite]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    RESULTS_DIR,
    PostgresDatabase,
    log,
    machine_info,
    print_table,
    timestamp,
    write_json,
)

NHS = "9990000001"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
# The previous statement (PostgreSQL's until stop 17): every active Consent's rid as a
# list, then the person's.
PREVIOUS = (
    "FROM person, resources r "
    "WHERE person.merged_into IS NULL AND r.type = 'Consent' AND r.deleted = false "
    "AND r.rid IN (SELECT x.rid FROM idx_reference x WHERE x.type = 'Consent' "
    "AND x.param = 'patient' AND x.target_type = 'Patient' AND x.target_id = person.id) "
    "AND r.rid IN (SELECT t.rid FROM idx_token t WHERE t.type = 'Consent' "
    "AND t.param = 'status' AND t.code = 'active') ORDER BY r.rid LIMIT 1001"
)


def consent(patient: str, code: str = "OPTIN") -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient},
        "dateTime": "2024-01-01",
        "policyRule": {"coding": [{"system": ACT, "code": code}]},
    }


async def seed_others(db: Any, template_rid: int, start: int, count: int) -> None:
    """``count`` copies of the Consent ``template_rid`` about new people, rids from ``start``."""
    from sqlalchemy import insert, select

    from sharedcare.store.schema import idx_reference, idx_token, resources

    async with db.read() as conn:
        row = (await conn.execute(select(resources).where(resources.c.rid == template_rid))).one()
        refs = (
            await conn.execute(select(idx_reference).where(idx_reference.c.rid == template_rid))
        ).all()
        tokens = (
            await conn.execute(select(idx_token).where(idx_token.c.rid == template_rid))
        ).all()
    body = orjson.loads(row.body)
    new_rows, new_refs, new_tokens = [], [], []
    for rid in range(start, start + count):
        who = f"other-{rid}"
        new_rows.append(
            {
                **row._mapping,
                "rid": rid,
                "id": f"c-{rid}",
                "body": orjson.dumps(
                    {**body, "id": f"c-{rid}", "patient": {"reference": f"Patient/{who}"}}
                ),
            }
        )
        for ref in refs:
            extra = {"target_id": who, "url": f"Patient/{who}"} if ref.param == "patient" else {}
            new_refs.append(
                {**{k: v for k, v in ref._mapping.items() if k != "id"}, "rid": rid, **extra}
            )
        for tok in tokens:
            new_tokens.append({**{k: v for k, v in tok._mapping.items() if k != "id"}, "rid": rid})

    async def write(conn: Any) -> None:
        for table, rows in (
            (resources, new_rows),
            (idx_reference, new_refs),
            (idx_token, new_tokens),
        ):
            for i in range(0, len(rows), 2000):
                await conn.execute(insert(table), rows[i : i + 2000])

    await db.write(write)


async def measure(url: str, others: list[int], calls: int) -> list[dict[str, Any]]:
    from sqlalchemy import func, insert, select

    from sharedcare.consent.gate import CONSENT_BODIES, CONSENT_BODIES_SQLITE, attached_bodies
    from sharedcare.pix.index import PatientIndex
    from sharedcare.pix.schema import pix_people
    from sharedcare.store import migrate
    from sharedcare.store.db import Database
    from sharedcare.store.repository import Store
    from sharedcare.store.schema import resources
    from sharedcare.store.service import FhirService

    db = Database(url)
    out: list[dict[str, Any]] = []
    try:
        await migrate.upgrade(db)
        store = Store(db)
        fhir = FhirService(store, fhir_base="http://bench/fhir", default_count=50, max_count=1000)
        index = PatientIndex(db, store)
        now = datetime.now(UTC).replace(tzinfo=None)

        async def person(conn: Any) -> None:
            await conn.execute(
                insert(pix_people),
                [{"id": "bench-person", "nhs_number": NHS, "merged_into": None, "verified": True,
                  "created": now, "updated": now}],
            )  # fmt: skip

        await db.write(person)
        for code in ("OPTIN", "OPTOUT", "OPTIN"):
            assert (
                await fhir.create("Consent", consent("Patient/bench-person", code))
            ).status == 201
        created = await fhir.create("Consent", consent("Patient/someone-else"))
        assert created.status == 201
        async with db.read() as conn:
            template = (
                await conn.execute(
                    select(func.max(resources.c.rid)).where(resources.c.type == "Consent")
                )
            ).scalar_one()
        current = CONSENT_BODIES if db.dialect == "postgresql" else CONSENT_BODIES_SQLITE
        previous = (
            f"SELECT ARRAY(SELECT r.body {PREVIOUS}) AS value"
            if db.dialect == "postgresql"
            else "SELECT json_group_array(json_array(c.rid, json(CAST(c.body AS TEXT)))) AS value "
            f"FROM (SELECT r.rid, r.body {PREVIOUS}) c"
        )
        seeded, next_rid = 1, template + 1
        for target in others:
            if target > seeded:
                await seed_others(db, template, next_rid, target - seeded)
                next_rid += target - seeded
                seeded = target
            if db.dialect == "postgresql":
                async with db.read() as conn:
                    await conn.exec_driver_sql("ANALYZE")
            row: dict[str, Any] = {"backend": db.dialect, "others": seeded}
            for name, sql in (("current", current), ("previous", previous)):
                found, attached = await index.find_with(sql, nhs_number=NHS)
                assert found is not None and len(attached_bodies(attached) or []) == 3
                n = calls if name == "current" or seeded <= 1000 else max(5, calls // 20)
                cpu0, t0 = time.process_time(), time.perf_counter()
                for _ in range(n):
                    await index.find_with(sql, nhs_number=NHS)
                row[f"{name}_ms"] = (time.perf_counter() - t0) / n * 1000
                row[f"{name}_cpu_ms"] = (time.process_time() - cpu0) / n * 1000
            log(f"{db.dialect}, {seeded:,} other Consents: {row['current_ms']:.3f} ms now, "
                f"{row['previous_ms']:.3f} ms with the previous statement")  # fmt: skip
            out.append(row)
    finally:
        await db.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--others", default="0,1000,5000,20000")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--backend", default="postgresql,sqlite")
    args = parser.parse_args()
    others = sorted(int(n) for n in args.others.split(","))
    rows: list[dict[str, Any]] = []
    for backend in args.backend.split(","):
        with contextlib.ExitStack() as stack:
            if backend == "postgresql":
                url = stack.enter_context(PostgresDatabase(prefix="sharedcare_bench_consent")).url
            else:
                folder = stack.enter_context(
                    tempfile.TemporaryDirectory(prefix="sharedcare-bench-")
                )
                url = f"sqlite+aiosqlite:///{folder}/hub.db"
            rows += asyncio.run(measure(url, others, args.calls))
    print_table(
        "The person and their 3 Consents, one statement (ms per lookup, wall / CPU)",
        ["backend", "other people's active Consents", "now", "previous statement"],
        [
            [
                r["backend"],
                f"{r['others']:,}",
                f"{r['current_ms']:.3f} / {r['current_cpu_ms']:.3f}",
                f"{r['previous_ms']:.3f} / {r['previous_cpu_ms']:.3f}",
            ]
            for r in rows
        ],
    )
    path = write_json(
        RESULTS_DIR / f"consent-lookup-{timestamp()}.json",
        {"machine": machine_info(), "args": vars(args), "rows": rows},
    )
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
