"""``sharedcare participants``: manage the participant registry from the command line.

A thin adapter over :class:`sharedcare.registry.service.Registry` (STYLE §2); it works on
the configured database directly, so run it where ``sharedcare serve`` would run.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

T = TypeVar("T")
participants_app = typer.Typer(help="Participant systems: register, list, suspend, make keys.", no_args_is_help=True)
err = Console(stderr=True)


def _run(action: Callable[[Any], Awaitable[T]]) -> T:
    """Run ``action(registry)`` against the configured database, reporting errors plainly."""
    from sharedcare.fhir.errors import FHIRError
    from sharedcare.registry.model import RegistryError
    from sharedcare.registry.service import Registry
    from sharedcare.settings import load_settings
    from sharedcare.store import migrate
    from sharedcare.store.db import Database
    from sharedcare.store.repository import Store
    from sharedcare.store.service import FhirService

    try:
        settings = load_settings()
    except ValueError as exc:
        err.print(f"[red]Invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None

    async def main() -> T:
        db = Database(settings.database, sqlite_synchronous=settings.sqlite_synchronous)
        try:
            if settings.auto_migrate:
                await migrate.upgrade(db)
            fhir = FhirService(
                Store(db),
                fhir_base=settings.fhir_base,
                default_count=settings.default_page_size,
                max_count=settings.max_page_size,
            )
            return await action(Registry(fhir, cache_seconds=0))
        finally:
            await db.close()

    try:
        return asyncio.run(main())
    except RegistryError as exc:
        err.print(f"[red]Not registered:[/red] {exc}")
        raise typer.Exit(2) from None
    except FHIRError as exc:
        err.print(f"[red]Failed:[/red] {exc.issues[0].diagnostics if exc.issues else exc.status}")
        raise typer.Exit(1) from None


def _describe(system: Any) -> dict[str, Any]:
    return {
        "id": system.client_id,
        "kind": system.kind,
        "name": system.name,
        "organization": system.organization,
        "organization_resource": f"Organization/{system.organization_id}",
        "status": system.status,
        "environment": system.environment,
        "scopes": list(system.scopes),
        "fhir_base": system.fhir_base,
        "identifier_systems": list(system.identifier_systems),
        "messaging_endpoint": system.messaging_endpoint,
        "jwks_url": system.jwks_url,
        "jwks": system.jwks,
    }


@participants_app.command("add")
def add(
    id: Annotated[str, typer.Option("--id", help="The system's id: its OAuth2 client_id.")],
    kind: Annotated[str, typer.Option(help="provider, consumer or both.")],
    name: Annotated[str, typer.Option(help="The system's name (also the organisation's, if new).")],
    scopes: Annotated[str, typer.Option(help='Allowed scopes, e.g. "system/Patient.rs system/*.read".')],
    organization: Annotated[str | None, typer.Option(help="ODS code of the organisation.")] = None,
    fhir_base: Annotated[str | None, typer.Option(help="Base URL of a provider's FHIR API.")] = None,
    identifier_system: Annotated[
        list[str] | None, typer.Option(help="A patient identifier system the provider owns (repeatable).")
    ] = None,
    messaging_endpoint: Annotated[str | None, typer.Option(help="Where messages to it are sent.")] = None,
    jwks_url: Annotated[str | None, typer.Option(help="URL of the system's public JWKS.")] = None,
    jwks_file: Annotated[Path | None, typer.Option(help="File holding the system's public JWKS.")] = None,
    environment: Annotated[str, typer.Option(help="Environment label, e.g. live, test.")] = "live",
) -> None:
    """Register a system (exactly one of --jwks-url and --jwks-file)."""
    from sharedcare.registry.model import RegistryError, new_system

    if bool(jwks_url) == bool(jwks_file):
        err.print("[red]Give exactly one of --jwks-url and --jwks-file.[/red]")
        raise typer.Exit(2)
    jwks = None
    if jwks_file:
        try:
            jwks = json.loads(jwks_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            err.print(f"[red]Cannot read {jwks_file}:[/red] {exc}")
            raise typer.Exit(2) from None
    try:
        system = new_system(
            client_id=id, kind=kind, name=name, scopes=scopes, organization=organization,
            fhir_base=fhir_base, identifier_systems=identifier_system or [],
            messaging_endpoint=messaging_endpoint, jwks_url=jwks_url, jwks=jwks, environment=environment,
        )
    except RegistryError as exc:
        err.print(f"[red]Not registered:[/red] {exc}")
        raise typer.Exit(2) from None
    added = _run(lambda registry: registry.add(system))
    err.print(f"Registered {added.client_id} ({added.kind}) for Organization/{added.organization_id}.")


@participants_app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False) -> None:
    """List every registered system."""
    systems = _run(lambda registry: registry.systems())
    if as_json:
        print(json.dumps([_describe(s) for s in systems], indent=2))
        return
    table = Table("id", "kind", "organisation", "status", "environment", "scopes", title="Participant systems")
    for s in systems:
        table.add_row(s.client_id, s.kind, s.organization or "", s.status, s.environment, " ".join(s.scopes))
    Console().print(table)


@participants_app.command("show")
def show(id: Annotated[str, typer.Argument(help="The system's id.")]) -> None:
    """Show one system as JSON."""
    system = _run(lambda registry: registry.get(id))
    if system is None:
        err.print(f"[red]No system is registered with id {id!r}.[/red]")
        raise typer.Exit(1)
    print(json.dumps(_describe(system), indent=2))


@participants_app.command("suspend")
def suspend(id: Annotated[str, typer.Argument(help="The system's id.")]) -> None:
    """Suspend a system: its tokens stop working within the registry cache time."""
    _run(lambda registry: registry.set_status(id, "suspended"))
    err.print(f"Suspended {id}.")


@participants_app.command("activate")
def activate(id: Annotated[str, typer.Argument(help="The system's id.")]) -> None:
    """Re-activate a suspended system."""
    _run(lambda registry: registry.set_status(id, "active"))
    err.print(f"Activated {id}.")


@participants_app.command("keygen")
def keygen(
    alg: Annotated[str, typer.Option(help="ES384 or RS384.")] = "ES384",
    kid: Annotated[str | None, typer.Option(help="Key id (default: generated).")] = None,
    out: Annotated[Path, typer.Option(help="Folder for the key files.")] = Path("."),
) -> None:
    """Write a key pair for a client system and print the public JWKS to register."""
    from sharedcare.iam.client import generate_key, public_jwks

    if alg not in ("ES384", "RS384"):
        err.print("[red]--alg must be ES384 or RS384.[/red]")
        raise typer.Exit(2)
    key = generate_key(alg, kid)  # type: ignore[arg-type]
    out.mkdir(parents=True, exist_ok=True)
    private = out / f"{key.kid}.private.jwk.json"
    public = out / f"{key.kid}.jwks.json"
    # The private key is readable by its owner only.
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(key.as_dict(private=True), f, indent=2)
    jwks = json.dumps(public_jwks(key), indent=2)
    public.write_text(jwks + "\n", encoding="utf-8")
    err.print(f"Private key: {private} (keep it secret)\nPublic JWKS: {public} (register it with --jwks-file)")
    print(jwks)
