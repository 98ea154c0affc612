"""``sharedcare audit export`` and ``sharedcare audit prune``: retention of the audit trail.

A Typer sub-app that ``sharedcare.cli`` mounts with ``app.add_typer(audit_app, name="audit")``.
Thin adapters over :mod:`sharedcare.audit.retention`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

if TYPE_CHECKING:
    from sharedcare.store.db import Database

audit_app = typer.Typer(help="Audit trail retention: export to NDJSON, then prune.", no_args_is_help=True)
console = Console(stderr=True, soft_wrap=True)  # paths and digests stay whole for copy and paste


def parse_instant(value: str) -> datetime:
    """``2026-01-01``, ``2026-01-01T10:00`` or with an offset (``Z``, ``+01:00``); no offset is UTC."""
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not a date or date-time (e.g. 2026-01-31 or 2026-01-31T18:00Z)") from None
    return ts.replace(tzinfo=UTC) if ts.tzinfo is None else ts


def _database() -> Database:
    from sharedcare.settings import load_settings
    from sharedcare.store.db import Database

    try:
        settings = load_settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        console.print(f"[red]Invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None
    return Database(settings.database, sqlite_synchronous=settings.sqlite_synchronous)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
        console=console,
    )


@audit_app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", help="NDJSON file to write (replaced when complete).")],
    until: Annotated[str, typer.Option(help="Export events before this date/time (exclusive).")],
    since: Annotated[str | None, typer.Option(help="From this date/time (inclusive); default: the oldest.")] = None,
) -> None:
    """Write AuditEvents recorded in [SINCE, UNTIL) to an NDJSON file, oldest first."""
    from sharedcare.audit.retention import count_events, export_ndjson

    start = parse_instant(since) if since else None
    end = parse_instant(until)
    partial = out.with_name(out.name + ".partial")

    async def run() -> int:
        db = _database()
        try:
            total = await count_events(db, start, end)
            with _progress() as progress, partial.open("wb") as fh:
                task = progress.add_task("Exporting AuditEvents", total=total)
                n = await export_ndjson(db, start, end, fh, progress=lambda k: progress.advance(task, k))
                fh.flush()
                os.fsync(fh.fileno())  # a retention copy must be on disk before anyone prunes
            return n
        finally:
            await db.close()

    try:
        written = asyncio.run(run())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    console.print(f"Exported {written:,} AuditEvents to {out}  (sha256 {digest})")


@audit_app.command("prune")
def prune_command(
    before: Annotated[str, typer.Option(help="Delete AuditEvents recorded before this date/time.")],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only count what would be deleted.")] = False,
) -> None:
    """Physically delete AuditEvents older than BEFORE. Export them first."""
    from sharedcare.audit.retention import count_events, prune

    cutoff = parse_instant(before)
    if cutoff > datetime.now(UTC):
        console.print("[red]--before is in the future:[/red] that would delete events being written now.")
        raise typer.Exit(2)

    async def count() -> int:
        db = _database()
        try:
            return await count_events(db, None, cutoff)
        finally:
            await db.close()

    total = asyncio.run(count())
    if dry_run or total == 0:
        console.print(f"{total:,} AuditEvents recorded before {cutoff.isoformat()}" + (" would be pruned." if total else "."))
        return
    if not yes:
        typer.confirm(f"Delete {total:,} AuditEvents recorded before {cutoff.isoformat()}? Export them first", abort=True)

    async def run() -> int:
        db = _database()
        try:
            with _progress() as progress:
                task = progress.add_task("Pruning AuditEvents", total=total)
                return await prune(db, cutoff, progress=lambda k: progress.advance(task, k))
        finally:
            await db.close()

    console.print(f"Pruned {asyncio.run(run()):,} AuditEvents recorded before {cutoff.isoformat()}.")
