"""kill -9 a real hub mid-load, restart it: every accepted message is delivered, every ack
reaches its sender, and nothing is delivered again once acknowledged."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import orjson
from helpers import RunningHub, free_port

from sharedcare.iam.client import generate_key, public_jwks, sign_assertion, token_form
from sharedcare.registry.model import new_system
from sharedcare.registry.service import Registry
from sharedcare.simulators.recipient import AckConfig
from sharedcare.store import migrate
from sharedcare.store.db import Database
from sharedcare.store.repository import Store
from sharedcare.store.service import FhirService
from tests.messaging.conftest import Sim, eventually, message

MESSAGES = 80
SCOPES = "system/MessageHeader.crs"


class Hub(RunningHub):
    """A RunningHub on a chosen port, so a restarted hub answers at the same URL."""

    def __init__(self, env: dict[str, str], port: int):
        super().__init__(env)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env["SHAREDCARE_PORT"] = str(port)


async def register(database: str, base: str, systems: list[tuple[str, Any, str]]) -> None:
    db = Database(database)
    try:
        await migrate.upgrade(db)
        registry = Registry(
            FhirService(Store(db), fhir_base=f"{base}/fhir", default_count=50, max_count=1000)
        )
        for client_id, key, endpoint in systems:
            await registry.add(
                new_system(
                    client_id=client_id,
                    kind="provider",
                    name=client_id,
                    scopes=SCOPES,
                    fhir_base=f"https://{client_id}.example/fhir",
                    messaging_endpoint=endpoint,
                    jwks=public_jwks(key),
                )
            )
    finally:
        await db.close()


async def test_kill_9_mid_load_loses_nothing_and_repeats_nothing_after_ack(
    database_url: str, tmp_path: Path
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    gp_key, ward_key = generate_key("ES384"), generate_key("ES384")
    env = {
        "SHAREDCARE_DATABASE_URL": database_url,
        "SHAREDCARE_DATA_DIR": str(tmp_path / "data"),
        "SHAREDCARE_BASE_URL": base,
        "SHAREDCARE_HUB_KEY_ALG": "ES384",
        "SHAREDCARE_RATE_LIMIT_PER_SECOND": "0",
        "SHAREDCARE_MESSAGING_RETRY_BASE_SECONDS": "0.1",
        "SHAREDCARE_MESSAGING_RETRY_CAP_SECONDS": "1",
        "SHAREDCARE_MESSAGING_DELIVERY_TIMEOUT_SECONDS": "0.5",
    }
    with Sim() as gp, Sim(ack=AckConfig(hub=base, client_id="ward-b", key=ward_key)) as ward:
        await register(
            database_url, base, [("gp-a", gp_key, gp.endpoint), ("ward-b", ward_key, ward.endpoint)]
        )
        sent = [message("gp-a", "ward-b", n=n, payload_bytes=2000) for n in range(MESSAGES)]
        accepted: set[str] = set()
        hub = Hub(env, port).__enter__()
        try:
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:

                async def token() -> str:
                    assertion = sign_assertion(gp_key, "gp-a", f"{base}/oauth2/token")
                    r = await http.post("/oauth2/token", data=token_form(assertion, SCOPES))
                    return str(r.json()["access_token"])

                headers = {
                    "Authorization": f"Bearer {await token()}",
                    "Content-Type": "application/fhir+json",
                }
                killed = False
                for i, m in enumerate(sent):
                    if i == MESSAGES // 2 and not killed:
                        await eventually(lambda: len(ward.received()) > 10, timeout=20)
                        hub.proc.kill()  # SIGKILL: no shutdown, no flush
                        hub.proc.wait()
                        killed = True
                        hub.__exit__()
                        hub = Hub(env, port).__enter__()
                        headers["Authorization"] = f"Bearer {await token()}"
                    while True:  # the sender resends with the same Bundle.id until it gets 202
                        try:
                            r = await http.post(
                                "/fhir/$process-message", content=orjson.dumps(m), headers=headers
                            )
                        except httpx.TransportError:
                            await asyncio.sleep(0.2)
                            continue
                        if r.status_code == 202:
                            accepted.add(m["id"])
                            break
                        assert r.status_code >= 500, r.text
                        await asyncio.sleep(0.2)
                # Kill it once more while deliveries and acks are in flight.
                hub.proc.kill()
                hub.proc.wait()
                hub.__exit__()
                hub = Hub(env, port).__enter__()

                def all_delivered() -> bool:
                    return accepted <= {r["bundle_id"] for r in ward.received()}

                await eventually(all_delivered, timeout=60, every=0.2)
                header_ids = {m["entry"][0]["resource"]["id"] for m in sent}

                def all_acked() -> bool:
                    return header_ids <= {r["response_to"] for r in gp.received(responses=True)}

                await eventually(all_acked, timeout=60, every=0.2)
                await asyncio.sleep(
                    1.0
                )  # anything still to be (wrongly) redelivered would arrive now
        finally:
            hub.__exit__()
        assert accepted == {m["id"] for m in sent}
        # Nothing delivered again after its acknowledgement was accepted by the hub.
        first = ward.state.seen
        late = [
            r
            for r in ward.received()
            if first[r["bundle_id"]].get("acked_at") is not None
            and r["at"] > first[r["bundle_id"]]["acked_at"]
        ]
        assert late == []
        # Order per sender→recipient survives the crash: first arrivals are in send order.
        order = [r["bundle_id"] for r in ward.received() if not r.get("duplicate")]
        assert order == [m["id"] for m in sent]
