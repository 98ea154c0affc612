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


# -- provider simulator (issue 6) ----------------------------------------------------------
@app.command()
def provider(
    provider_id: Annotated[
        str, typer.Option("--id", help="Provider id (= its client_id at the hub).")
    ],
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port).")] = 0,
    people: Annotated[
        int, typer.Option(min=0, help="Population size (PDS simulator's people).")
    ] = 300,
    seed: Annotated[
        int, typer.Option(help="Seed of people and records (2026: the demo's).")
    ] = 2026,
    share: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Fraction of the population this provider holds."),
    ] = 0.7,
    identifier_system: Annotated[
        str,
        typer.Option(
            help="Local patient identifier system (default: https://fhir.example.org/{id}/Id/patient)."
        ),
    ] = "",
    latency_ms: Annotated[
        str, typer.Option(help="Latency per read/search: MEDIAN or MEDIAN,P99 (lognormal), ms.")
    ] = "0",
    error_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of requests answered 5xx.")
    ] = 0.0,
    timeout_rate: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Share of requests that hang for --hang-s.")
    ] = 0.0,
    malformed_rate: Annotated[
        float,
        typer.Option(min=0.0, max=1.0, help="Share answered 200 with invalid JSON or non-FHIR."),
    ] = 0.0,
    hang_s: Annotated[float, typer.Option(min=0.0, help="How long a timeout fault hangs.")] = 30.0,
    fault_seed: Annotated[
        int | None, typer.Option(help="Seed for fault draws (unset: derived from --seed and --id).")
    ] = None,
    resources_per_search: Annotated[
        int, typer.Option(min=0, help="Observations per person (a typical search's size).")
    ] = 13,
    resource_bytes: Annotated[
        int, typer.Option(min=0, help="Pad each clinical resource to about this size (0: none).")
    ] = 5000,
    register_with: Annotated[
        str | None,
        typer.Option(help="Hub URL: register the people with its patient index at start."),
    ] = None,
    client_id: Annotated[
        str | None, typer.Option(help="client_id for --register-with (default: --id).")
    ] = None,
    key: Annotated[
        str | None, typer.Option(help="Private key for --register-with: PEM or JWK JSON file.")
    ] = None,
    kid: Annotated[
        str | None, typer.Option(help="kid of a PEM --key (default: its JWK thumbprint).")
    ] = None,
) -> None:
    """A data provider's FHIR R4 API with generated records and configurable faults."""
    from pathlib import Path

    from sharedcare.simulators.provider import ProviderConfig, create_provider_app
    from sharedcare.simulators.registration import load_private_key, register_in_background

    try:
        latency = tuple(float(v) for v in latency_ms.split(","))
        config = ProviderConfig(
            id=provider_id, identifier_system=identifier_system, people=people, seed=seed, share=share,
            latency_ms=(latency[0], latency[-1]) if len(latency) <= 2 else (-1.0, -1.0),
            error_rate=error_rate, timeout_rate=timeout_rate, malformed_rate=malformed_rate,
            hang_s=hang_s, fault_seed=fault_seed, resources_per_search=resources_per_search,
            resource_bytes=resource_bytes,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    provider_app = create_provider_app(config)
    held = len(provider_app.state.provider.data.people)
    if register_with:
        if key is None:
            raise typer.BadParameter("--register-with needs --key (and --client-id unless = --id)")
        try:
            private = load_private_key(Path(key), kid)
        except (OSError, ValueError) as exc:
            raise typer.BadParameter(f"cannot read --key {key}: {exc}") from None
        register_in_background(
            config, register_with, client_id or provider_id, private, console.print
        )
    serve(
        provider_app, host, port,
        f"Provider simulator {provider_id}: {held} of {people} people (seed {seed}), "
        f"identifier system {config.identifier_system}",
    )  # fmt: skip


@app.command()
def recipient(
    host: Host = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="TCP port (0: any free port).")] = 8093,
    latency_ms: Annotated[float, typer.Option(min=0.0, help="Fixed latency added to each message.")] = 0.0,
    jitter_ms: Annotated[float, typer.Option(min=0.0, help="Extra latency, uniform in 0..JITTER.")] = 0.0,
    failure_rate: Annotated[float, typer.Option(min=0.0, max=1.0, help="Share of messages answered 500.")] = 0.0,
    down: Annotated[bool, typer.Option(help="Start down (503 to everything) until PUT /_admin/faults.")] = False,
    outage_every: Annotated[float, typer.Option(min=0.0, help="Scheduled outages: one every this many seconds.")] = 0.0,
    outage_seconds: Annotated[float, typer.Option(min=0.0, help="Length of each scheduled outage.")] = 0.0,
    hub: Annotated[str | None, typer.Option(help="Hub base URL to send acknowledgements to.")] = None,
    client_id: Annotated[str | None, typer.Option(help="This recipient's client id at the hub (for acks).")] = None,
    key: Annotated[str | None, typer.Option(help="Its private JWK file (for acks).")] = None,
    ack_code: Annotated[str, typer.Option(help="Response code sent: ok, transient-error or fatal-error.")] = "ok",
    fault_seed: Annotated[int | None, typer.Option(help="Seed for failure draws.")] = None,
) -> None:
    """A messaging endpoint (POST /messages) with latency, failures and outages; acks via the hub."""
    import json
    from pathlib import Path

    from sharedcare.simulators.recipient import AckConfig, RecipientFaults, create_recipient_app

    try:
        faults = RecipientFaults(
            latency_ms=latency_ms, jitter_ms=jitter_ms, failure_rate=failure_rate, down=down,
            outage_every=outage_every, outage_seconds=outage_seconds, seed=fault_seed,
        )  # fmt: skip
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    ack = None
    if hub or client_id or key:
        if not (hub and client_id and key):
            raise typer.BadParameter("acknowledgements need --hub, --client-id and --key together")
        from joserfc.jwk import import_key

        private = import_key(json.loads(Path(key).read_text(encoding="utf-8")))
        ack = AckConfig(hub=hub.rstrip("/"), client_id=client_id, key=private, code=ack_code)
    what = f"acks to {hub} as {client_id}" if ack else "no acks"
    serve(create_recipient_app(faults, ack), host, port, f"Recipient simulator (POST /messages); {what}")


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
