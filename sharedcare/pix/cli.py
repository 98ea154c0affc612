"""``sharedcare pix``: load registrations in bulk and review unverified ones (issue 4).

Thin adapters over :class:`sharedcare.pix.index.PatientIndex` and
:func:`sharedcare.pix.bulk.load_lines`, run against the configured database.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from sharedcare.pix.index import PatientIndex
    from sharedcare.registry.service import Registry

pix_app = typer.Typer(
    help="The patient index: bulk load and operator review.", no_args_is_help=True
)
console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)


@asynccontextmanager
async def _index() -> AsyncIterator[tuple[PatientIndex, Registry]]:
    from sharedcare.pix.index import PatientIndex
    from sharedcare.registry.service import Registry
    from sharedcare.settings import load_settings
    from sharedcare.store import migrate
    from sharedcare.store.db import Database
    from sharedcare.store.repository import Store
    from sharedcare.store.service import FhirService

    try:
        settings = load_settings()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        console.print(f"[red]Invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None
    db = Database(settings.database, sqlite_synchronous=settings.sqlite_synchronous)
    try:
        if settings.auto_migrate:
            await migrate.upgrade(db)
        store = Store(db)
        fhir = FhirService(store, fhir_base=settings.fhir_base, default_count=50, max_count=1000)
        yield PatientIndex(db, store), Registry(fhir)
    finally:
        await db.close()


def _run(coro: object) -> object:
    from sharedcare.fhir.errors import FHIRError

    try:
        return asyncio.run(coro)  # type: ignore[arg-type]
    except FHIRError as exc:
        console.print(f"[red]{exc.issues[0].diagnostics if exc.issues else exc}[/red]")
        raise typer.Exit(1) from None


@pix_app.command("load")
def load(
    file: Annotated[
        Path,
        typer.Argument(
            help="NDJSON file: one FHIR Patient registration per line.", exists=True, dir_okay=False
        ),
    ],
    provider: Annotated[
        str, typer.Option(help="Client id of the provider system registering these people.")
    ],
    chunk: Annotated[int, typer.Option(min=1, max=50_000, help="Lines per transaction.")] = 5000,
    pre_verified: Annotated[
        bool,
        typer.Option(
            help="Load as verified without tracing (migrating an index that already traced them)."
        ),
    ] = False,
) -> None:
    """Register the people in FILE for PROVIDER, with the feed's checks; refused lines are reported."""
    from sharedcare.pix.bulk import load_lines

    async def run() -> int:
        async with _index() as (index, registry):
            system = await registry.get(provider)
            if system is None or not system.is_provider:
                console.print(
                    f"[red]{provider} is not a registered provider system (see `sharedcare participants list`).[/red]"
                )
                return 2
            size = file.stat().st_size
            done = [0]

            def lines() -> Iterator[bytes]:
                with file.open("rb") as handle:
                    for line in handle:
                        done[0] += len(line)
                        yield line

            started = time.perf_counter()
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                console=console,
            ) as bar:
                task = bar.add_task(f"loading {file.name}", total=size)
                report = await load_lines(
                    index,
                    system,
                    lines(),
                    chunk=chunk,
                    pre_verified=pre_verified,
                    progress=lambda _n: bar.update(task, completed=done[0]),
                )
                bar.update(task, completed=size)
            seconds = time.perf_counter() - started
            loaded = report.created + report.updated + report.unchanged
            console.print(
                f"{report.lines} lines in {seconds:.1f} s: {report.created} created, {report.updated} updated, "
                f"{report.unchanged} unchanged, {report.failed} refused; {report.people_created} new people; "
                f"{loaded / seconds if seconds else 0:,.0f} registrations/s"
            )
            for number, reason, message in report.errors[:20]:
                console.print(f"  line {number}: [yellow]{reason}[/yellow] {message}")
            if len(report.errors) > 20:
                console.print(f"  ... and {report.failed - 20} more refused lines")
            return 1 if report.failed else 0

    code = _run(run())
    raise typer.Exit(int(code))  # type: ignore[call-overload]


@pix_app.command("review")
def review(
    status: Annotated[
        list[str] | None,
        typer.Option(
            help="Only these statuses (repeat): pending, unverified, mismatch, not_found, error."
        ),
    ] = None,
    provider: Annotated[
        str | None, typer.Option(help="Only this provider's registrations.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 100,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON object per line instead of a table.")
    ] = False,
) -> None:
    """List registrations kept but not routed (not verified), oldest change first, with reasons."""
    from sharedcare.pix.index import REVIEW

    async def run() -> None:
        async with _index() as (index, _registry):
            items = await index.review(statuses=status or REVIEW, provider=provider, limit=limit)
        if as_json:
            for item in items:
                out.print(json.dumps(_item_dict(item)), highlight=False)
            return
        table = Table(
            "status", "provider", "identifier", "NHS number", "person", "updated (UTC)", "reasons"
        )
        for item in items:
            table.add_row(
                item.status,
                item.provider,
                f"{item.system}|{item.value}",
                item.nhs_number or "-",
                item.person_id or "-",
                f"{item.updated:%Y-%m-%d %H:%M:%S}",
                item.reasons or "",
            )
        out.print(table)
        console.print(
            f"{len(items)} registration(s) to review"
            + (" (limit reached)" if len(items) == limit else "")
        )

    _run(run())


def _item_dict(item: object) -> dict[str, object]:
    from dataclasses import asdict

    data = asdict(item)  # type: ignore[call-overload]
    data["updated"] = data["updated"].isoformat()
    return data


@pix_app.command("show")
def show(who: Annotated[str, typer.Argument(help="NHS number or hub Patient id.")]) -> None:
    """Show a person: NHS number, every linkage with status, and merges."""

    async def run() -> None:
        async with _index() as (index, _registry):
            person_id = await index.resolve_person(who)
            person = await index.find(person_id=person_id)
            merges = await index.merges(person_id)
        assert person is not None
        out.print(f"Patient/{person.id}  NHS number {person.nhs_number or '-'}")
        if person.id != person_id:
            out.print(f"(Patient/{person_id} was merged into Patient/{person.id})")
        table = Table("provider", "identifier", "status", "updated (UTC)", "routed")
        for link in person.links:
            table.add_row(
                link.provider,
                f"{link.system}|{link.value}",
                link.status,
                f"{link.updated:%Y-%m-%d %H:%M:%S}",
                "yes" if link in person.routable else "no",
            )
        out.print(table)
        for merge in merges:
            out.print(
                f"merge: Patient/{merge['replaced']} → Patient/{merge['survivor']} at {merge['at']:%Y-%m-%d %H:%M} by {merge['by']}: {merge['reason'] or ''}"
            )

    _run(run())


@pix_app.command("unlink")
def unlink(
    identifier: Annotated[
        str, typer.Argument(help="The registration's local identifier, system|value.")
    ],
    reason: Annotated[str, typer.Option(help="Why (kept in the history).")],
    by: Annotated[str, typer.Option(help="Who is unlinking (operator name).")] = "operator",
) -> None:
    """Detach a registration from its person: kept for history, never routed again."""
    system, bar, value = identifier.partition("|")
    if not bar or not system or not value:
        raise typer.BadParameter("give the identifier as system|value")

    async def run() -> None:
        async with _index() as (index, _registry):
            item = await index.unlink(system, value, by=by, reason=reason)
        console.print(
            f"{identifier} is {item.status} (was linked to Patient/{item.person_id or '-'})"
        )

    _run(run())


@pix_app.command("merge")
def merge(
    replaced: Annotated[
        str, typer.Argument(help="The person to retire: NHS number or hub Patient id.")
    ],
    survivor: Annotated[
        str, typer.Argument(help="The person who remains: NHS number or hub Patient id.")
    ],
    reason: Annotated[str, typer.Option(help="Why (kept with the merge).")],
    by: Annotated[str, typer.Option(help="Who is merging (operator name).")] = "operator",
) -> None:
    """Merge two people (HL7 v2 A40): the replaced person points to the survivor; linkages move."""

    async def run() -> None:
        async with _index() as (index, _registry):
            old = await index.resolve_person(replaced)
            new = await index.resolve_person(survivor)
            moved = await index.merge(old, new, by=by, reason=reason)
        console.print(f"Patient/{old} merged into Patient/{new}; {moved} linkage(s) moved")

    _run(run())


@pix_app.command("unmerge")
def unmerge(
    person: Annotated[
        str, typer.Argument(help="The replaced person: NHS number or hub Patient id.")
    ],
) -> None:
    """Refused, always: explains how to correct a wrong merge instead."""

    async def run() -> None:
        async with _index() as (index, _registry):
            await index.unmerge(await index.resolve_person(person))

    _run(run())
