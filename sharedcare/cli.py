"""The ``sharedcare`` command: serve, db, demo, participants (thin adapters over the capabilities)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sharedcare import __version__
from sharedcare.audit.cli import audit_app
from sharedcare.messaging.cli import messages_app
from sharedcare.pix.cli import pix_app
from sharedcare.query.cli import query as query_command
from sharedcare.registry.cli import participants_app
from sharedcare.settings import Settings, load_settings
from sharedcare.simulators.cli import app as simulate_app
from sharedcare.simulators.loadtest import loadtest_app

app = typer.Typer(
    help="sharedcare: a regional health and care record-sharing hub.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Database migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(participants_app, name="participants")
app.add_typer(audit_app, name="audit")
app.add_typer(pix_app, name="pix")
app.add_typer(messages_app, name="messages")
app.add_typer(loadtest_app, name="loadtest")
app.add_typer(simulate_app, name="simulate", help="Run the simulators (PDS, ...).")
app.command("query")(query_command)
console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"sharedcare {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    """sharedcare: a regional health and care record-sharing hub."""


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**overrides)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        console.print(f"[red]Invalid settings:[/red] {exc}")
        raise typer.Exit(2) from None


async def _upgrade(settings: Settings) -> tuple[str | None, str | None]:
    from sharedcare.store import migrate
    from sharedcare.store.db import Database

    db = Database(settings.database, sqlite_synchronous=settings.sqlite_synchronous)
    try:
        return await migrate.upgrade(db)
    finally:
        await db.close()


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply every pending migration (safe to run again)."""
    settings = _settings()
    with console.status("Applying database migrations…"):
        before, after = asyncio.run(_upgrade(settings))
    if before == after:
        console.print(f"Database already at revision {after}.")
    else:
        console.print(f"Database migrated from {before or 'empty'} to {after}.")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, or 'base'.")]) -> None:
    """Roll migrations back to REVISION."""
    from sharedcare.store import migrate
    from sharedcare.store.db import Database

    settings = _settings()

    async def run() -> tuple[str | None, str | None]:
        db = Database(settings.database)
        try:
            return await migrate.downgrade(db, revision)
        finally:
            await db.close()

    with console.status(f"Rolling back to {revision}…"):
        before, after = asyncio.run(run())
    console.print(f"Database moved from {before} to {after or 'base'}.")


@db_app.command("current")
def db_current() -> None:
    """Show the database's revision and the latest one this release knows."""
    from sharedcare.store import migrate
    from sharedcare.store.db import Database

    settings = _settings()

    async def run() -> str | None:
        db = Database(settings.database)
        try:
            return await migrate.current_revision(db)
        finally:
            await db.close()

    current = asyncio.run(run())
    head = migrate.head_revision()
    state = "current" if current == head else "pending upgrade"
    print(f"database: {current or 'empty'}  latest: {head}  ({state})")


def run_server(settings: Settings) -> None:
    """Migrate once, then run uvicorn with the configured workers.

    Several workers each get their own SO_REUSEPORT listening socket on Linux, so the
    kernel spreads connections evenly over them (see ``sharedcare.serving``).
    """
    from sharedcare import serving
    from sharedcare.logs import configure_logging
    from sharedcare.metrics.registry import setup_multiprocess_dir

    configure_logging(settings.log_level, json=settings.log_json)
    if settings.auto_migrate:
        asyncio.run(_upgrade(settings))
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Worker processes rebuild settings from the environment; pass what the flags decided,
    # and let only this parent migrate (concurrent migrations would race).
    env = {
        "SHAREDCARE_HOST": settings.host,
        "SHAREDCARE_PORT": str(settings.port),
        "SHAREDCARE_DATA_DIR": str(settings.data_dir),
        "SHAREDCARE_AUTO_MIGRATE": "false",
    }
    if settings.base_url:
        env["SHAREDCARE_BASE_URL"] = settings.base_url
    os.environ.update(env)
    if settings.workers > 1:
        setup_multiprocess_dir(settings.data_dir / "prometheus")
    serving.run(
        "sharedcare.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        log_config=None,
        access_log=False,
        lifespan="on",
        timeout_keep_alive=settings.http_keepalive_seconds,
    )


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes.")] = None,
) -> None:
    """Run the hub's HTTP API (FHIR, health, metrics)."""
    run_server(_settings(host=host, port=port, workers=workers))


@app.command()
def demo(
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port for the hub (0: any free port).")] = 8080,
    data_dir: Annotated[Path, typer.Option(help="Folder for the demo's database, keys and demo.json.")] = Path(
        "sharedcare-demo"
    ),
    people: Annotated[int, typer.Option(min=10, max=5000, help="People the PDS and provider simulators hold.")] = 300,
) -> None:
    """Start the hub, a PDS simulator and three provider simulators, register everything, print how to query."""
    from sharedcare.demo import run_demo

    settings = _settings(port=port, data_dir=data_dir)
    try:
        run_demo(settings, people, console, default_data_dir=Path("sharedcare-demo"))
    except OSError as exc:
        console.print(f"[red]The demo could not start:[/red] {exc}")
        raise typer.Exit(1) from None


DEMO_USER = '{"requesting_user":{"id":"C123456","name":"Dr Ann Example","role":"R8000"},"requesting_organization":"RR8","reason_for_access":"TREAT"}'


@app.command()
def token(
    client_id: Annotated[str, typer.Option(help="Your system's client_id.")],
    key: Annotated[Path, typer.Option(help="Your private JWK file (from `participants keygen`).")],
    scope: Annotated[str, typer.Option(help="Scopes to ask for.")] = "system/*.rs",
    fhir_base: Annotated[str, typer.Option(help="The hub's FHIR base URL.")] = "http://127.0.0.1:8080/fhir",
    end_user: Annotated[str, typer.Option(help="End-user claims as JSON.")] = DEMO_USER,
) -> None:
    """Get an access token (SMART Backend Services) and print it, for scripts and curl."""
    import json

    import httpx
    from joserfc.jwk import import_key

    from sharedcare.iam.client import sign_assertion, token_form

    try:
        config = httpx.get(f"{fhir_base}/.well-known/smart-configuration", timeout=10).json()
        private = import_key(json.loads(key.read_text(encoding="utf-8")))
        assertion = sign_assertion(private, client_id, config["token_endpoint"], end_user=json.loads(end_user))  # type: ignore[arg-type]
        response = httpx.post(config["token_endpoint"], data=token_form(assertion, scope), timeout=10)
    except (OSError, ValueError, KeyError, httpx.HTTPError) as exc:
        console.print(f"[red]Could not get a token:[/red] {exc}")
        raise typer.Exit(1) from None
    if response.status_code != 200:
        console.print(f"[red]Token refused ({response.status_code}):[/red] {response.text}")
        raise typer.Exit(1)
    print(response.json()["access_token"])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
