"""$process-message: accepted durably, pushed to the recipient, idempotent, acknowledged, in order."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
from sqlalchemy import func, select

from sharedcare.messaging.schema import messages
from sharedcare.queue.schema import queue_items
from sharedcare.simulators.recipient import RecipientFaults
from tests.messaging.conftest import eventually, message

PM = "/fhir/$process-message"


async def stored(app: Any) -> tuple[int, int]:
    async with app.state.db.read() as conn:
        m = (await conn.execute(select(func.count()).select_from(messages))).scalar_one()
        q = (await conn.execute(select(func.count()).select_from(queue_items))).scalar_one()
    return m, q


async def test_a_message_is_pushed_to_its_recipient_and_the_ack_back_to_its_sender(
    app: Any, system_client: Any, sims: Any
) -> None:
    gp, ward = sims(), sims()
    sender = await system_client("gp-a", gp.endpoint)
    recipient = await system_client("ward-b", ward.endpoint)
    msg = message("gp-a", "ward-b")
    r = await sender.post(PM, content=orjson.dumps(msg))
    assert r.status_code == 202, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    (got,) = await eventually(lambda: ward.received())
    assert got["bundle_id"] == msg["id"] and got["authorization"].startswith("Bearer ")

    # The push released patient data: its AuditEvent names the recipient and the sender.
    async def audited() -> bool:
        found = await app.state.trail.search([("subtype", "operation")])
        return b"ward-b" in found and b"gp-a" in found

    await eventually(audited)
    # The recipient answers with a response message; it reaches the sender the same way.
    header_id = msg["entry"][0]["resource"]["id"]
    ack = {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "message",
        "entry": [
            {
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": str(uuid.uuid4()),
                    "eventCoding": {"code": "discharge-summary"},
                    "source": {"endpoint": "urn:participant:ward-b"},
                    "response": {"identifier": header_id, "code": "ok"},
                }
            }
        ],
    }
    r = await recipient.post(PM, content=orjson.dumps(ack))
    assert r.status_code == 202, r.text
    (back,) = await eventually(lambda: gp.received())
    assert back["response_to"] == header_id and back["response_code"] == "ok"
    row = await app.state.messaging.show(int(r.headers["x-message-id"]) - 1)
    assert row["state"] == "acknowledged" and row["ack_code"] == "ok"
    # Resending the acknowledged message is recognised and never delivered again.
    duplicates = await metric(
        sender, 'sharedcare_messaging_received_total{outcome="duplicate",sender="gp-a"}'
    )
    r = await sender.post(PM, content=orjson.dumps(msg))
    assert r.status_code == 202 and "resend" in r.text
    assert [x["bundle_id"] for x in ward.received()] == [msg["id"]]
    assert (
        await metric(
            sender, 'sharedcare_messaging_received_total{outcome="duplicate",sender="gp-a"}'
        )
        == duplicates + 1
    )
    assert (
        await metric(
            sender, 'sharedcare_messaging_acknowledged_total{code="ok",first_delivery="true"}'
        )
        >= 1
    )
    assert (
        await metric(
            sender, 'sharedcare_messaging_delivery_latency_seconds_count{recipient="ward-b"}'
        )
        >= 1
    )


async def metric(http: Any, series: str) -> float:
    """The value of one series on GET /metrics (0 when absent)."""
    for line in (await http.get("/metrics")).text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_a_resend_is_answered_the_same_and_stored_once(
    app: Any, system_client: Any, sims: Any
) -> None:
    ward = sims(RecipientFaults(down=True))
    sender = await system_client("gp-a")
    await system_client("ward-b", ward.endpoint)
    msg = message("gp-a", "ward-b")
    first = await sender.post(PM, content=orjson.dumps(msg))
    again = await sender.post(PM, content=orjson.dumps(msg))
    assert first.status_code == again.status_code == 202
    assert first.headers["x-message-id"] == again.headers["x-message-id"]
    assert (await stored(app)) == (1, 1)
    row = await app.state.messaging.show(int(first.headers["x-message-id"]))
    assert row["resends"] == 1 and row["state"] == "queued"


def _bad(case: str) -> tuple[dict[str, Any] | bytes, int, str]:
    good = message("gp-a", "ward-b")
    if case == "not a bundle":
        return {"resourceType": "Patient"}, 400, "Bundle"
    if case == "not a message":
        return {**good, "type": "collection"}, 400, "Bundle.type"
    if case == "no bundle id":
        return {k: v for k, v in good.items() if k != "id"}, 400, "Bundle.id"
    if case == "no message header":
        return {**good, "entry": good["entry"][1:]}, 400, "MessageHeader"
    if case == "unknown recipient":
        return message("gp-a", "nobody-here"), 422, "nobody-here"
    if case == "sending as another system":
        m = message("gp-a", "ward-b")
        m["entry"][0]["resource"]["source"]["endpoint"] = "urn:participant:ward-b"
        return m, 403, "gp-a"
    if case == "another organisation":
        m = message("gp-a", "ward-b")
        m["entry"][0]["resource"]["sender"] = {
            "identifier": {
                "system": "https://fhir.nhs.uk/Id/ods-organization-code",
                "value": "ZZZ99",
            }
        }
        return m, 403, "organisation"
    if case == "oversized":
        return message("gp-a", "ward-b", payload_bytes=300 * 1024), 413, "bytes"
    if case == "not json":
        return b"{not json", 400, "JSON"
    if case == "ack for nothing":
        m = message("gp-a", "ward-b")
        m["entry"][0]["resource"]["response"] = {"identifier": "never-sent", "code": "ok"}
        return m, 422, "never-sent"
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "not a bundle",
        "not a message",
        "no bundle id",
        "no message header",
        "unknown recipient",
        "sending as another system",
        "another organisation",
        "oversized",
        "not json",
        "ack for nothing",
    ],
)
async def test_bad_input_is_a_4xx_outcome_and_stores_nothing(
    app: Any, system_client: Any, case: str
) -> None:
    sender = await system_client("gp-a", organization="A81001")
    await system_client("ward-b", "http://127.0.0.1:9/messages")
    body, status, mentions = _bad(case)
    r = await sender.post(PM, content=body if isinstance(body, bytes) else orjson.dumps(body))
    assert r.status_code == status, r.text
    outcome = r.json()
    assert outcome["resourceType"] == "OperationOutcome" and mentions in outcome["issue"][0][
        "diagnostics"
    ] + str(outcome["issue"][0].get("expression"))
    assert (await stored(app)) == (0, 0)


async def test_sending_needs_the_messageheader_create_scope_but_no_end_user(
    app: Any, system_client: Any
) -> None:
    reader = await system_client("gp-a", scopes="system/MessageHeader.rs")
    await system_client("ward-b", "http://127.0.0.1:9/messages")
    r = await reader.post(PM, content=orjson.dumps(message("gp-a", "ward-b")))
    assert r.status_code == 403 and "system/MessageHeader.c" in r.text
    anon = await system_client("gp-c")  # system token, no end-user claims: allowed
    r = await anon.post(PM, content=orjson.dumps(message("gp-c", "ward-b")))
    assert r.status_code == 202


async def test_unordered_messages_do_not_wait_behind_a_stuck_one(
    app: Any, system_client: Any, sims: Any
) -> None:
    ward = sims(RecipientFaults(down=True))
    sender = await system_client("gp-a")
    await system_client("ward-b", ward.endpoint)
    stuck = message("gp-a", "ward-b")
    await sender.post(PM, content=orjson.dumps(stuck))
    free = message("gp-a", "ward-b", unordered=True)
    await sender.post(PM, content=orjson.dumps(free))
    async with app.state.db.read() as conn:
        parts = (
            await conn.execute(
                select(queue_items.c.partition, queue_items.c.state).order_by(queue_items.c.id)
            )
        ).all()
    # The ordered one heads its sender→recipient partition; the unordered one is in none.
    assert [(p.partition, p.state in ("ready", "leased")) for p in parts] == [
        ("gp-a>ward-b", True),
        (None, True),
    ]


async def test_messages_from_one_sender_arrive_in_order(
    app: Any, system_client: Any, sims: Any
) -> None:
    ward = sims(RecipientFaults(jitter_ms=20))
    sender = await system_client("gp-a")
    await system_client("ward-b", ward.endpoint)
    sent = []
    for n in range(30):
        m = message("gp-a", "ward-b", n=n)
        sent.append(m["id"])
        assert (await sender.post(PM, content=orjson.dumps(m))).status_code == 202
    await eventually(lambda: len(ward.received()) == 30)
    assert [r["bundle_id"] for r in ward.received()] == sent


async def test_a_registered_endpoint_url_names_the_recipient(
    app: Any, system_client: Any, sims: Any
) -> None:
    ward = sims()
    sender = await system_client("gp-a")
    await system_client("ward-b", ward.endpoint)
    m = message("gp-a", "ward-b", destination=ward.endpoint)
    assert (await sender.post(PM, content=orjson.dumps(m))).status_code == 202
    await eventually(lambda: ward.received())
