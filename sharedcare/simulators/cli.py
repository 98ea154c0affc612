"""``sharedcare simulate``: run the simulators that ship with sharedcare, one command each.

Each command builds its Starlette app and hands it to :func:`serve`, which binds the port
first (so ``--port 0`` works and the printed URL is the real one), prints the base URL as
the only line on stdout, and runs uvicorn until Ctrl-C.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from starlette.types import ASGIApp

if TYPE_CHECKING:
    from sharedcare.simulators.pds import Faults

app = typer.Typer(
    help="Run the simulators that ship with sharedcare (PDS, ...) for demos, tests and benchmarks.",
    no_args_is_help=True,
    add_completion=False,
)
console = Console(stderr=True)

Host = Annotated[str, typer.Option(help="Interface to listen on.")]


@app.callback()
def simulate() -> None:
    """Run the simulators that ship with sharedcare (PDS, ...) for demos, tests and benchmarks."""


def serve(asgi_app: ASGIApp, host: str, port: int, description: str) -> None:
    """Serve ``asgi_app`` with uvicorn on ``host:port`` until Ctrl-C; print its base URL first."""
    import uvicorn

    from sharedcare.simulators.pds import base_url, bind_socket

    try:
        sock = bind_socket(host, port)
    except OSError as exc:
        console.print(f"[red]Cannot listen on {host}:{port}:[/red] {exc}")
        raise typer.Exit(1) from None
    url = base_url(host, sock.getsockname()[1])
    print(url, flush=True)  # stdout carries only the URL, for scripts
    console.print(f"{description}\n  base URL: {url}\n\nCtrl-C stops it.")
    config = uvicorn.Config(
        asgi_app,
        lifespan="off",
        ws="none",
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=2,  # requests hung by a timeout fault must not hold the exit
    )
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises the SIGINT it shut down on; stopping is the user's intent
    finally:
        sock.close()
    console.print("Stopped.")


@app.command()
def pds(
    host: Host = "127.0.0.1",
    port: Annotated[
        int, typer.Option(min=0, max=65535, help="TCP port (0: any free port).")
    ] = 8091,
    people: Annotated[int, typer.Option(min=0, help="Generated people to serve.")] = 1000,
    seed: Annotated[
        int,
        typer.Option(
            help="Seed of the generated people (2026: the people `sharedcare demo` loads)."
        ),
    ] = 2026,
    latency_ms: Annotated[
        float, typer.Option(min=0.0, help="Fixed latency added to each Patient request.")
    ] = 0.0,
    jitter_ms: Annotated[
        float, typer.Option(min=0.0, help="Extra latency, uniform in 0..JITTER.")
    ] = 0.0,
    error_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of requests answered 500/503.")
    ] = 0.0,
    timeout_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of requests that hang for --hang-s.")
    ] = 0.0,
    malformed_rate: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share of requests answered 200 with invalid JSON."),
    ] = 0.0,
    fail_first: Annotated[
        int, typer.Option(min=0, help="Answer 503 to each NHS number's first N requests.")
    ] = 0,
    hang_s: Annotated[float, typer.Option(min=0.0, help="How long a timeout fault hangs.")] = 30.0,
    fault_seed: Annotated[
        int | None, typer.Option(help="Seed for fault draws (unset: different every run).")
    ] = None,
) -> None:
    """A PDS-compatible FHIR endpoint (GET /Patient/{nhs_number}) with configurable faults."""
    from sharedcare.simulators.pds import Faults, create_pds_app

    try:
        faults = Faults(
            latency_ms=latency_ms, jitter_ms=jitter_ms, error_rate=error_rate,
            timeout_rate=timeout_rate, malformed_rate=malformed_rate, fail_first=fail_first,
            hang_s=hang_s, seed=fault_seed,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    pds_app = create_pds_app(people, seed, faults)
    serve(pds_app, host, port, f"PDS simulator: {people} people (seed {seed}); {_describe(faults)}")


def _describe(faults: Faults) -> str:
    from dataclasses import fields

    from sharedcare.simulators.pds import Faults

    defaults = Faults()
    changed = [
        f"{f.name}={getattr(faults, f.name)}"
        for f in fields(Faults)
        if f.name != "seed" and getattr(faults, f.name) != getattr(defaults, f.name)
    ]
    return "faults: " + (", ".join(changed) if changed else "none")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
