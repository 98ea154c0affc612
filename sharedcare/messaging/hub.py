"""How reliable messaging (issue 7): $process-message, delivery workers, mailboxes plugs into the hub app.

:func:`routes` are mounted before the store's generic FHIR routes; :func:`lifespan` runs
inside the app's lifespan after the database, store, IAM and audit writer are on
``app.state`` (``db``, ``store`` via ``app.state.fhir.store``, ``fhir``, ``iam``, ``audit``,
``settings``), in the order pix, consent, query, messaging.

With ``messaging_workers`` on (the default) each hub process runs a push :class:`Dispatcher`
and the housekeeping loop (mailbox expiry, queue-size gauges); with it off, run them as
``sharedcare messages worker`` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from starlette.applications import Starlette
from starlette.routing import BaseRoute

from sharedcare.messaging.metrics import messaging_metrics
from sharedcare.messaging.routes import messaging_routes
from sharedcare.messaging.service import PUSH_QUEUE, Messaging
from sharedcare.queue import store as queue
from sharedcare.settings import Settings

log = structlog.get_logger("sharedcare.messaging")


def routes() -> list[BaseRoute]:
    return messaging_routes()


def build(settings: Settings, db: Any, registry: Any) -> Messaging:
    return Messaging(
        db,
        registry,
        hub_base=settings.fhir_base,
        expiry_seconds=settings.messaging_expiry_seconds,
        max_message_bytes=settings.messaging_max_message_bytes,
    )


def dispatcher(settings: Settings, messaging: Messaging, keys: Any, audit: Any) -> Any:
    from sharedcare.messaging.delivery import Dispatcher

    return Dispatcher(
        messaging,
        keys=keys,
        issuer=settings.public_base_url,
        audit=audit,
        concurrency=settings.messaging_concurrency,
        per_recipient=settings.messaging_per_recipient_concurrency,
        timeout=settings.messaging_delivery_timeout_seconds,
        backoff=queue.Backoff(
            base=settings.messaging_retry_base_seconds,
            cap=settings.messaging_retry_cap_seconds,
            max_attempts=1_000_000,  # expiry, not a count, ends the retries
        ),
    )


HOT_TABLES = ("queue_items", "messages")  # rows that change state several times a second


async def housekeeping(
    messaging: Messaging, every: float = 10.0, keep_done: float | None = None
) -> None:
    """Expire uncollected mailbox messages, refresh the queue-size gauges, delete finished
    pushes older than ``keep_done`` seconds (once a minute) and keep the hot tables vacuumed
    (:meth:`Database.vacuum_hot`), forever."""
    known: set[str] = set()
    prune_at = 0.0
    gauge = messaging_metrics().queue_size
    while True:
        try:
            while await messaging.expire_mailboxes() >= 500:
                pass
            sizes = await messaging.queue_sizes()
            for recipient in known - sizes.keys():
                gauge.labels(recipient=recipient).set(0)
            for recipient, size in sizes.items():
                gauge.labels(recipient=recipient).set(size)
            known |= sizes.keys()
        except Exception:
            log.exception("messaging housekeeping failed")
        try:  # on its own: a failed prune must not stop mailbox expiry, nor the reverse
            if keep_done is not None and time.monotonic() >= prune_at:
                prune_at = time.monotonic() + 60.0
                pruned = await queue.prune_done(messaging.db, PUSH_QUEUE, keep_done)
                if pruned:
                    log.info("pruned finished queue items", queue=PUSH_QUEUE, items=pruned)
                if pruned >= queue.PRUNE_MOST:  # a backlog of old pushes: go on next round
                    prune_at = 0.0
        except Exception:
            log.exception("pruning finished message pushes failed")
        try:  # on its own: a failed VACUUM must not stop mailbox expiry, nor the reverse
            vacuumed = await messaging.db.vacuum_hot(HOT_TABLES)
            if vacuumed:
                log.info("vacuumed hot tables", tables=vacuumed)
        except Exception:
            log.exception("vacuuming the messaging tables failed")
        await asyncio.sleep(min(every, max(0.2, messaging.expiry_seconds / 10)))


@asynccontextmanager
async def run_workers(
    settings: Settings, messaging: Messaging, keys: Any, audit: Any
) -> AsyncIterator[Any]:
    """Run a dispatcher and the housekeeping loop until the block ends."""
    worker = dispatcher(settings, messaging, keys, audit)
    messaging.on_enqueue = worker.wake
    tasks = [
        asyncio.create_task(worker.run(), name="messaging-dispatcher"),
        asyncio.create_task(
            housekeeping(
                messaging, keep_done=queue.keep_done_seconds(settings.queue_keep_done_hours)
            ),
            name="messaging-housekeeping",
        ),
    ]
    try:
        yield worker
    finally:
        worker.stop()
        tasks[1].cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await tasks[1]
        await tasks[0]


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    messaging = build(settings, app.state.db, app.state.iam.registry)
    app.state.messaging = messaging
    try:
        if not settings.messaging_workers:
            yield
            return
        async with run_workers(settings, messaging, app.state.iam.keys, app.state.audit):
            yield
    finally:
        await messaging.close()
