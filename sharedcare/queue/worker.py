"""The worker loop: claim a batch, run the handler on each item, complete or retry.

A handler is ``async def handle(item) -> None``; raising :class:`Retry` (or any exception)
schedules another attempt with backoff, raising :class:`Permanent` dead-letters at once.
Workers run inside ``sharedcare serve`` on the embedded default and as ``sharedcare
worker`` processes at scale; several may serve one queue (claims never overlap).
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable

import structlog

from sharedcare.queue import store as q
from sharedcare.store.db import Database

log = structlog.get_logger("sharedcare.queue")
Handler = Callable[[q.Item], Awaitable[None]]


class Retry(Exception):
    """A transient failure: try again later."""


class Permanent(Exception):
    """A failure retrying cannot fix: dead-letter the item."""


class Worker:
    """Polls one queue and runs ``handler`` on its items, ``concurrency`` at a time."""

    def __init__(
        self,
        db: Database,
        queue: str,
        handler: Handler,
        *,
        backoff: q.Backoff | None = None,
        concurrency: int = 16,
        batch: int = 50,
        lease: float = 30.0,
        idle_poll: float = 0.2,
        keep_done: float | None = None,
        prune_every: float = 60.0,
    ):
        """``keep_done``: seconds to keep finished items before :func:`q.prune_done` deletes
        them (checked every ``prune_every`` seconds); None keeps them forever."""
        self.db = db
        self.queue = queue
        self.handler = handler
        self.backoff = backoff or q.Backoff()
        self.concurrency = concurrency
        self.batch = batch
        self.lease = lease
        self.idle_poll = idle_poll
        self.keep_done = keep_done
        self.prune_every = prune_every
        self._pruned_at = 0.0
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{queue}"
        self._wake = asyncio.Event()
        self._stopping = False

    def wake(self) -> None:
        """Poll now (called after an in-process enqueue, so latency is not the poll interval)."""
        self._wake.set()

    async def run_once(self) -> int:
        """Claim and process one batch; returns how many items were processed."""
        items = await q.claim(
            self.db, self.queue, limit=self.batch, lease=self.lease, owner=self.owner
        )
        if not items:
            return 0
        semaphore = asyncio.Semaphore(self.concurrency)
        done: list[int] = []

        async def one(item: q.Item) -> None:
            async with semaphore:
                try:
                    await self.handler(item)
                except Permanent as exc:
                    await q.fail(
                        self.db, item, str(exc) or "permanent failure", self.backoff, permanent=True
                    )
                    log.error(
                        "queue item dead-lettered", queue=self.queue, item=item.id, error=str(exc)
                    )
                except Exception as exc:  # noqa: BLE001 - any handler failure is retried
                    state = await q.fail(
                        self.db, item, f"{type(exc).__name__}: {exc}", self.backoff
                    )
                    log.info(
                        "queue item failed",
                        queue=self.queue,
                        item=item.id,
                        state=state,
                        error=str(exc),
                    )
                else:
                    done.append(item.id)

        # Items of one partition must finish in order; claim hands out at most one per
        # partition at a time, so running the batch concurrently keeps that order.
        await asyncio.gather(*(one(item) for item in items))
        await q.complete(self.db, done)
        return len(items)

    async def run(self) -> None:
        """Process until :meth:`stop`; survives database hiccups with a pause."""
        while not self._stopping:
            try:
                processed = await self.run_once()
            except Exception:
                log.exception("queue worker error", queue=self.queue)
                processed = 0
                await asyncio.sleep(1)
            await self._prune()
            if processed == 0:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), self.idle_poll)
                except TimeoutError:
                    pass

    async def _prune(self) -> None:
        now = time.monotonic()
        if self.keep_done is None or now - self._pruned_at < self.prune_every:
            return
        self._pruned_at = now
        try:
            pruned = await q.prune_done(self.db, self.queue, self.keep_done)
        except Exception:
            log.warning("pruning finished queue items failed", queue=self.queue, exc_info=True)
        else:
            if pruned:
                log.info("pruned finished queue items", queue=self.queue, items=pruned)
            if pruned >= q.PRUNE_MOST:  # a backlog of old items: go on at the next poll
                self._pruned_at = 0.0

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
