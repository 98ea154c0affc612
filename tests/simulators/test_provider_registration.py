"""Provider simulators registering their people with a real hub's patient index (PIXm feed).

The hub is a real ``sharedcare serve`` process on both database backends; the provider is the
real ``sharedcare simulate provider`` command, started before the hub so it must wait for it;
a PDS simulator of the same seed lets the hub verify every registration.
"""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Self

import httpx
import pytest
from helpers import RunningHub

from sharedcare.iam.client import generate_key, public_jwks
from sharedcare.pix.index import PatientIndex
from sharedcare.registry.model import new_system
from sharedcare.registry.service import Registry
from sharedcare.settings import Settings
from sharedcare.simulators.pds import SimulatorServer, create_pds_app
from sharedcare.simulators.provider import ProviderConfig, provider_people
from sharedcare.simulators.registration import (
    RegistrationError,
    SmartToken,
    load_private_key,
    pixm_patient,
    register_people,
)
from sharedcare.store import migrate
from sharedcare.store.db import Database
from sharedcare.store.repository import Store
from sharedcare.store.service import FhirService

PEOPLE = 12
CONFIG = ProviderConfig(id="reg-pas", people=PEOPLE, resource_bytes=0)


class SlowStartHub(RunningHub):
    """``RunningHub`` that waits up to two minutes for readiness: on a 2-core machine shared
    with other test runs, starting the hub (imports, migrations) can take longer than 30 s."""

    def __enter__(self) -> Self:
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "the hub exited during start-up"
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("hub did not become ready in 120 s")


async def _register_system(settings: Settings, hub_url: str, key: Any) -> None:
    db = Database(settings.database)
    try:
        await migrate.upgrade(db)
        fhir = FhirService(Store(db), fhir_base=f"{hub_url}/fhir", default_count=50, max_count=1000)
        await Registry(fhir).add(
            new_system(
                client_id=CONFIG.id, kind="provider", name="Registration test PAS",
                scopes="system/Patient.u system/Patient.rs", fhir_base="http://127.0.0.1:9/fhir",
                identifier_systems=[CONFIG.identifier_system], jwks=public_jwks(key),
            )
        )  # fmt: skip
    finally:
        await db.close()


async def _index_state(settings: Settings) -> dict[str, tuple[str, ...]]:
    """NHS number -> link statuses for this provider, read from the hub's database."""
    db = Database(settings.database)
    try:
        index = PatientIndex(db, Store(db))
        out = {}
        for person in provider_people(CONFIG):
            found = await index.find(nhs_number=person.nhs_number)
            links = found.links if found else ()
            out[person.nhs_number] = tuple(
                link.status for link in links
                if link.provider == CONFIG.id and link.value == person.local_id
            )  # fmt: skip
        return out
    finally:
        await db.close()


def _lines(stream: Any) -> queue.Queue[str]:
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return lines


def test_cli_provider_waits_for_the_hub_then_registers_everyone(
    settings: Settings, tmp_path: Path
) -> None:
    pem = tmp_path / "reg-pas.pem"
    pem.write_bytes(generate_key("ES384").as_pem(private=True))  # PKCS#8, no kid
    key = load_private_key(pem)  # what the CLI does: kid = the key's JWK thumbprint
    with SimulatorServer(create_pds_app(PEOPLE, CONFIG.seed)) as pds:
        env = {
            "SHAREDCARE_DATABASE_URL": settings.database,
            "SHAREDCARE_DATA_DIR": str(settings.data_dir),
            "SHAREDCARE_PDS_BASE_URL": pds.url,
        }
        hub = SlowStartHub(env)
        asyncio.run(_register_system(settings, hub.url, key))
        provider = subprocess.Popen(
            [sys.executable, "-m", "sharedcare.cli", "simulate", "provider", "--id", CONFIG.id,
             "--people", str(PEOPLE), "--resource-bytes", "0", "--port", "0",
             "--register-with", hub.url, "--key", str(pem)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env={**os.environ},
        )  # fmt: skip
        try:
            assert provider.stderr is not None
            lines = _lines(provider.stderr)
            time.sleep(1.0)  # the provider is up and retrying against a hub that is not there
            with hub:
                seen = []
                deadline = time.monotonic() + 60
                while not any("Registration" in line for line in seen):
                    assert time.monotonic() < deadline, "".join(seen)
                    try:
                        seen.append(lines.get(timeout=1))
                    except queue.Empty:
                        pass
                assert any("Registration done" in line for line in seen), "".join(seen)
                assert any(f"registered {len(provider_people(CONFIG))}/" in line for line in seen)
                # PDS knows the same seed's people, so the hub verifies every registration.
                deadline = time.monotonic() + 30
                while True:
                    state = asyncio.run(_index_state(settings))
                    if all(statuses == ("verified",) for statuses in state.values()):
                        break
                    assert time.monotonic() < deadline, state
                    time.sleep(0.5)
        finally:
            provider.terminate()
            provider.wait(15)
            if provider.stderr:
                provider.stderr.close()


def test_rejections_are_reported_and_an_absent_hub_is_waited_for_a_bounded_time(
    settings: Settings,
) -> None:
    key = generate_key("ES384", kid="reg-pas-1")
    foreign = ProviderConfig(id=CONFIG.id, people=4, identifier_system="https://other.example/Id")
    hub = SlowStartHub(
        {
            "SHAREDCARE_DATABASE_URL": settings.database,
            "SHAREDCARE_DATA_DIR": str(settings.data_dir),
        }
    )

    async def run() -> None:
        began = time.monotonic()
        with pytest.raises(RegistrationError, match="not ready within 1 s"):
            await register_people(
                CONFIG, hub.url, SmartToken(hub.url, CONFIG.id, key), ready_timeout=1
            )
        assert time.monotonic() - began < 5
        await _register_system(settings, hub.url, key)

    asyncio.run(run())
    with hub:

        async def feed() -> None:
            token = SmartToken(f"{hub.url}/fhir", CONFIG.id, key)  # a FHIR base works too
            with pytest.raises(RegistrationError) as refused:
                await register_people(foreign, hub.url, token)
            assert refused.value.registered == 0
            assert len(refused.value.failures) == len(provider_people(foreign))
            assert all(reason.startswith("403") for _, reason in refused.value.failures)
            done: list[tuple[int, int]] = []
            count = await register_people(
                CONFIG, hub.url, token, progress=lambda d, t: done.append((d, t))
            )
            assert count == len(provider_people(CONFIG)) == done[-1][0] == done[-1][1]

        asyncio.run(feed())


def test_feed_body_follows_the_contract() -> None:
    person = provider_people(CONFIG)[0]
    body = pixm_patient(person, CONFIG.identifier_system)
    assert body == {
        "resourceType": "Patient",
        "identifier": [
            {"system": CONFIG.identifier_system, "value": person.local_id},
            {"system": "https://fhir.nhs.uk/Id/nhs-number", "value": person.nhs_number},
        ],
        "name": [{"family": person.family, "given": list(person.given)}],
        "gender": person.gender,
        "birthDate": person.birth_date,
        "address": [{"postalCode": person.postal_code}],
    }


@pytest.mark.parametrize("alg", ["ES384", "RS384"])
@pytest.mark.parametrize("form", ["pem", "jwk"])
def test_keys_load_from_pem_or_jwk_files(tmp_path: Path, alg: Any, form: str) -> None:
    import json

    key = generate_key(alg, kid="given-kid")
    path = tmp_path / f"key.{form}"
    if form == "pem":
        path.write_bytes(key.as_pem(private=True))
    else:
        path.write_text(json.dumps(key.as_dict(private=True)))
    loaded = load_private_key(path)
    assert loaded.get("alg") == alg
    assert loaded.kid == ("given-kid" if form == "jwk" else key.thumbprint())
    assert load_private_key(path, kid="other").kid == "other"
    assert loaded.as_dict(private=True)["d"] == key.as_dict(private=True)["d"]


@pytest.mark.parametrize("content", [b"hello", b"{}", b'{"kty": "EC"}'])
def test_unreadable_keys_are_explained(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="private key"):
        load_private_key(path)
