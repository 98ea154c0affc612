"""Push delivery: POST each message to its recipient's registered messaging endpoint.

A pipeline, not a batch loop: the dispatcher claims items from the durable queue whenever
it has free delivery slots, each delivery runs on its own, and finished deliveries are
committed in small groups (message ``delivered`` + queue item done in one transaction). So
one slow or dead recipient holds at most its own slots:

- at most ``per_recipient`` deliveries to one recipient run at once, and as many more wait
  for them; an item beyond that goes back to the queue untried (``queue.release``) for a
  moment;
- after a failed attempt the recipient's circuit opens for the retry delay: its other
  items claimed meanwhile go back untried, so a dead recipient costs one attempt per
  delay, not one per message.

``2xx`` is delivered. ``408``, ``429``, ``5xx``, timeouts and connection failures are
retried with exponential backoff and full jitter. Any other ``4xx`` means the recipient
refuses the message: it is dead-lettered at once. A message still undelivered after
``messaging_expiry_seconds`` is dead-lettered and its sender gets a ``fatal-error``.

Authentication to recipients: each POST carries ``Authorization: Bearer <JWT>`` signed with
the hub's current token-signing key (``/oauth2/jwks``), claims ``iss`` = the hub's base URL,
``sub`` = ``sharedcare.hub``, ``aud`` = the recipient's messaging endpoint, ``exp`` 5 minutes,
``jti``. Recipients verify it against the hub's JWKS (plus TLS on the endpoint).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections import defaultdict
from datetime import timedelta
from typing import Any

import aiohttp
import orjson
import structlog
from joserfc import jwt
from sqlalchemy import bindparam, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.audit import AuditRecord, AuditWriter
from sharedcare.audit.insert import insert_rows
from sharedcare.iam.hubkeys import HubKeys
from sharedcare.messaging.metrics import messaging_metrics
from sharedcare.messaging.model import HUB_SENDER, parse_message
from sharedcare.messaging.schema import messages
from sharedcare.messaging.service import PUSH_QUEUE, QUEUED, Messaging
from sharedcare.queue import store as queue
from sharedcare.queue.schema import queue_items
from sharedcare.store.repository import now_utc

log = structlog.get_logger("sharedcare.messaging")
TOKEN_SECONDS = 300


class _Retry(Exception):
    """A failed attempt worth repeating."""


class _Refused(Exception):
    """The recipient refused the message (4xx): retrying cannot help."""


class Dispatcher:
    """Delivers the push queue from one hub process; several processes may run one each."""

    def __init__(
        self,
        messaging: Messaging,
        *,
        keys: HubKeys,
        issuer: str,
        audit: AuditWriter | None,
        concurrency: int = 128,
        per_recipient: int = 16,
        timeout: float = 10.0,
        backoff: queue.Backoff | None = None,
        lease: float | None = None,
        idle_poll: float = 0.5,  # how late another process's work (a redrive) is found
    ):
        self.messaging = messaging
        self.db = messaging.db
        self.keys = keys
        self.issuer = issuer
        self.audit = audit
        self.concurrency = concurrency
        self.per_recipient = per_recipient
        self.timeout = timeout
        self.backoff = backoff or queue.Backoff(base=1.0, cap=300.0, max_attempts=1_000_000)
        self.lease = (
            lease if lease is not None else timeout * 3 + 5
        )  # a dead worker's items come back after this
        self.idle_poll = idle_poll
        self.owner = f"{socket.gethostname()}:{os.getpid()}:messaging"
        self._wake = asyncio.Event()
        self._slot = asyncio.Event()
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._busy: defaultdict[str, int] = defaultdict(int)  # running or waiting for the gate
        self._gates: dict[str, asyncio.Semaphore] = {}
        self._circuit: dict[str, float] = {}  # recipient → monotonic time its circuit closes
        self._tokens: dict[str, tuple[float, str]] = {}
        self._done: list[tuple[queue.Item, Any, AuditRecord | None]] = []
        self._skipped: list[int] = []  # items whose message needs no delivery any more
        self._flushed = asyncio.Event()
        self._has_work = asyncio.Event()  # something to commit (the flush loop sleeps without)
        self._session: aiohttp.ClientSession | None = None

    def wake(self) -> None:
        self._wake.set()

    # -- the loop -----------------------------------------------------------------------------
    async def run(self) -> None:
        # No per-host cap: several recipients may share a host; per-recipient caps are ours.
        connector = aiohttp.TCPConnector(limit=self.concurrency, limit_per_host=0, ttl_dns_cache=60)
        timeout = aiohttp.ClientTimeout(total=self.timeout, connect=min(self.timeout, 3.0))
        self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)
        flusher = asyncio.create_task(self._flush_loop(), name="messaging-flush")
        try:
            while not self._stopping:
                free = self.concurrency - len(self._tasks)
                if free <= 0:
                    self._slot.clear()
                    await self._slot.wait()
                    continue
                # Cleared before claiming: a wake-up that arrives while we claim (an accept,
                # a commit that readied a partition's next message) is not lost.
                self._wake.clear()
                try:
                    items = await queue.claim(
                        self.db,
                        PUSH_QUEUE,
                        limit=min(free, 100),
                        lease=self.lease,
                        owner=self.owner,
                    )
                except Exception:
                    log.exception("messaging claim failed")
                    await asyncio.sleep(1)
                    continue
                try:
                    rows, systems = await self._load(items)
                except Exception:
                    log.exception("messaging load failed")  # the leases bring the items back
                    await asyncio.sleep(1)
                    continue
                for item in items:
                    row = rows.get(int(item.payload["m"]))
                    system = systems.get(row.recipient) if row is not None else None
                    task = asyncio.create_task(self._one(item, row, system))
                    self._tasks.add(task)
                    task.add_done_callback(self._finished)
                if len(items) < min(free, 100):
                    try:
                        await asyncio.wait_for(self._wake.wait(), self.idle_poll)
                    except TimeoutError:
                        pass
                    await asyncio.sleep(0.005)  # let a burst of accepts gather into one claim
        finally:
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=self.timeout + 1)
            self._stopping = True
            self._has_work.set()
            await flusher
            await self._session.close()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slot.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._slot.set()

    # -- one delivery -------------------------------------------------------------------------
    async def _load(self, items: list[queue.Item]) -> tuple[dict[int, Any], dict[str, Any]]:
        """The claimed items' messages (one query) and their recipients (one lookup each)."""
        if not items:
            return {}, {}
        m = messages.c
        ids = [int(item.payload["m"]) for item in items]
        columns = (
            m.id, m.sender, m.recipient, m.state, m.body, m.accepted_at, m.header_id, m.event,
            m.responds_to, m.patient_data, m.bundle_id, m.mode,
        )  # fmt: skip
        async with self.db.read() as conn:
            rows = {
                r.id: r for r in (await conn.execute(select(*columns).where(m.id.in_(ids)))).all()
            }
        systems = {}
        for recipient in {r.recipient for r in rows.values()}:
            systems[recipient] = await self.messaging.registry.lookup(recipient)
        return rows, systems

    async def _one(self, item: queue.Item, row: Any, system: Any) -> None:
        try:
            await self._deliver(item, row, system)
        except Exception:
            log.exception("messaging delivery error", item=item.id)

    async def _deliver(self, item: queue.Item, row: Any, system: Any) -> None:
        if row is None or row.state != QUEUED or row.mode != "push":
            # Acknowledged, delivered by an earlier item, redriven elsewhere or moved: never again.
            self._skipped.append(item.id)
            self._has_work.set()
            return
        mid = row.id
        now = now_utc()
        age = (now - row.accepted_at).total_seconds()
        if age >= self.messaging.expiry_seconds:
            await self._dead(item, row, f"not delivered within {self.messaging.expiry_seconds:g} s")
            return
        if system is None or not system.active:
            await queue.fail(
                self.db, item, "the recipient is suspended or no longer registered", self.backoff
            )
            return
        if not system.messaging_endpoint:  # the recipient now collects from its mailbox
            await self.db.write(lambda conn: self._to_mailbox(conn, item, mid))
            return
        recipient = row.recipient
        closes = self._circuit.get(recipient, 0.0)
        if closes > time.monotonic():
            await queue.release(self.db, item, closes - time.monotonic() + 0.01)
            return
        if self._busy[recipient] >= 2 * self.per_recipient:
            # Enough of this recipient's items are running or waiting here: leave the rest
            # to the queue, so a slow recipient cannot fill every slot.
            await queue.release(self.db, item, 0.1)
            return
        self._busy[recipient] += 1
        try:
            async with self._gate(recipient):
                if item.attempts == 1:
                    messaging_metrics().internal_latency.observe(
                        (now_utc() - row.accepted_at).total_seconds()
                    )
                await self._post(system.messaging_endpoint, row.body)
        except _Refused as exc:
            messaging_metrics().attempts.labels(recipient=recipient, outcome="refused").inc()
            await self._dead(item, row, str(exc))
            return
        except _Retry as exc:
            messaging_metrics().attempts.labels(recipient=recipient, outcome="failed").inc()
            delay = self.backoff.delay(item.attempts)
            if age + delay >= self.messaging.expiry_seconds:
                await self._dead(
                    item,
                    row,
                    f"not delivered within {self.messaging.expiry_seconds:g} s; last: {exc}",
                )
                return
            self._circuit[recipient] = time.monotonic() + min(delay, 30.0)
            await self._retry(item, str(exc), delay)
            return
        finally:
            self._busy[recipient] -= 1
        messaging_metrics().attempts.labels(recipient=recipient, outcome="delivered").inc()
        self._circuit.pop(recipient, None)
        audit = self._audit_record(row, system.messaging_endpoint) if row.patient_data else None
        self._done.append((item, row, audit))
        self._has_work.set()
        if len(self._done) >= 50:
            self._flushed.set()

    def _gate(self, recipient: str) -> asyncio.Semaphore:
        gate = self._gates.get(recipient)
        if gate is None:
            gate = self._gates[recipient] = asyncio.Semaphore(self.per_recipient)
        return gate

    async def _post(self, url: str, body: bytes) -> None:
        assert self._session is not None
        headers = {
            "Content-Type": "application/fhir+json",
            "Accept": "application/fhir+json",
            "Authorization": f"Bearer {await self._token(url)}",
        }
        try:
            async with self._session.post(url, data=body, headers=headers) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise _Retry(f"{type(exc).__name__}: {exc}"[:500]) from None
        if 200 <= status < 300:
            return
        if status in (408, 429) or status >= 500:
            raise _Retry(f"HTTP {status} from {url}")
        raise _Refused(f"the recipient refused the message: HTTP {status} from {url}")

    async def _token(self, audience: str) -> str:
        cached = self._tokens.get(audience)
        now = time.time()
        if cached is not None and cached[0] > now + 60:
            return cached[1]
        key = await self.keys.signing_key()
        claims = {
            "iss": self.issuer,
            "sub": HUB_SENDER,
            "aud": audience,
            "iat": int(now),
            "exp": int(now) + TOKEN_SECONDS,
            "jti": secrets.token_urlsafe(16),
        }
        token = jwt.encode(
            {"alg": key.alg, "kid": key.kid, "typ": "JWT"}, claims, key, algorithms=[str(key.alg)]
        )
        self._tokens[audience] = (now + TOKEN_SECONDS, token)
        return token

    def _audit_record(self, row: Any, endpoint: str) -> AuditRecord | None:
        """The AuditEvent of one release, written with the delivery (see ``_commit``)."""
        if self.audit is None:
            return None
        try:
            nhs = parse_message(orjson.loads(row.body)).nhs_number
        except Exception:  # noqa: BLE001 - the message was checked on the way in
            nhs = None
        return AuditRecord(
            action="operation",
            request_id=f"message-{row.id}",
            client_id=row.recipient,
            query=f"POST {endpoint} message {row.bundle_id} from {row.sender} event {row.event}"[
                :1000
            ],
            nhs_number=nhs,
            providers=(row.sender,) if row.sender != HUB_SENDER else (),
            released=1,
        )

    # -- outcomes -----------------------------------------------------------------------------
    async def _retry(self, item: queue.Item, error: str, delay: float) -> None:
        now = now_utc()

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(
                update(queue_items)
                .where(queue_items.c.id == item.id)
                .values(
                    state=queue.READY,
                    available_at=now + timedelta(seconds=delay),
                    leased_until=None,
                    last_error=error[:2000],
                    updated_at=now,
                )
            )
            await conn.execute(
                update(messages)
                .where(messages.c.id == item.payload["m"])
                .values(attempts=messages.c.attempts + 1, last_error=error[:2000])
            )

        await self.db.write(work)
        # Claim it again when it comes due rather than at the next idle poll.
        asyncio.get_running_loop().call_later(delay + 0.001, self.wake)

    async def _dead(self, item: queue.Item, row: Any, reason: str) -> None:
        sender = (
            await self.messaging.registry.lookup(row.sender) if row.sender != HUB_SENDER else None
        )

        async def work(conn: AsyncConnection) -> None:
            await self.messaging.dead_letter_in(conn, row, reason, sender)
            await queue.complete_in(conn, [item.id])

        await self.db.write(work)
        messaging_metrics().delivery_attempts.observe(item.attempts)
        log.warning("message dead-lettered", message=row.id, recipient=row.recipient, reason=reason)
        self.messaging.on_enqueue()

    async def _to_mailbox(self, conn: AsyncConnection, item: queue.Item, mid: int) -> None:
        await conn.execute(update(messages).where(messages.c.id == mid).values(mode="pull"))
        await queue.complete_in(conn, [item.id])

    async def _flush_loop(self) -> None:
        while True:
            if not (self._done or self._skipped):
                if self._stopping and not self._tasks:
                    return
                # Idle: sleep until a delivery finishes (no 10 ms polling on an idle hub).
                self._has_work.clear()
                try:
                    await asyncio.wait_for(self._has_work.wait(), 0.5)
                except TimeoutError:
                    continue
            try:
                await asyncio.wait_for(self._flushed.wait(), 0.01)
            except TimeoutError:
                pass
            self._flushed.clear()
            if self._done or self._skipped:
                batch, self._done = self._done, []
                skipped, self._skipped = self._skipped, []
                try:
                    await self._commit(batch, skipped)
                except Exception:
                    log.exception("messaging commit failed", items=len(batch))
            elif self._stopping and not self._tasks:
                return

    async def _commit(self, batch: list[tuple[queue.Item, Any, Any]], skipped: list[int]) -> None:
        """Record deliveries: message delivered, queue item done (the partition's next one
        ready) and the release's AuditEvent, all in one transaction."""
        now = now_utc()
        m = messages.c
        params = [{"mid": row.id} for _item, row, _a in batch]
        audit = self.audit
        events = (
            [
                audit.prepare(record)
                for _i, _r, record in batch
                if record is not None
            ]
            if audit is not None
            else []
        )

        async def work(conn: AsyncConnection) -> None:
            if not params:
                await queue.complete_in(conn, skipped)
                return
            if events and getattr(audit, "_force_sync", False):
                await conn.execute(text("SET LOCAL synchronous_commit TO on"))
            await conn.execute(
                update(messages)
                .where(m.id == bindparam("mid"), m.state == QUEUED)
                .values(
                    state="delivered",
                    delivered_at=now,
                    deliveries=m.deliveries + 1,
                    attempts=m.attempts + 1,
                    updated_at=now,
                    last_error=None,
                ),
                params,
            )
            if events:
                # The delivery and its audit rows commit together (the writer's own insert).
                await insert_rows(conn, events)
            # Last: it takes the partitions' locks, held until the commit.
            await queue.complete_in(conn, [item.id for item, _r, _a in batch] + skipped)

        await self.db.write(work)
        self._wake.set()  # the partitions' next messages are ready now
        metrics = messaging_metrics()
        for item, row, _a in batch:
            metrics.delivery_latency.labels(recipient=row.recipient).observe(
                (now - row.accepted_at).total_seconds()
            )
            metrics.delivery_attempts.observe(item.attempts)
