"""``sharedcare messages``: list, inspect and re-drive dead-lettered messages (issue 7)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

messages_app = typer.Typer(
    help="Reliable messaging: dead letters and message state.", no_args_is_help=True
)
console = Console(stderr=True)
T = TypeVar("T")
STATES = ("queued", "delivered", "acknowledged", "dead")


def _run(fn: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``fn(messaging)`` against the configured database."""
    from sharedcare.cli import _settings
    from sharedcare.messaging.hub import build
    from sharedcare.registry.service import Registry
    from sharedcare.store.db import Database
    from sharedcare.store.repository import Store
    from sharedcare.store.service import FhirService

    settings = _settings()

    async def main() -> T:
        db = Database(settings.database, sqlite_synchronous=settings.sqlite_synchronous)
        try:
            fhir = FhirService(
                Store(db), fhir_base=settings.fhir_base, default_count=50, max_count=1000
            )
            return await fn(build(settings, db, Registry(fhir)))
        finally:
            await db.close()

    return asyncio.run(main())


@messages_app.command("list")
def list_messages(
    state: Annotated[
        str, typer.Option(help=f"Which messages: {', '.join(STATES)} or all.")
    ] = "dead",
    limit: Annotated[int, typer.Option(min=1, help="Most messages shown, newest first.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table.")] = False,
) -> None:
    """List messages (dead letters by default), newest first."""
    if state not in (*STATES, "all"):
        raise typer.BadParameter(f"state must be one of {', '.join(STATES)} or all")
    rows = _run(lambda m: m.list(None if state == "all" else state, limit))
    if as_json:
        for row in rows:
            print(json.dumps(row, default=str))
        return
    table = Table(
        "id", "sender", "recipient", "bundle id", "state", "attempts", "accepted", "last error"
    )
    for r in rows:
        table.add_row(
            str(r["id"]),
            r["sender"],
            r["recipient"],
            r["bundle_id"],
            r["state"],
            str(r["attempts"]),
            str(r["accepted_at"])[:19],
            (r["last_error"] or "")[:60],
        )
    Console().print(table)
    console.print(f"{len(rows)} message(s).")


@messages_app.command("show")
def show(
    message_id: Annotated[int, typer.Argument(help="The hub's message id (from list).")],
) -> None:
    """Show one message: its state, attempts, last error and the Bundle as received."""
    row = _run(lambda m: m.show(message_id))
    if row is None:
        console.print(f"[red]No message {message_id}.[/red]")
        raise typer.Exit(1)
    print(json.dumps(row, default=str, indent=2))


@messages_app.command("redrive")
def redrive(
    message_id: Annotated[int, typer.Argument(help="A dead-lettered message's id.")],
) -> None:
    """Put a dead-lettered message back for delivery now (a fresh expiry window)."""
    if not _run(lambda m: m.redrive(message_id)):
        console.print(
            f"[red]Message {message_id} is not dead-lettered (see `sharedcare messages show`).[/red]"
        )
        raise typer.Exit(1)
    console.print(f"Message {message_id} is queued for delivery again.")


@messages_app.command("worker")
def worker() -> None:
    """Run push delivery outside the API processes (with SHAREDCARE_MESSAGING_WORKERS=false)."""
    import signal

    from sharedcare.audit import AuditWriter
    from sharedcare.cli import _settings
    from sharedcare.iam.hubkeys import HubKeys
    from sharedcare.logs import configure_logging
    from sharedcare.messaging.hub import build, run_workers
    from sharedcare.registry.service import Registry
    from sharedcare.store.db import Database
    from sharedcare.store.repository import Store
    from sharedcare.store.service import FhirService

    settings = _settings()
    configure_logging(settings.log_level, json=settings.log_json)

    async def main() -> None:
        db = Database(
            settings.database,
            pool_size=settings.db_pool_size,
            sqlite_synchronous=settings.sqlite_synchronous,
        )
        store = Store(db)
        fhir = FhirService(store, fhir_base=settings.fhir_base, default_count=50, max_count=1000)
        keys = HubKeys(
            db,
            alg=settings.hub_key_alg,
            rotation_seconds=int(settings.hub_key_rotation_hours * 3600),
            token_lifetime=settings.token_lifetime_seconds,
        )
        audit = AuditWriter(db, hub_base=settings.fhir_base)
        await audit.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        messaging = build(
            settings, db, Registry(fhir, cache_seconds=settings.registry_cache_seconds)
        )
        try:
            async with run_workers(settings, messaging, keys, audit):
                console.print("Messaging delivery worker running; Ctrl-C stops it.")
                await stop.wait()
        finally:
            await audit.stop()
            await db.close()

    asyncio.run(main())
