"""Bulk registration from NDJSON (``sharedcare pix load``): the online rules, set-at-a-time.

Each line is one FHIR Patient registered by one provider (``--provider``), checked exactly as
the PIXm feed checks it (:func:`sharedcare.pix.registration.parse_registration`); refused
lines are reported with their line number and reason and counted in the metrics, and the
rest are loaded. Lines are written in chunks, one transaction per chunk, so a chunk is either
wholly written or not at all and a killed load resumes by running again (a repeated line is
``unchanged``).

The fast path handles what a load is mostly made of — new local identifiers: the chunk's
existing people are read first, new golden Patients are prepared (validated, indexed) outside
the transaction, then people, Patients, linkages and queued traces are each inserted with
one multi-row statement per table. Identifiers already registered (and duplicates within a
chunk) take the online path one by one inside the same transaction, with its conflict rules.
A chunk that meets a concurrent writer (unique violation) is retried on the online path.

Bulk-loaded linkages start their history (``pix_link_history``) at their first change; the
linkage's ``created`` time records the load. ``pre_verified`` loads linkages as verified
without queuing traces — for migrating from an index that already traced them (e.g. an
existing MPI); the operator takes responsibility for that.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

import orjson
from sqlalchemy import Table, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.fhir.errors import FHIRError
from sharedcare.pix.connections import driver_connection
from sharedcare.pix.index import PENDING, UNVERIFIED, VERIFIED, PatientIndex, prepare_golden
from sharedcare.pix.metrics import record_registration
from sharedcare.pix.registration import Refused, Registration, parse_registration
from sharedcare.pix.schema import pix_links, pix_people
from sharedcare.pix.tracing import TRACE_QUEUE, trace_item
from sharedcare.queue import store as queue
from sharedcare.queue.schema import queue_items
from sharedcare.registry.model import System
from sharedcare.store.repository import Prepared, index_values, now_utc
from sharedcare.store.repository import _stamp as stamp
from sharedcare.store.schema import INDEX_TABLES, change_log, resource_versions, resources

__all__ = ["LoadReport", "load_lines"]

MAX_INFLIGHT = 2  # chunks committing at once (PostgreSQL); 2 cores: the loader and 2 backends


@dataclass
class LoadReport:
    lines: int = 0
    created: int = 0
    updated: int = 0
    unchanged: int = 0
    people_created: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    errors: list[tuple[int, str, str]] = field(default_factory=list)  # (line, reason, message)

    @property
    def failed(self) -> int:
        return sum(self.refused.values())


Progress = Callable[[int], None]


async def load_lines(
    index: PatientIndex,
    provider: System,
    lines: Iterable[bytes | str],
    *,
    chunk: int = 5000,
    pre_verified: bool = False,
    progress: Progress | None = None,
    max_errors: int = 1000,
) -> LoadReport:
    """Load NDJSON Patient lines registered by ``provider``; returns what happened.

    Pipelined: while one chunk's transaction runs in the database, the next chunk is parsed,
    checked and prepared here, so the loader's CPU and the database's overlap (2 cores).
    A line of the next chunk that touches an identifier or NHS number of the chunk still being
    written takes the one-by-one path, inside the next transaction, so it sees that write.
    """
    report = LoadReport()
    batch: list[tuple[int, Registration]] = []
    inflight: deque[tuple[asyncio.Task[tuple[list[Outcome], int]], _Plan]] = deque()

    async def finish_oldest() -> None:
        task, _plan_done = inflight[0]
        outcomes, created_people = await task
        inflight.popleft()
        report.people_created += created_people
        _tally(report, provider, outcomes, max_errors)
        if progress:
            progress(len(outcomes))

    async def finish() -> None:
        while inflight:
            await finish_oldest()

    async def flush(items: list[tuple[int, Registration]]) -> None:
        busy: tuple[set[tuple[str, str]], set[str]] = (set(), set())
        for _task, p in inflight:
            busy[0].update(p.keys)
            busy[1].update(p.numbers)
        plan = await _plan(index, items, busy)
        # A chunk of new identifiers only touches rows no other chunk in flight touches
        # (``busy``), so up to MAX_INFLIGHT of them commit side by side: PostgreSQL writes
        # one chunk per backend, and the golden Patients' rows (resource, version, change
        # log, search index) made one backend the bottleneck. A chunk with lines taking the
        # one-by-one path waits until every earlier chunk committed, so that it sees them.
        limit = 0 if plan.slow or index.db.dialect != "postgresql" else MAX_INFLIGHT - 1
        while len(inflight) > limit:
            await finish_oldest()
        inflight.append((asyncio.create_task(_commit(index, plan, pre_verified)), plan))

    try:
        for number, line in enumerate(lines, start=1):
            report.lines += 1
            if not line.strip():
                continue
            try:
                try:
                    body = orjson.loads(line)
                except orjson.JSONDecodeError as exc:
                    raise Refused(
                        "malformed", FHIRError.of(400, "invalid", f"not valid JSON: {exc}")
                    ) from None
                batch.append((number, parse_registration(body, provider)))
            except Refused as refused:
                _refused(report, provider, number, refused, max_errors)
            if len(batch) >= chunk:
                await flush(batch)
                batch = []
                await asyncio.sleep(0)  # let the write start before parsing the next chunk
        if batch:
            await flush(batch)
        await finish()
    finally:
        for task, _plan_left in inflight:
            if not task.done():
                task.cancel()
            with contextlib.suppress(BaseException):
                await task
    return report


def _refused(
    report: LoadReport, provider: System, number: int, refused: Refused, max_errors: int
) -> None:
    report.refused[refused.reason] += 1
    record_registration(provider.client_id, "refused", refused.reason)
    if len(report.errors) < max_errors:
        report.errors.append((number, refused.reason, str(refused.error)))


Outcome = tuple[int, Registration, Any]


@dataclass
class _Plan:
    fresh: list[tuple[int, Registration]]
    slow: list[tuple[int, Registration]]
    people: dict[str, tuple[str, bool]]
    new_people: dict[str, tuple[str, Prepared]]
    keys: set[tuple[str, str]]
    numbers: set[str]


async def _plan(
    index: PatientIndex,
    batch: list[tuple[int, Registration]],
    busy: tuple[set[tuple[str, str]], set[str]],
) -> _Plan:
    """Split a chunk into new identifiers (fast path) and the rest; prepare new golden records."""
    busy_keys, busy_numbers = busy
    seen: set[tuple[str, str]] = set()
    fresh: list[tuple[int, Registration]] = []
    slow: list[tuple[int, Registration]] = []
    for number, reg in batch:
        key = (reg.system, reg.value)
        repeat = (
            key in seen
            or key in busy_keys
            or (reg.nhs_number is not None and reg.nhs_number in busy_numbers)
        )
        (slow if repeat else fresh).append((number, reg))
        seen.add(key)
    async with index.db.read() as conn:
        existing = await _existing_links(conn, [(r.system, r.value) for _, r in fresh])
        numbers = sorted({reg.nhs_number for _, reg in fresh if reg.nhs_number})
        people = await _people(conn, numbers)
    slow = [item for item in fresh if (item[1].system, item[1].value) in existing] + slow
    fresh = [item for item in fresh if (item[1].system, item[1].value) not in existing]
    new_people: dict[str, tuple[str, Prepared]] = {}
    for _, reg in fresh:
        if reg.nhs_number and reg.nhs_number not in people and reg.nhs_number not in new_people:
            new_people[reg.nhs_number] = (
                str(uuid.uuid4()),
                prepare_golden(index.store, reg.nhs_number, reg.demographics),
            )
    numbers_touched = {reg.nhs_number for _, reg in batch if reg.nhs_number}
    return _Plan(fresh, slow, people, new_people, seen, numbers_touched)


async def _commit(
    index: PatientIndex, plan: _Plan, pre_verified: bool
) -> tuple[list[Outcome], int]:
    """Write one chunk in one transaction; returns the outcomes and how many people it created."""
    try:
        outcomes = await index.db.write(
            lambda conn: _write(
                conn, index, plan.fresh, plan.slow, plan.people, plan.new_people, pre_verified
            )
        )
    except (IntegrityError, FHIRError) as exc:
        if isinstance(exc, FHIRError) and exc.status != 409:
            raise
        # A concurrent registration took one of our NHS numbers or identifiers: go one by one.
        outcomes = await index.db.write(
            lambda conn: _write(conn, index, [], plan.fresh + plan.slow, {}, {}, pre_verified)
        )
        return outcomes, 0
    return outcomes, len(plan.new_people)


def _tally(report: LoadReport, provider: System, outcomes: list[Outcome], max_errors: int) -> None:
    counts: Counter[str] = Counter()
    for number, _reg, outcome in outcomes:
        if isinstance(outcome, Refused):
            _refused(report, provider, number, outcome, max_errors)
            continue
        counts[outcome] += 1
    for outcome, n in counts.items():
        setattr(report, outcome, getattr(report, outcome) + n)
        record_registration(provider.client_id, outcome, count=n)


async def _existing_links(
    conn: AsyncConnection, keys: list[tuple[str, str]]
) -> set[tuple[str, str]]:
    found: set[tuple[str, str]] = set()
    by_system: dict[str, list[str]] = {}
    for system, value in keys:
        by_system.setdefault(system, []).append(value)
    for system, values in by_system.items():
        if conn.dialect.name == "postgresql":  # one array parameter instead of thousands
            driver = await driver_connection(conn)
            rows = await driver.fetch(
                "SELECT value FROM pix_links WHERE system = $1 AND value = ANY($2::text[])",
                system,
                values,
            )
            found.update((system, r[0]) for r in rows)
            continue
        for start in range(0, len(values), 500):
            result = await conn.execute(
                select(pix_links.c.value).where(
                    pix_links.c.system == system, pix_links.c.value.in_(values[start : start + 500])
                )
            )
            found.update((system, v) for (v,) in result)
    return found


async def _people(conn: AsyncConnection, numbers: list[str]) -> dict[str, tuple[str, bool]]:
    """NHS number → (person id holding it, merged away?); survivors are resolved in the write."""
    out: dict[str, tuple[str, bool]] = {}
    if conn.dialect.name == "postgresql":
        driver = await driver_connection(conn)
        rows = await driver.fetch(
            "SELECT nhs_number, id, merged_into FROM pix_people WHERE nhs_number = ANY($1::text[])",
            numbers,
        )
        return {r[0]: (r[1], r[2] is not None) for r in rows}
    for start in range(0, len(numbers), 500):
        result = await conn.execute(
            select(pix_people.c.nhs_number, pix_people.c.id, pix_people.c.merged_into).where(
                pix_people.c.nhs_number.in_(numbers[start : start + 500])
            )
        )
        out.update((n, (i, m is not None)) for n, i, m in result)
    return out


async def _write(
    conn: AsyncConnection,
    index: PatientIndex,
    fresh: list[tuple[int, Registration]],
    slow: list[tuple[int, Registration]],
    people: dict[str, tuple[str, bool]],
    new_people: dict[str, tuple[str, Prepared]],
    pre_verified: bool,
) -> list[tuple[int, Registration, Any]]:
    now = now_utc()
    outcomes: list[tuple[int, Registration, Any]] = []
    if new_people:
        await _insert_patients(
            conn, index, [(prepared, pid) for pid, prepared in new_people.values()], now
        )
        await _insert(
            conn,
            pix_people,
            [
                {
                    "id": pid,
                    "nhs_number": nhs,
                    "merged_into": None,
                    "verified": pre_verified,
                    "created": now,
                    "updated": now,
                }
                for nhs, (pid, _) in new_people.items()
            ],
        )
    person_of = {nhs: pid for nhs, (pid, _) in new_people.items()}
    for nhs, (
        pid,
        merged,
    ) in people.items():  # a merged-away person's number routes to the survivor
        person_of[nhs] = await index._survivor(conn, pid) if merged else pid
    if fresh:
        rows = []
        for _, reg in fresh:
            d = reg.demographics
            if reg.nhs_number:
                status, reasons = (
                    (VERIFIED, "bulk load: verified by the source")
                    if pre_verified
                    else (PENDING, None)
                )
            else:
                status, reasons = UNVERIFIED, "no NHS number given: cannot be traced"
            rows.append(
                {
                    "person_id": person_of.get(reg.nhs_number) if reg.nhs_number else None,
                    "provider": reg.provider,
                    "system": reg.system,
                    "value": reg.value,
                    "status": status,
                    "nhs_number": reg.nhs_number,
                    "family": d.family,
                    "given": d.given,
                    "birth_date": d.birth_date,
                    "gender": d.gender,
                    "postcode": d.postcode,
                    "reasons": reasons,
                    "revision": 1,
                    "created": now,
                    "updated": now,
                }
            )
        ids = await _insert(conn, pix_links, rows, ids="id")
        if not pre_verified:
            items = []
            for link_id, (_, reg) in zip(ids, fresh, strict=True):
                if reg.nhs_number:
                    registration_id = f"{link_id}.1"
                    payload, key = trace_item(registration_id, reg.nhs_number, reg.demographics)
                    items.append(
                        {
                            "queue": TRACE_QUEUE,
                            "key": key,
                            "partition": registration_id,
                            "payload": orjson.dumps(payload),
                            "state": queue.READY,
                            "attempts": 0,
                            "available_at": now,
                            "created_at": now,
                            "updated_at": now,
                        }
                    )
            if items:
                await _insert(conn, queue_items, items)
        outcomes += [(number, reg, "created") for number, reg in fresh]
    for number, reg in slow:
        prepared = prepare_golden(index.store, reg.nhs_number, reg.demographics)
        try:
            async with conn.begin_nested():
                result = await index.register_in(conn, reg, prepared)
        except Refused as refused:
            outcomes.append((number, reg, refused))
            continue
        outcomes.append(
            (
                number,
                reg,
                "created" if result.created else ("updated" if result.changed else "unchanged"),
            )
        )
    return outcomes


# -- set-at-a-time inserts: COPY on PostgreSQL, executemany on SQLite -------------------------
# COPY skips SQLAlchemy's per-row parameter processing, which profiling showed to be most of
# the load's time on PostgreSQL (bench/pix.py); ids come from the table's own sequence.


async def _insert(
    conn: AsyncConnection, table: Table, rows: list[dict[str, Any]], *, ids: str | None = None
) -> list[int]:
    """Insert ``rows`` (all with the same keys); returns the new ``ids`` column values if asked."""
    if not rows:
        return []
    if conn.dialect.name != "postgresql":
        if ids is None:
            await conn.execute(insert(table), rows)
            return []
        column = table.c[ids]
        result = await conn.execute(
            insert(table).returning(column, sort_by_parameter_order=True), rows
        )
        return list(result.scalars().all())
    driver = await driver_connection(conn)
    new_ids: list[int] = []
    if ids is not None:
        records = await driver.fetch(
            "SELECT nextval(pg_get_serial_sequence($1, $2)) FROM generate_series(1, $3)",
            table.name,
            ids,
            len(rows),
        )
        new_ids = [r[0] for r in records]
        rows = [{ids: i, **row} for i, row in zip(new_ids, rows, strict=True)]
    columns = list(rows[0])
    row_tuple = itemgetter(*columns)  # C-level: a generator per row was 10% of a load's CPU
    records = (
        [row_tuple(row) for row in rows] if len(columns) > 1 else [(r[columns[0]],) for r in rows]
    )
    await driver.copy_records_to_table(table.name, records=records, columns=columns)
    return new_ids


async def _insert_patients(
    conn: AsyncConnection, index: PatientIndex, items: list[tuple[Prepared, str]], ts: Any
) -> None:
    """New golden Patients, as :meth:`Store.create_many_in` writes them (resource, version 1,
    change log, search index), with COPY on PostgreSQL."""
    if conn.dialect.name != "postgresql":
        await index.store.create_many_in(conn, list(items))
        return
    bodies = [stamp(prepared.resource, pid, 1, ts) for prepared, pid in items]
    rids = await _insert(
        conn,
        resources,
        [
            {
                "type": "Patient",
                "id": pid,
                "version": 1,
                "last_updated": ts,
                "deleted": False,
                "body": body,
            }
            for (_, pid), body in zip(items, bodies, strict=True)
        ],
        ids="rid",
    )
    await _insert(
        conn,
        resource_versions,
        [
            {
                "rid": rid,
                "version": 1,
                "type": "Patient",
                "id": pid,
                "last_updated": ts,
                "method": "create",
                "deleted": False,
                "body": body,
            }
            for rid, (_, pid), body in zip(rids, items, bodies, strict=True)
        ],
    )
    await _insert(
        conn,
        change_log,
        [
            {"ts": ts, "type": "Patient", "id": pid, "version": 1, "op": "create", "body": body}
            for (_, pid), body in zip(items, bodies, strict=True)
        ],
    )
    merged: dict[str, list[dict[str, Any]]] = {kind: [] for kind in INDEX_TABLES}
    for rid, (prepared, _) in zip(rids, items, strict=True):
        for kind, values in index_values(rid, "Patient", prepared.rows).items():
            merged[kind].extend(values)
    for kind, values in merged.items():
        await _insert(conn, INDEX_TABLES[kind], values)
