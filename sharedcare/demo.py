"""Sample data for ``sharedcare demo`` on the embedded default."""

from __future__ import annotations

from itertools import islice

from rich.console import Console
from rich.progress import Progress

from sharedcare.settings import Settings
from sharedcare.simulators.people import people
from sharedcare.store.db import Database
from sharedcare.store.repository import Store

ORGANISATIONS = [
    ("RR8", "Leeds Teaching Hospitals NHS Trust"),
    ("B86001", "Example Medical Practice"),
    ("RXF", "Mid Yorkshire Teaching NHS Trust"),
]


async def load_sample_data(settings: Settings, count: int, console: Console) -> str:
    """Load organisations and ``count`` people once; later starts keep what is there."""
    db = Database(settings.database, sqlite_synchronous=settings.sqlite_synchronous)
    store = Store(db)
    try:
        existing = await store.count("Patient")
        if existing:
            return f"{existing} people already loaded"
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
        return f"{count} people and {len(orgs)} organisations loaded"
    finally:
        await db.close()
