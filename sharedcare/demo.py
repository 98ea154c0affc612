"""``sharedcare demo``: the whole platform on one machine, with nothing else to set up.

One process runs:

- the hub on the embedded default (SQLite in the data folder), served by uvicorn;
- a PDS simulator holding the generated people of seed 2026 (so every trace verifies);
- three provider simulators (a hospital PAS, a GP system, community services) holding
  overlapping shares of the same people, with realistic latency.

It registers the providers and a consumer in the participant registry, lets each provider
register its people with the patient index through the PIXm feed (as a real provider would),
waits until PDS has verified them, then prints the base URL, the consumer's credential and
commands to try, and writes ``demo.json`` in the data folder for scripts. Ctrl-C stops
everything.

Each start is fresh: a data folder that holds a previous demo (``demo.json``) has its database
replaced, because the simulators listen on new ports each time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from sharedcare.iam.client import generate_key, public_jwks
from sharedcare.settings import Settings

DEMO_CONSUMER = "demo-consumer"
# Every scope a consumer and an auditor can hold: read and search everything, audit included.
DEMO_SCOPES = "system/*.rs system/AuditEvent.rs"
DEMO_SEED = 2026
NHS = "https://fhir.nhs.uk/Id/nhs-number"


@dataclass(frozen=True)
class DemoProvider:
    id: str
    name: str
    organization: str  # ODS code
    share: float
    latency_ms: tuple[float, float]  # lognormal (median, p99)


PROVIDERS = (
    DemoProvider("leeds-pas", "Leeds Teaching Hospitals PAS", "RR8", 0.75, (30.0, 250.0)),
    DemoProvider("gp-b86001", "Example Medical Practice GP system", "B86001", 0.65, (50.0, 400.0)),
    # Occasionally slower than the hub waits: the demo shows what an impaired provider looks like.
    DemoProvider("community-rxf", "Mid Yorkshire community services", "RXF", 0.55, (80.0, 1800.0)),
)


def _fresh_data_dir(data_dir: Path) -> None:
    """Empty the demo's own files from a previous run; refuse a folder that is not a demo's."""
    data_dir.mkdir(parents=True, exist_ok=True)
    database = data_dir / "sharedcare.db"
    if database.exists() and not (data_dir / "demo.json").exists():
        raise SystemExit(
            f"{data_dir} holds a sharedcare database that is not a demo's; "
            "give the demo another folder with --data-dir."
        )
    for name in ("sharedcare.db", "sharedcare.db-wal", "sharedcare.db-shm", "demo.json"):
        with contextlib.suppress(FileNotFoundError):
            (data_dir / name).unlink()
    shutil.rmtree(data_dir / "prometheus", ignore_errors=True)


def _write_secret(path: Path, data: bytes) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def example_commands(
    demo: dict[str, Any], jwk_file: Path, nhs: str, demo_json: Path | None
) -> tuple[str, str]:
    """The token-and-curl command and the ``sharedcare query`` command the demo prints."""
    base = demo["base_url"]
    url = f"{base}/Observation?patient.identifier={NHS}|{nhs}&_count=20"
    curl = (
        f"TOKEN=$(sharedcare token --client-id {DEMO_CONSUMER} --key {jwk_file} --fhir-base {base}) && "
        f"curl -s -H \"Authorization: Bearer $TOKEN\" '{url}'"
    )
    query = f"sharedcare query Observation --nhs-number {nhs}"
    if demo_json is not None:
        query += f" --demo-json {demo_json}"
    return curl, query


def run_demo(settings: Settings, people: int, console: Console, *, default_data_dir: Path) -> None:
    """Run the demo until Ctrl-C (blocking)."""
    from sharedcare.simulators.pds import SimulatorServer, bind_socket, create_pds_app
    from sharedcare.simulators.provider import ProviderConfig, ProviderServer

    data_dir = settings.data_dir.resolve()
    _fresh_data_dir(data_dir)
    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    servers: list[SimulatorServer] = []
    try:
        with console.status("Starting the PDS and provider simulators…"):
            pds = SimulatorServer(create_pds_app(people, DEMO_SEED))
            pds.start()
            servers.append(pds)
            providers: dict[str, ProviderServer] = {}
            for p in PROVIDERS:
                config = ProviderConfig(
                    id=p.id,
                    people=people,
                    seed=DEMO_SEED,
                    share=p.share,
                    latency_ms=p.latency_ms,
                    name=p.name,
                )
                providers[p.id] = ProviderServer(config)
                providers[p.id].start()
                servers.append(providers[p.id])
        hub_settings = Settings(
            **{
                **settings.model_dump(
                    exclude={"port", "data_dir", "pds_base_url", "log_level", "log_json"}
                ),
                "port": port,
                "data_dir": data_dir,
                "pds_base_url": pds.url,
                "log_level": "warning",
                "log_json": False,
            }
        )
        demo_json = None if data_dir == default_data_dir.resolve() else data_dir / "demo.json"
        asyncio.run(_serve(hub_settings, sock, providers, pds.url, console, demo_json))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
        for server in reversed(servers):
            server.stop()
    console.print("Demo stopped.")


async def _serve(
    settings: Settings,
    sock: Any,
    providers: dict[str, Any],
    pds_url: str,
    console: Console,
    demo_json: Path | None,
) -> None:
    import uvicorn

    from sharedcare.app import create_app

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_config=None,
        access_log=False,
        ws="none",
        timeout_graceful_shutdown=3,
        timeout_keep_alive=settings.http_keepalive_seconds,
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if serving.done():
            serving.result()  # raises why the hub did not start
            return
        await asyncio.sleep(0.05)
    setup = asyncio.create_task(_set_up(app, settings, providers, pds_url, console, demo_json))
    done, _ = await asyncio.wait({serving, setup}, return_when=asyncio.FIRST_COMPLETED)
    if setup in done and setup.exception() is not None:
        server.should_exit = True
        await serving
        setup.result()
    if serving in done:
        setup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await setup
    await serving


async def _set_up(
    app: Any,
    settings: Settings,
    providers: dict[str, Any],
    pds_url: str,
    console: Console,
    demo_json: Path | None,
) -> None:
    from sharedcare.registry.model import new_system
    from sharedcare.simulators.provider import provider_people, register_people
    from sharedcare.simulators.registration import SmartToken

    base = settings.fhir_base
    data_dir = settings.data_dir.resolve()
    registry = app.state.iam.registry
    consumer_key = generate_key("RS384", kid=f"{DEMO_CONSUMER}-rs384")
    pem_file = data_dir / f"{DEMO_CONSUMER}.pem"
    jwk_file = data_dir / f"{DEMO_CONSUMER}.private.jwk.json"
    _write_secret(pem_file, consumer_key.as_pem(private=True))  # PKCS#8
    _write_secret(jwk_file, json.dumps(consumer_key.as_dict(private=True)).encode())
    await registry.add(
        new_system(
            client_id=DEMO_CONSUMER, kind="consumer", name="Demo care portal", organization="RR8",
            scopes=DEMO_SCOPES, jwks=public_jwks(consumer_key),
        )
    )  # fmt: skip
    provider_keys = {}
    for p in PROVIDERS:
        server = providers[p.id]
        provider_keys[p.id] = generate_key("ES384", kid=f"{p.id}-es384")
        await registry.add(
            new_system(
                client_id=p.id, kind="provider", name=p.name, organization=p.organization,
                scopes="system/Patient.u system/*.rs", fhir_base=server.base_url,
                identifier_systems=(server.config.identifier_system,), jwks=public_jwks(provider_keys[p.id]),
            )
        )  # fmt: skip
    held: dict[str, list[str]] = {}
    for p in PROVIDERS:
        for person in provider_people(providers[p.id].config):
            held.setdefault(person.nhs_number, []).append(p.id)
    expected = sum(len(v) for v in held.values())
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        registering = progress.add_task(
            "Providers registering their people (PIXm feed)", total=expected
        )

        def advance(task: Any) -> Callable[[int, int], None]:
            last = [0]

            def on(done: int, _total: int) -> None:
                progress.advance(task, done - last[0])
                last[0] = done

            return on

        await asyncio.gather(
            *(
                register_people(
                    providers[p.id].config, base, SmartToken(base, p.id, provider_keys[p.id]),
                    progress=advance(registering),
                )
                for p in PROVIDERS
            )
        )  # fmt: skip
        tracing = progress.add_task("PDS verifying them", total=expected)
        deadline = time.monotonic() + 300
        while True:
            _people, links = await app.state.pix.counts()
            verified = links.get("verified", 0)
            progress.update(tracing, completed=verified)
            if verified >= expected or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.25)
    demo = {
        "base_url": base,
        "token_url": app.state.iam.token_url,
        "consumer": {
            "client_id": DEMO_CONSUMER,
            "kid": consumer_key.kid,
            "alg": "RS384",
            "private_key_file": str(pem_file),
            "scopes": DEMO_SCOPES,
        },
        "providers": [
            {
                "id": p.id,
                "base_url": providers[p.id].base_url,
                "identifier_system": providers[p.id].config.identifier_system,
            }
            for p in PROVIDERS
        ],
        "people": [{"nhs_number": n, "providers": sorted(where)} for n, where in held.items()],
        "pds_base_url": pds_url,
    }
    (data_dir / "demo.json").write_text(json.dumps(demo, indent=2) + "\n", encoding="utf-8")
    everywhere = next(
        (n for n, where in held.items() if len(where) == len(PROVIDERS)), next(iter(held))
    )
    curl, query = example_commands(demo, jwk_file, everywhere, demo_json)
    shared = sum(1 for where in held.values() if len(where) > 1)
    out = Console(soft_wrap=True)  # stdout, one command per line so each can be pasted
    out.print(
        f"\n[bold green]sharedcare demo[/bold green] is running on the embedded default (SQLite).\n"
        f"  FHIR base URL: {base}\n"
        f"  token URL:     {demo['token_url']}\n"
        f"  consumer:      client_id {DEMO_CONSUMER}, key id {consumer_key.kid} (RS384), "
        f"private key {pem_file} (PKCS#8 PEM; JWK: {jwk_file})\n"
        f"  providers:     {', '.join(p.id for p in PROVIDERS)}\n"
        f"  people:        {len(held)} registered, {shared} of them known to two or three providers "
        f"(verified against the PDS simulator at {pds_url})\n"
        f"  for scripts:   {data_dir / 'demo.json'}\n\n"
        f"Get a token and run a federated query (in another terminal):\n"
        f"  {curl}\n\n"
        f"Or see the merged record as a table:\n"
        f"  {query}\n\n"
        f"Ctrl-C stops the demo.\n",
        highlight=False,
    )
