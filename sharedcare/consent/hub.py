"""How the release gate (issue 5): consent decisions and durable audit for every pathway that releases patient data plugs into the hub app.

:func:`routes` are mounted before the store's generic FHIR routes; :func:`lifespan` runs
inside the app's lifespan after the database, store, IAM and audit writer are on
``app.state`` (``db``, ``store`` via ``app.state.fhir.store``, ``fhir``, ``iam``, ``audit``,
``settings``), in the order pix, consent, query, messaging.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import BaseRoute


def routes() -> list[BaseRoute]:
    return []


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    yield
