"""Delivery: mailboxes, retries, a recipient that is down, expiry, dead letters and redrive."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import orjson
import pytest

from sharedcare.simulators.recipient import RecipientFaults
from tests.messaging.conftest import eventually, message

PM = "/fhir/$process-message"


def ack_for(msg: dict[str, Any], responder: str, code: str = "ok") -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "message",
        "entry": [
            {
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": str(uuid.uuid4()),
                    "eventCoding": {"code": "ack"},
                    "source": {"endpoint": f"urn:participant:{responder}"},
                    "response": {"identifier": msg["entry"][0]["resource"]["id"], "code": code},
                }
            }
        ],
    }


async def test_a_pull_recipient_lists_downloads_and_acknowledges_its_mailbox(
    app: Any, system_client: Any
) -> None:
    sender = await system_client("gp-a")
    ward = await system_client("ward-b")  # no messaging endpoint: it collects from its mailbox
    sent = [message("gp-a", "ward-b", n=n) for n in range(3)]
    for m in sent:
        assert (await sender.post(PM, content=orjson.dumps(m))).status_code == 202
    listing = (await ward.get("/fhir/$mailbox")).json()
    assert listing["total"] == 3
    assert [e["resource"]["id"] for e in listing["entry"]] == [
        m["entry"][0]["resource"]["id"] for m in sent
    ]
    first_url = listing["entry"][0]["fullUrl"].removeprefix("http://testserver")
    got = await ward.get(first_url)
    assert got.status_code == 200 and got.json()["id"] == sent[0]["id"]
    assert (await ward.post(f"{first_url}/$acknowledge")).status_code == 200
    assert (await ward.get("/fhir/$mailbox")).json()["total"] == 2
    # Another system cannot see or take ward-b's messages.
    other = await system_client("nosy-c")
    assert (await other.get(first_url)).status_code == 404
    assert (await other.get("/fhir/$mailbox")).json()["total"] == 0
    # The release was audited (patient data left the platform).
    audit = await app.state.trail.search([("subtype", "operation")])
    assert b"ward-b" in audit
    # The recipient's response reaches the sender's mailbox.
    assert (
        await ward.post(PM, content=orjson.dumps(ack_for(sent[0], "ward-b")))
    ).status_code == 202
    back = (await sender.get("/fhir/$mailbox")).json()
    assert back["total"] == 1
    assert back["entry"][0]["resource"]["response"] == {
        "identifier": sent[0]["entry"][0]["resource"]["id"],
        "code": "ok",
    }


async def test_a_down_recipient_gets_its_backlog_in_order_and_does_not_slow_others(
    app: Any, system_client: Any, sims: Any
) -> None:
    down = sims(RecipientFaults(down=True))
    up = sims()
    sender = await system_client("gp-a")
    await system_client("ward-down", down.endpoint)
    await system_client("ward-up", up.endpoint)
    backlog = []
    for n in range(20):
        m = message("gp-a", "ward-down", n=n)
        backlog.append(m["id"])
        assert (await sender.post(PM, content=orjson.dumps(m))).status_code == 202
    started = time.monotonic()
    for n in range(20):
        assert (
            await sender.post(PM, content=orjson.dumps(message("gp-a", "ward-up", n=n)))
        ).status_code == 202
    await eventually(lambda: len(up.received()) == 20, timeout=10)
    assert time.monotonic() - started < 5  # the other recipient was not held up
    assert down.received() == []
    down.state.faults = RecipientFaults()  # back up
    await eventually(lambda: len(down.received()) == 20, timeout=20)
    assert [r["bundle_id"] for r in down.received()] == backlog


async def test_a_failing_recipient_is_retried_until_it_answers(
    app: Any, system_client: Any, sims: Any
) -> None:
    flaky = sims(RecipientFaults(failure_rate=0.5, seed=7))
    sender = await system_client("gp-a")
    await system_client("ward-b", flaky.endpoint)
    ids = []
    for n in range(10):
        m = message("gp-a", "ward-b", n=n)
        ids.append(m["id"])
        await sender.post(PM, content=orjson.dumps(m))
    await eventually(lambda: {r["bundle_id"] for r in flaky.received()} == set(ids), timeout=20)
    assert [r["bundle_id"] for r in flaky.received()] == ids  # still in order


@pytest.mark.parametrize("messaging_overrides", [{"messaging_expiry_seconds": 1.0}])
async def test_expiry_dead_letters_tells_the_sender_and_an_operator_can_redrive(
    app: Any, system_client: Any, sims: Any
) -> None:
    down = sims(RecipientFaults(down=True))
    gp = sims()
    sender = await system_client("gp-a", gp.endpoint)
    await system_client("ward-b", down.endpoint)
    msg = message("gp-a", "ward-b")
    mid = int((await sender.post(PM, content=orjson.dumps(msg))).headers["x-message-id"])
    (fatal,) = await eventually(lambda: gp.received(), timeout=15)
    assert fatal["response_code"] == "fatal-error"
    assert fatal["response_to"] == msg["entry"][0]["resource"]["id"]
    dead = await app.state.messaging.list("dead")
    assert [d["id"] for d in dead] == [mid]
    down.state.faults = RecipientFaults()
    assert await app.state.messaging.redrive(mid)
    assert not await app.state.messaging.redrive(mid)  # not dead any more
    (got,) = await eventually(lambda: down.received(), timeout=10)
    assert got["bundle_id"] == msg["id"]


async def test_a_refusing_recipient_dead_letters_at_once(
    app: Any, system_client: Any, sims: Any
) -> None:
    gp = sims()
    sender = await system_client("gp-a", gp.endpoint)
    await system_client("ward-b", gp.url + "/no-such-path")  # 404 from the simulator
    await sender.post(PM, content=orjson.dumps(message("gp-a", "ward-b")))
    (fatal,) = await eventually(lambda: gp.received(), timeout=10)
    assert fatal["response_code"] == "fatal-error"


async def test_a_transient_error_response_lets_the_sender_resend(
    app: Any, system_client: Any, sims: Any
) -> None:
    ward_sim = sims()
    sender = await system_client("gp-a")
    ward = await system_client("ward-b", ward_sim.endpoint)
    msg = message("gp-a", "ward-b")
    await sender.post(PM, content=orjson.dumps(msg))
    await eventually(lambda: ward_sim.received())
    await eventually(lambda: _state(app, msg, "delivered"))
    await ward.post(PM, content=orjson.dumps(ack_for(msg, "ward-b", "transient-error")))
    await sender.post(PM, content=orjson.dumps(msg))  # resend: delivered again
    await eventually(lambda: len(ward_sim.received()) == 2)
    await ward.post(PM, content=orjson.dumps(ack_for(msg, "ward-b", "ok")))
    await sender.post(PM, content=orjson.dumps(msg))  # acknowledged: never again
    await asyncio.sleep(0.5)
    assert len(ward_sim.received()) == 2


async def _state(app: Any, msg: dict[str, Any], state: str) -> bool:
    rows = await app.state.messaging.list(None)
    return next(r["state"] for r in rows if r["bundle_id"] == msg["id"]) == state
