"""Reliable messaging, free of transport: accept, acknowledge, mailboxes, dead letters, redrive.

Rules (hl7.org/fhir/R4/messaging.html, "Reliable Messaging"):

- A message is accepted once: its row in ``messages`` (unique per sender and Bundle.id) and,
  for a push recipient, its delivery item in the durable queue commit in one transaction
  before the sender hears 202.
- A resent Bundle.id gets the same answer and changes nothing, except that a message that
  was delivered but not acknowledged is delivered again, and a dead-lettered one is revived.
  Once acknowledged (a response coded ``ok`` or ``fatal-error``), never delivered again.
- A response message (``MessageHeader.response``) from the recipient is routed to the
  original sender like any message and marks the original acknowledged.
- Messages between one sender and one recipient are delivered in accept order (one queue
  partition per pair) unless the MessageHeader carries the ``message-ordering`` extension
  with ``unordered``.
- A message not delivered within ``messaging_expiry_seconds`` is dead-lettered and the
  sender gets a ``fatal-error`` response from the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import orjson
import structlog
from sqlalchemy import case, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SQLAlchemyTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection

from sharedcare.fhir.errors import FHIRError
from sharedcare.iam.context import AccessContext
from sharedcare.messaging.metrics import messaging_metrics
from sharedcare.messaging.model import (
    HEADER,
    HUB_SENDER,
    PARTICIPANT_PREFIX,
    Message,
    parse_message,
    response_message,
)
from sharedcare.messaging.schema import messages
from sharedcare.queue import store as queue
from sharedcare.registry.model import System
from sharedcare.registry.service import Registry
from sharedcare.store.db import Database
from sharedcare.store.repository import now_utc

log = structlog.get_logger("sharedcare.messaging")

PUSH_QUEUE: Final = "messaging.push"
QUEUED, DELIVERED, ACKNOWLEDGED, DEAD = "queued", "delivered", "acknowledged", "dead"
FINAL_CODES: Final = frozenset({"ok", "fatal-error"})  # transient-error invites a resend


@dataclass(frozen=True, slots=True)
class Accepted:
    """What ``$process-message`` answers: the hub's message id and whether it was a resend."""

    id: int
    recipient: str
    duplicate: bool
    bundle_id: str


@dataclass(slots=True)
class _Entry:
    values: dict[str, Any]  # the messages row
    original: Any  # a response: the row of the message it answers
    code: str | None


Writer = Callable[[AsyncConnection, list[_Entry]], Awaitable[list[Accepted]]]


class GroupCommit:
    """Accepts wait here and are written together: one transaction per group, not per message.

    Each caller still hears back only once its own message is committed. On SQLite (one
    writer) this is what lets accepts keep up; on PostgreSQL it saves a commit per message.
    """

    def __init__(self, db: Database, write: Writer, *, max_batch: int = 200):
        self.db = db
        self.write = write
        self.max_batch = max_batch
        self.concurrency = 1 if db.dialect == "sqlite" else 2
        self._pending: list[tuple[_Entry, asyncio.Future[Accepted]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._slots = asyncio.Semaphore(self.concurrency)
        self._flushes: set[asyncio.Task[None]] = set()

    async def submit(self, entry: _Entry) -> Accepted:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="messaging-accept")
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, future))
        self._wake.set()
        return await future

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._slots.acquire()
            batch = self._pending[: self.max_batch]
            del self._pending[: self.max_batch]
            task = asyncio.create_task(self._flush(batch))
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush(self, batch: list[tuple[_Entry, asyncio.Future[Accepted]]]) -> None:
        try:
            results = await self.db.write(lambda conn: self.write(conn, [e for e, _f in batch]))
        except Exception as exc:  # noqa: BLE001 - every waiter hears of it; nothing was stored
            for _e, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_e, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._slots.release()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def partition(sender: str, recipient: str) -> str:
    return f"{sender}>{recipient}"


class Messaging:
    """The messaging capability of one hub process."""

    def __init__(
        self,
        db: Database,
        registry: Registry,
        *,
        hub_base: str,
        expiry_seconds: float,
        max_message_bytes: int,
        on_enqueue: Callable[[], None] | None = None,
    ):
        self.db = db
        self.registry = registry
        self.hub_base = hub_base
        self.expiry_seconds = expiry_seconds
        self.max_message_bytes = max_message_bytes
        self.on_enqueue = on_enqueue or (lambda: None)
        self._endpoints: tuple[float, dict[str, str]] = (0.0, {})
        self._committer = GroupCommit(db, self._accept_many)

    async def close(self) -> None:
        """Stop taking accepts (the app is shutting down)."""
        await self._committer.close()

    # -- accept ---------------------------------------------------------------------------
    async def accept(self, context: AccessContext, raw: bytes) -> Accepted:
        """Store one message durably (and its delivery item); FHIRError 4xx for bad input."""
        started = time.perf_counter()
        if len(raw) > self.max_message_bytes:
            raise self.too_large(len(raw))
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise FHIRError.of(
                400, "structure", f"The request body is not valid JSON: {exc}."
            ) from None
        message = parse_message(body)
        sender = context.client_id
        system = await self.registry.lookup(sender)
        if system is None:
            raise FHIRError.of(403, "forbidden", "Your system is not registered.")
        self._check_sender(message, system, context)
        recipient = await self._recipient(message)
        entry = await self._prepare(message, raw, sender, recipient)
        try:
            accepted = await self._committer.submit(entry)
        except (DBAPIError, SQLAlchemyTimeoutError) as exc:
            # Nothing was stored: the sender resends with the same Bundle.id (see the README).
            log.error("message not stored: database unavailable", error=str(exc)[:300])
            raise FHIRError.of(
                503,
                "transient",
                "The hub could not store the message just now; resend it with the same Bundle.id.",
                headers={"Retry-After": "1"},
            ) from None
        metrics = messaging_metrics()
        metrics.received.labels(
            sender=sender, outcome="duplicate" if accepted.duplicate else "accepted"
        ).inc()
        metrics.accept_duration.observe(time.perf_counter() - started)
        self.on_enqueue()
        return accepted

    def too_large(self, size: int) -> FHIRError:
        return FHIRError.of(
            413,
            "too-costly",
            f"The message is {size} bytes; this hub accepts messages up to {self.max_message_bytes} "
            "bytes (SHAREDCARE_MESSAGING_MAX_MESSAGE_BYTES). Send large documents by reference.",
        )

    def _check_sender(self, message: Message, system: System, context: AccessContext) -> None:
        own = {f"{PARTICIPANT_PREFIX}{system.client_id}"}
        if system.messaging_endpoint:
            own.add(system.messaging_endpoint)
        if message.source not in own:
            raise FHIRError.of(
                403,
                "forbidden",
                f"MessageHeader.source.endpoint is {message.source!r}, but your token is for system "
                f"{system.client_id!r}: send as {PARTICIPANT_PREFIX}{system.client_id}.",
                expression=f"{HEADER}.source.endpoint",
            )
        ods, org_id = message.sender_org
        ours = context.participant_organization or system.organization
        if (ods is not None and ods != ours) or (
            org_id is not None and org_id != system.organization_id
        ):
            raise FHIRError.of(
                403,
                "forbidden",
                f"MessageHeader.sender names another organisation; your system belongs to {ours or 'none'}.",
                expression=f"{HEADER}.sender",
            )

    async def _recipient(self, message: Message) -> System | None:
        """The destination system; None for a response that names no destination."""
        dest = message.destination
        if dest is None:
            return None
        if dest.startswith(PARTICIPANT_PREFIX):
            client_id: str | None = dest[len(PARTICIPANT_PREFIX) :]
        else:
            client_id = (await self._endpoint_map()).get(dest.rstrip("/"))
        system = await self.registry.lookup(client_id) if client_id else None
        if system is None or not system.active:
            raise FHIRError.of(
                422,
                "not-found",
                f"No active participant is registered as {dest!r}: use {PARTICIPANT_PREFIX}{{system id}} "
                "or the recipient's registered messaging endpoint.",
                expression=f"{HEADER}.destination[0].endpoint",
            )
        return system

    async def _endpoint_map(self) -> dict[str, str]:
        """Registered messaging endpoint URL → client id (refreshed every 10 s)."""
        at, mapping = self._endpoints
        if time.monotonic() - at > 10:
            mapping = {
                s.messaging_endpoint.rstrip("/"): s.client_id
                for s in await self.registry.systems()
                if s.messaging_endpoint
            }
            self._endpoints = (time.monotonic(), mapping)
        return mapping

    async def _prepare(
        self, message: Message, raw: bytes, sender: str, recipient: System | None
    ) -> _Entry:
        """What an accept writes, checked before the group commit (which cannot fail per entry)."""
        original = None
        if message.response_to is not None:
            async with self.db.read() as conn:
                original = await self._original(conn, message, sender, recipient)
            if recipient is None:
                recipient = await self.registry.lookup(original.sender)
                if recipient is None:
                    raise FHIRError.of(
                        422,
                        "not-found",
                        f"The original sender {original.sender!r} is no longer registered.",
                    )
        assert recipient is not None
        now = now_utc()
        values = {
            "sender": sender,
            "recipient": recipient.client_id,
            "bundle_id": message.bundle_id,
            "header_id": message.header_id,
            "event": message.event,
            "responds_to": original.id if original is not None else None,
            "response_code": message.response_code,
            "mode": "push" if recipient.messaging_endpoint else "pull",
            "ordered": message.ordered,
            "state": QUEUED,
            "deliveries": 0,
            "resends": 0,
            "attempts": 0,
            "patient_data": message.patient_data,
            "size": len(raw),
            "body": raw,
            "accepted_at": now,
            "updated_at": now,
        }
        return _Entry(values, original, message.response_code)

    async def _accept_many(self, conn: AsyncConnection, entries: list[_Entry]) -> list[Accepted]:
        """One transaction for a group of accepts: a few statements however many messages."""
        now = now_utc()
        firsts: dict[tuple[str, str], _Entry] = {}
        for e in entries:
            firsts.setdefault((e.values["sender"], e.values["bundle_id"]), e)
        insert = pg_insert if conn.dialect.name == "postgresql" else sqlite_insert
        m = messages.c
        statement = (
            insert(messages)
            .values([e.values for e in firsts.values()])
            .on_conflict_do_nothing(index_elements=["sender", "bundle_id"])
            .returning(m.id, m.sender, m.bundle_id)
        )
        inserted = {(r.sender, r.bundle_id): r.id for r in (await conn.execute(statement)).all()}
        push: list[tuple[dict[str, Any], str | None]] = []
        for key, e in firsts.items():
            mid = inserted.get(key)
            if mid is not None and e.values["mode"] == "push":
                part = partition(key[0], e.values["recipient"]) if e.values["ordered"] else None
                push.append(({"m": mid}, part))
        await queue.enqueue_many(conn, PUSH_QUEUE, push)
        out: list[Accepted] = []
        for e in entries:
            key = (e.values["sender"], e.values["bundle_id"])
            mid = inserted.get(key)
            if mid is not None and e is firsts[key]:
                if e.original is not None and e.code is not None:
                    await self._acknowledge(conn, e.original, e.code, now)
                out.append(Accepted(mid, e.values["recipient"], False, key[1]))
            else:
                out.append(await self._resent(conn, key[0], key[1], now))
        return out

    async def _enqueue(
        self, conn: AsyncConnection, mid: int, sender: str, recipient: str, ordered: bool
    ) -> None:
        await queue.enqueue(
            conn,
            PUSH_QUEUE,
            {"m": mid},
            partition=partition(sender, recipient) if ordered else None,
        )

    async def _original(
        self, conn: AsyncConnection, message: Message, responder: str, destination: System | None
    ) -> Any:
        m = messages.c
        where = [
            m.header_id == message.response_to,
            m.recipient == responder,
            m.responds_to.is_(None),
        ]
        if destination is not None:
            where.append(m.sender == destination.client_id)
        row = (
            await conn.execute(
                select(m.id, m.sender, m.state, m.deliveries, m.resends, m.delivered_at)
                .where(*where)
                .limit(1)
            )
        ).first()
        if row is None:
            raise FHIRError.of(
                422,
                "not-found",
                f"MessageHeader.response.identifier {message.response_to!r} names no message this hub "
                "delivered to your system"
                + (f" from {destination.client_id!r}." if destination is not None else "."),
                expression=f"{HEADER}.response.identifier",
            )
        return row

    async def _acknowledge(
        self, conn: AsyncConnection, original: Any, code: str, now: datetime
    ) -> None:
        m = messages.c
        values: dict[str, Any] = {"ack_code": code, "updated_at": now}
        if code in FINAL_CODES:
            values.update(state=ACKNOWLEDGED, acknowledged_at=func.coalesce(m.acknowledged_at, now))
        # Responded before the hub recorded the delivery (it crashed in between): delivered.
        values.update(
            delivered_at=func.coalesce(m.delivered_at, now),
            deliveries=case((m.deliveries < 1, 1), else_=m.deliveries),
        )
        await conn.execute(update(messages).where(m.id == original.id).values(**values))
        first = original.deliveries <= 1 and original.resends == 0
        messaging_metrics().acknowledged.labels(code=code, first_delivery=str(first).lower()).inc()

    async def _resent(
        self, conn: AsyncConnection, sender: str, bundle_id: str, now: datetime
    ) -> Accepted:
        m = messages.c
        query = select(m.id, m.recipient, m.state, m.mode, m.ordered).where(
            m.sender == sender, m.bundle_id == bundle_id
        )
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        row = (await conn.execute(query)).one()
        values: dict[str, Any] = {"resends": m.resends + 1, "updated_at": now}
        if row.state in (DELIVERED, DEAD):
            # Delivered but never acknowledged, or given up on: the sender's resend asks
            # for another delivery (the recipient recognises the Bundle.id).
            values.update(state=QUEUED, accepted_at=now, last_error=None)
            if row.mode == "push":
                await self._enqueue(conn, row.id, sender, row.recipient, row.ordered)
        await conn.execute(update(messages).where(m.id == row.id).values(**values))
        return Accepted(row.id, row.recipient, True, bundle_id)

    # -- dead letters ---------------------------------------------------------------------
    async def dead_letter_in(
        self, conn: AsyncConnection, row: Any, reason: str, sender_system: System | None
    ) -> bool:
        """Dead-letter a queued message and queue the hub's ``fatal-error`` to its sender."""
        now = now_utc()
        m = messages.c
        result = await conn.execute(
            update(messages)
            .where(m.id == row.id, m.state == QUEUED)
            .values(state=DEAD, last_error=reason[:2000], updated_at=now)
        )
        if not result.rowcount:
            return False
        messaging_metrics().dead_letters.labels(recipient=row.recipient).inc()
        if row.responds_to is not None or row.sender == HUB_SENDER or sender_system is None:
            return True  # responses are not answered; an unregistered sender cannot be told
        body = response_message(
            hub_base=self.hub_base,
            original_header_id=row.header_id,
            event=row.event,
            to=row.sender,
            code="fatal-error",
            diagnostics=f"Not delivered to {row.recipient}: {reason}",
        )
        raw = orjson.dumps(body)
        header = body["entry"][0]["resource"]
        mode = "push" if sender_system.messaging_endpoint else "pull"
        new_id = (
            await conn.execute(
                messages.insert()
                .values(
                    sender=HUB_SENDER,
                    recipient=row.sender,
                    bundle_id=body["id"],
                    header_id=header["id"],
                    event=row.event,
                    responds_to=row.id,
                    response_code="fatal-error",
                    mode=mode,
                    ordered=False,
                    state=QUEUED,
                    deliveries=0,
                    resends=0,
                    attempts=0,
                    patient_data=False,
                    size=len(raw),
                    body=raw,
                    accepted_at=now,
                    updated_at=now,
                )
                .returning(m.id)
            )
        ).scalar_one()
        if mode == "push":
            await self._enqueue(conn, new_id, HUB_SENDER, row.sender, False)
        return True

    async def expire_mailboxes(self, limit: int = 500) -> int:
        """Dead-letter pull messages older than the expiry (push ones expire in delivery)."""
        cutoff = now_utc() - timedelta(seconds=self.expiry_seconds)
        m = messages.c
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(m.id, m.sender, m.recipient, m.header_id, m.event, m.responds_to)
                    .where(m.state == QUEUED, m.mode == "pull", m.accepted_at < cutoff)
                    .order_by(m.id)
                    .limit(limit)
                )
            ).all()
        if not rows:
            return 0
        senders = {
            r.sender: await self.registry.lookup(r.sender) for r in rows if r.sender != HUB_SENDER
        }
        reason = f"not collected from the mailbox within {self.expiry_seconds:g} s"

        async def work(conn: AsyncConnection) -> int:
            return sum(
                [await self.dead_letter_in(conn, r, reason, senders.get(r.sender)) for r in rows]
            )

        count = await self.db.write(work)
        if count:
            self.on_enqueue()
        return count

    async def redrive(self, mid: int) -> bool:
        """Put a dead-lettered message back for delivery now; False if it is not dead."""
        now = now_utc()
        m = messages.c

        async def work(conn: AsyncConnection) -> bool:
            row = (
                await conn.execute(
                    select(m.sender, m.recipient, m.mode, m.ordered).where(
                        m.id == mid, m.state == DEAD
                    )
                )
            ).first()
            if row is None:
                return False
            # A fresh expiry window from now; attempts start again.
            await conn.execute(
                update(messages)
                .where(m.id == mid)
                .values(state=QUEUED, accepted_at=now, updated_at=now, last_error=None)
            )
            if row.mode == "push":
                await self._enqueue(conn, mid, row.sender, row.recipient, row.ordered)
            return True

        done = await self.db.write(work)
        if done:
            self.on_enqueue()
        return done

    # -- mailboxes (pull delivery) ------------------------------------------------------------
    async def mailbox(self, client_id: str, count: int) -> tuple[list[dict[str, Any]], int]:
        """The oldest undelivered messages for ``client_id`` (headers only) and their total."""
        m = messages.c
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(m.id, m.body, m.sender, m.accepted_at)
                    .where(m.recipient == client_id, m.state == QUEUED, m.mode == "pull")
                    .order_by(m.id)
                    .limit(count)
                )
            ).all()
            total = (
                await conn.execute(
                    select(func.count()).where(
                        m.recipient == client_id, m.state == QUEUED, m.mode == "pull"
                    )
                )
            ).scalar_one()
        return [
            {
                "id": r.id,
                "header": orjson.loads(r.body)["entry"][0]["resource"],
                "sender": r.sender,
                "accepted": r.accepted_at,
            }
            for r in rows
        ], int(total)

    async def download(self, client_id: str, mid: int) -> Any:
        """One message of ``client_id``'s mailbox (any state: a download may be repeated)."""
        m = messages.c
        async with self.db.read() as conn:
            row = (
                await conn.execute(
                    select(
                        m.id,
                        m.body,
                        m.sender,
                        m.recipient,
                        m.state,
                        m.bundle_id,
                        m.event,
                        m.patient_data,
                    ).where(m.id == mid, m.recipient == client_id, m.mode == "pull")
                )
            ).first()
        if row is None:
            raise FHIRError.of(404, "not-found", f"Your mailbox holds no message {mid}.")
        return row

    async def acknowledge_download(self, client_id: str, mid: int) -> bool:
        """The recipient has the message: remove it from the mailbox (MESH "acknowledge")."""
        now = now_utc()
        m = messages.c

        async def work(conn: AsyncConnection) -> tuple[bool, Any]:
            row = (
                await conn.execute(
                    select(m.id, m.state, m.accepted_at).where(
                        m.id == mid, m.recipient == client_id, m.mode == "pull"
                    )
                )
            ).first()
            if row is None:
                raise FHIRError.of(404, "not-found", f"Your mailbox holds no message {mid}.")
            if row.state != QUEUED:
                return False, row
            await conn.execute(
                update(messages)
                .where(m.id == mid, m.state == QUEUED)
                .values(
                    state=DELIVERED, delivered_at=now, deliveries=m.deliveries + 1, updated_at=now
                )
            )
            return True, row

        changed, row = await self.db.write(work)
        if changed:
            messaging_metrics().delivery_latency.labels(recipient=client_id).observe(
                (now - row.accepted_at).total_seconds()
            )
        return changed

    # -- operators ----------------------------------------------------------------------------
    async def list(self, state: str | None = DEAD, limit: int = 100) -> list[dict[str, Any]]:
        m = messages.c
        query = select(
            m.id,
            m.sender,
            m.recipient,
            m.bundle_id,
            m.event,
            m.state,
            m.mode,
            m.response_code,
            m.ack_code,
            m.deliveries,
            m.resends,
            m.attempts,
            m.size,
            m.accepted_at,
            m.delivered_at,
            m.acknowledged_at,
            m.last_error,
        )
        if state:
            query = query.where(m.state == state)
        async with self.db.read() as conn:
            rows = (await conn.execute(query.order_by(m.id.desc()).limit(limit))).all()
        return [dict(r._mapping) for r in rows]

    async def show(self, mid: int) -> dict[str, Any] | None:
        async with self.db.read() as conn:
            row = (await conn.execute(select(messages).where(messages.c.id == mid))).first()
        if row is None:
            return None
        out = dict(row._mapping)
        out["body"] = orjson.loads(out["body"])
        return out

    async def queue_sizes(self) -> dict[str, int]:
        """Undelivered messages per recipient."""
        m = messages.c
        async with self.db.read() as conn:
            rows = (
                await conn.execute(
                    select(m.recipient, func.count()).where(m.state == QUEUED).group_by(m.recipient)
                )
            ).all()
        return {r[0]: int(r[1]) for r in rows}


def new_bundle_id() -> str:
    return str(uuid.uuid4())
