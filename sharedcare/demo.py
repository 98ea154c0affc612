"""Sample data for ``sharedcare demo`` on the embedded default."""

from __future__ import annotations

import json
import os
from itertools import islice
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

from sharedcare.iam.client import generate_key, public_jwks
from sharedcare.registry.model import new_system
from sharedcare.registry.service import Registry
from sharedcare.settings import Settings
from sharedcare.simulators.people import people
from sharedcare.store.db import Database
from sharedcare.store.repository import Store
from sharedcare.store.service import FhirService

ORGANISATIONS = [
    ("RR8", "Leeds Teaching Hospitals NHS Trust"),
    ("B86001", "Example Medical Practice"),
    ("RXF", "Mid Yorkshire Teaching NHS Trust"),
]


DEMO_CONSUMER = "demo-consumer"
DEMO_SCOPES = "system/*.rs system/*.cud"


async def register_demo_consumer(settings: Settings, store: Store) -> Path:
    """Register the demo's consumer system once, keeping its private key in the data folder."""
    key_file = (settings.data_dir / f"{DEMO_CONSUMER}.private.jwk.json").resolve()
    if key_file.exists():
        return key_file
    key = generate_key("ES384", kid=DEMO_CONSUMER)
    fhir = FhirService(store, fhir_base=settings.fhir_base, default_count=50, max_count=1000)
    system = new_system(
        client_id=DEMO_CONSUMER, kind="consumer", name="Demo consumer", organization="RR8",
        scopes=DEMO_SCOPES, jwks=public_jwks(key),
    )
    await Registry(fhir).add(system)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(key.as_dict(private=True), f)
    return key_file


async def load_sample_data(settings: Settings, count: int, console: Console) -> tuple[str, Path]:
    """Load organisations and ``count`` people once, and register the demo consumer."""
    db = Database(settings.database, sqlite_synchronous=settings.sqlite_synchronous)
    store = Store(db)
    try:
        existing = await store.count("Patient")
        if existing:
            return f"{existing} people already loaded", await register_demo_consumer(settings, store)
        orgs = [
            store.prepare(
                "Organization",
                {
                    "resourceType": "Organization",
                    "identifier": [{"system": "https://fhir.nhs.uk/Id/ods-organization-code", "value": code}],
                    "name": name,
                    "active": True,
                },
            )
            for code, name in ORGANISATIONS
        ]
        await db.write(lambda conn: store.create_many_in(conn, [(o, None) for o in orgs]))
        population = people(count, seed=2026)
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("Loading sample people", total=count)
            while batch := list(islice(population, 100)):
                prepared = [store.prepare("Patient", p) for p in batch]
                await db.write(lambda conn, p=prepared: store.create_many_in(conn, [(x, None) for x in p]))
                progress.advance(task, len(batch))
        key_file = await register_demo_consumer(settings, store)  # after the organisations it joins
        return f"{count} people and {len(orgs)} organisations loaded", key_file
    finally:
        await db.close()
