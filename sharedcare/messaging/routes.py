"""HTTP adapters of messaging: ``$process-message`` and the MESH-style mailbox.

=========================================  ===============================  ======================
Request                                    Does                             Scope
=========================================  ===============================  ======================
``POST /fhir/$process-message``            accept a message (202)           system/MessageHeader.c
``GET /fhir/$mailbox?_count=N``            list undelivered messages        system/MessageHeader.s
``GET /fhir/$mailbox/{id}``                download one message             system/MessageHeader.r
``POST /fhir/$mailbox/{id}/$acknowledge``  remove it from the mailbox       system/MessageHeader.r
=========================================  ===============================  ======================

Messaging is system to system: no end-user context is needed (the middleware maps these
paths to no store interaction, and the scope is checked here).
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from sharedcare.audit import AuditRecord
from sharedcare.fhir.errors import FHIRError, Issue, operation_outcome
from sharedcare.fhir.responses import check_json_media_type, fhir_json
from sharedcare.iam.context import AccessContext, access
from sharedcare.iam.metrics import record_request_rejected
from sharedcare.iam.scopes import required_text
from sharedcare.messaging.model import instant, parse_message
from sharedcare.messaging.service import Messaging

MAX_MAILBOX_PAGE = 500
# What /fhir/metadata declares for these routes (merged by sharedcare.store.capability).
CAPABILITY: dict[str, Any] = {
    "routes": (
        ("POST", "/fhir/$process-message"),
        ("GET", "/fhir/$mailbox"),
        ("GET", "/fhir/$mailbox/{mid}"),
        ("POST", "/fhir/$mailbox/{mid}/$acknowledge"),
    ),
    "operation": [
        {
            "name": "process-message",
            "definition": "http://hl7.org/fhir/OperationDefinition/MessageHeader-process-message",
            "documentation": (
                "Asynchronous FHIR messaging: a message Bundle for a registered recipient is "
                "accepted durably (202) and delivered by push or to the recipient's mailbox; "
                "a resend of the same Bundle.id is recognised. Scope system/MessageHeader.c."
            ),
        },
        {
            "name": "mailbox",
            "definition": "https://sharedcare.example.org/fhir/OperationDefinition/mailbox",
            "documentation": (
                "GET [base]/$mailbox?_count=N lists the caller's undelivered messages (a searchset "
                "of MessageHeaders; scope system/MessageHeader.s); GET [base]/$mailbox/{id} "
                "downloads one message Bundle (scope system/MessageHeader.r)."
            ),
        },
        {
            "name": "acknowledge",
            "definition": "https://sharedcare.example.org/fhir/OperationDefinition/mailbox-acknowledge",
            "documentation": (
                "POST [base]/$mailbox/{id}/$acknowledge removes a downloaded message from the "
                "caller's mailbox (idempotent; scope system/MessageHeader.r)."
            ),
        },
    ],
}


def _allowed(context: AccessContext, permission: str) -> None:
    if not context.grants.allows("MessageHeader", permission):
        wanted = required_text("MessageHeader", permission)
        record_request_rejected("insufficient_scope", context.client_id)
        raise FHIRError.of(
            403,
            "forbidden",
            f"This request needs the scope {wanted} (or a wider one).",
            headers={
                "WWW-Authenticate": f'Bearer realm="sharedcare", error="insufficient_scope", scope="{wanted}"'
            },
        )


def _service(request: Request) -> Messaging:
    return request.app.state.messaging  # type: ignore[no-any-return]


async def process_message(request: Request) -> Response:
    context = access(request)
    _allowed(context, "c")
    service = _service(request)
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > service.max_message_bytes:
        raise service.too_large(int(length))  # refused before reading the body
    check_json_media_type(request.headers.get("content-type"))
    accepted = await service.accept(context, await request.body())
    outcome = operation_outcome(
        Issue(
            "informational",
            f"Message {accepted.bundle_id} accepted for {accepted.recipient} as hub message {accepted.id}"
            + (" (a resend: already held)." if accepted.duplicate else "."),
            severity="information",
        )
    )
    # FHIR asynchronous messaging: 202, the response messages follow separately. A resend
    # gets the same status and says it was recognised.
    return fhir_json(outcome, 202, {"X-Message-Id": str(accepted.id)})


def _count(request: Request) -> int:
    raw = request.query_params.get("_count", "100")
    if not raw.isdigit() or int(raw) < 1:
        raise FHIRError.of(400, "invalid", "_count must be a positive whole number.")
    return min(int(raw), MAX_MAILBOX_PAGE)


def _mid(request: Request) -> int:
    raw = request.path_params["mid"]
    if not raw.isdigit() or len(raw) > 18:
        raise FHIRError.of(404, "not-found", f"Your mailbox holds no message {raw!r}.")
    return int(raw)


async def mailbox(request: Request) -> Response:
    context = access(request)
    _allowed(context, "s")
    base = request.app.state.settings.fhir_base
    rows, total = await _service(request).mailbox(context.client_id, _count(request))
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "searchset",
        "timestamp": instant(),
        "total": total,
        "entry": [
            {
                "fullUrl": f"{base}/$mailbox/{r['id']}",
                "resource": r["header"],
                "search": {"mode": "match"},
            }
            for r in rows
        ],
    }
    return fhir_json(bundle)


async def download(request: Request) -> Response:
    context = access(request)
    _allowed(context, "r")
    service = _service(request)
    row = await service.download(context.client_id, _mid(request))
    audit = request.app.state.audit
    if row.patient_data and audit is not None:
        # Releasing patient data across the boundary: durable audit before the response.
        nhs = parse_message(orjson.loads(row.body)).nhs_number
        await audit.record(
            AuditRecord(
                action="operation",
                request_id=request.scope.get("state", {}).get("request_id") or f"message-{row.id}",
                client_id=context.client_id,
                query=f"GET /fhir/$mailbox/{row.id} message {row.bundle_id} from {row.sender} event {row.event}"[
                    :1000
                ],
                nhs_number=nhs,
                providers=(row.sender,),
                released=1,
            )
        )
    return fhir_json(bytes(row.body), 200, {"X-Message-Id": str(row.id)})


async def acknowledge(request: Request) -> Response:
    context = access(request)
    _allowed(context, "r")
    mid = _mid(request)
    changed = await _service(request).acknowledge_download(context.client_id, mid)
    text = f"Message {mid} acknowledged" + ("." if changed else " (already acknowledged).")
    return fhir_json(operation_outcome(Issue("informational", text, severity="information")), 200)


def messaging_routes() -> list[BaseRoute]:
    return [
        Route("/fhir/$process-message", process_message, methods=["POST"]),
        Route("/fhir/$mailbox", mailbox, methods=["GET"]),
        Route("/fhir/$mailbox/{mid}", download, methods=["GET"]),
        Route("/fhir/$mailbox/{mid}/$acknowledge", acknowledge, methods=["POST"]),
    ]
