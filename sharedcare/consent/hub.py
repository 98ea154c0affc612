"""How the release gate (issue 5): consent decisions and durable audit for every pathway that releases patient data plugs into the hub app.

:func:`routes` are mounted before the store's generic FHIR routes; :func:`lifespan` runs
inside the app's lifespan after the database, store, IAM and audit writer are on
``app.state`` (``db``, ``store`` via ``app.state.fhir.store``, ``fhir``, ``iam``, ``audit``,
``settings``), in the order pix, consent, query, messaging.

The lifespan puts a :class:`~sharedcare.consent.gate.ReleaseGate` on ``app.state.release``
with the policy of ``SHAREDCARE_CONSENT_POLICY_FILE`` (or the shipped default), watches the
file (SIGHUP, and a poll every ``SHAREDCARE_CONSENT_POLICY_CHECK_SECONDS``), and recounts the
consent records by policy every ``SHAREDCARE_CONSENT_RECORDS_REFRESH_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from sharedcare.consent.gate import ReleaseGate
from sharedcare.consent.policy import PolicySet

log = structlog.get_logger("sharedcare.consent")


def routes() -> list[BaseRoute]:
    return []


async def _refresh_records(gate: ReleaseGate, interval: float) -> None:
    from sharedcare.consent.metrics import refresh_consent_records

    while True:
        try:
            await refresh_consent_records(gate.fhir.store)
        except Exception as exc:  # noqa: BLE001 - a census failure must not stop the hub
            log.warning("consent records census failed", error=repr(exc)[:300])
        if interval <= 0:
            return
        await asyncio.sleep(interval)


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    settings = app.state.settings
    path = settings.consent_policy_file
    # A bad policy file at start is fatal (PolicyError names the file and the rule): the hub
    # must not release anything under a policy nobody wrote.
    policies = PolicySet.load(path) if path is not None else PolicySet.default()
    gate = ReleaseGate(policies, app.state.fhir, app.state.audit, policy_file=path)
    app.state.release = gate
    log.info(
        "consent policy in force",
        version=policies.version,
        source=policies.source.name,
        digest=policies.digest[:12],
    )
    census = asyncio.create_task(
        _refresh_records(gate, settings.consent_records_refresh_seconds),
        name="sharedcare-consent-census",
    )
    try:
        async with gate.watching(settings.consent_policy_check_seconds):
            yield
    finally:
        census.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await census
