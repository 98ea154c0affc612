"""``sharedcare messages list | show | redrive`` against a real database."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sharedcare.messaging.cli import messages_app
from sharedcare.messaging.schema import messages
from sharedcare.store import migrate
from sharedcare.store.db import Database
from sharedcare.store.repository import now_utc


def _dead_letter(url: str) -> None:
    async def run() -> None:
        db = Database(url)
        await migrate.upgrade(db)
        now = now_utc()

        async def work(conn: Any) -> None:
            await conn.execute(
                messages.insert().values(
                    id=7,
                    sender="gp-a",
                    recipient="ward-b",
                    bundle_id="b-1",
                    header_id="h-1",
                    event="|discharge",
                    mode="pull",
                    ordered=True,
                    state="dead",
                    deliveries=0,
                    resends=0,
                    attempts=3,
                    patient_data=True,
                    size=2,
                    body=b"{}",
                    last_error="not delivered within 86400 s",
                    accepted_at=now,
                    updated_at=now,
                )
            )

        await db.write(work)
        await db.close()

    asyncio.run(run())


def test_operators_list_show_and_redrive_dead_letters(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = database_url
    monkeypatch.setenv("SHAREDCARE_DATA_DIR", str(tmp_path))
    _dead_letter(url)
    monkeypatch.setenv("SHAREDCARE_DATABASE_URL", url)
    runner = CliRunner()
    listed = runner.invoke(messages_app, ["list", "--json"])
    assert listed.exit_code == 0, listed.output
    (row,) = [json.loads(line) for line in listed.stdout.splitlines() if line.startswith("{")]
    assert row["id"] == 7 and row["state"] == "dead" and "86400" in row["last_error"]
    shown = runner.invoke(messages_app, ["show", "7"])
    assert shown.exit_code == 0 and json.loads(shown.stdout)["bundle_id"] == "b-1"
    assert runner.invoke(messages_app, ["redrive", "7"]).exit_code == 0
    again = runner.invoke(messages_app, ["redrive", "7"])
    assert again.exit_code == 1 and "not dead-lettered" in again.output
    queued = runner.invoke(messages_app, ["list", "--state", "queued", "--json"])
    assert [
        json.loads(line)["id"] for line in queued.stdout.splitlines() if line.startswith("{")
    ] == [7]
    assert runner.invoke(messages_app, ["show", "99"]).exit_code == 1
