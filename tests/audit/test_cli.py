"""``sharedcare audit export`` / ``prune`` as an operator runs them (Typer app, real database)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from typer.testing import CliRunner

from sharedcare.audit import AuditRecord, AuditWriter, count_events
from sharedcare.audit.cli import audit_app
from sharedcare.store.db import Database


async def _invoke(args: list[str], database_url: str, data_dir: Path, input: str | None = None) -> tuple[int, str]:
    env = {"SHAREDCARE_DATABASE_URL": database_url, "SHAREDCARE_DATA_DIR": str(data_dir)}
    # The commands run their own event loop (asyncio.run), so call them from a thread.
    result = await asyncio.to_thread(CliRunner().invoke, audit_app, args, env=env, input=input)
    return result.exit_code, result.output


async def test_export_then_prune_from_the_command_line(
    writer: AuditWriter, db: Database, database_url: str, tmp_path: Path, make_record: Callable[..., AuditRecord]
) -> None:
    await asyncio.gather(*(writer.record(make_record()) for _ in range(12)))
    await asyncio.sleep(0.01)
    cutoff = datetime.now(UTC).isoformat()
    await asyncio.sleep(0.01)
    await writer.record(make_record())
    out = tmp_path / "audit-2026.ndjson"

    code, output = await _invoke(["export", "--until", cutoff, "--out", str(out)], database_url, tmp_path)
    assert code == 0, output
    lines = out.read_bytes().splitlines()
    assert len(lines) == 12 and all(orjson.loads(line)["resourceType"] == "AuditEvent" for line in lines)
    assert f"Exported 12 AuditEvents to {out}" in output
    assert hashlib.sha256(out.read_bytes()).hexdigest() in output
    assert not out.with_name(out.name + ".partial").exists()

    code, output = await _invoke(["prune", "--before", cutoff, "--dry-run"], database_url, tmp_path)
    assert code == 0 and "12 AuditEvents" in output and "would be pruned" in output
    code, output = await _invoke(["prune", "--before", cutoff], database_url, tmp_path, input="n\n")
    assert code == 1 and await count_events(db) == 13  # declined: nothing deleted
    code, output = await _invoke(["prune", "--before", cutoff, "--yes"], database_url, tmp_path)
    assert code == 0, output
    assert "Pruned 12 AuditEvents" in output
    assert await count_events(db) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["prune", "--before", (datetime.now(UTC) + timedelta(days=1)).isoformat()], "in the future"),
        (["prune", "--before", "last tuesday"], "is not a date"),
        (["export", "--until", "2026-13-01", "--out", "x.ndjson"], "is not a date"),
    ],
)
async def test_bad_arguments_are_refused(tmp_path: Path, args: list[str], message: str) -> None:
    # Refused before any database is opened: no backend needed.
    code, output = await _invoke(args, f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}", tmp_path)
    assert code == 2 and message in output
