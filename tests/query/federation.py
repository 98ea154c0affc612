"""Shared values and helpers of the federated query tests (fixtures are in conftest.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from sharedcare.simulators.pds import SimulatorServer
from sharedcare.simulators.provider import ProviderServer, provider_people

PEOPLE = 10
PROVIDER_IDS = ("leeds-pas", "gp-b86001", "community-rxf")
NAMES = {
    "leeds-pas": "Leeds PAS",
    "gp-b86001": "Example Medical Practice",
    "community-rxf": "Mid Yorks Community",
}
CONSUMER = "portal"
NHS = "https://fhir.nhs.uk/Id/nhs-number"
BASE = "http://testserver"
CLEAR_FAULTS = {
    "latency_ms": [0, 0],
    "error_rate": 0,
    "timeout_rate": 0,
    "malformed_rate": 0,
    "hang_s": 30,
}
END_USER = {
    "requesting_user": {"id": "C123456", "name": "Dr Ann Example", "role": "R8000"},
    "requesting_organization": "RR8",
    "reason_for_access": "TREAT",
}


@dataclass
class Federated:
    """The hub (over ASGI), its consumer client, and the running providers."""

    app: Any
    http: httpx.AsyncClient
    providers: dict[str, ProviderServer]
    pds: SimulatorServer

    def people_at(self, *providers: str) -> list[str]:
        """NHS numbers of people held by exactly these providers."""
        held: dict[str, set[str]] = {}
        for pid, server in self.providers.items():
            for person in provider_people(server.config):
                held.setdefault(person.nhs_number, set()).add(pid)
        return [n for n, where in held.items() if where == set(providers)]

    def local_id(self, provider: str, nhs: str) -> str:
        return next(
            p.local_id
            for p in provider_people(self.providers[provider].config)
            if p.nhs_number == nhs
        )

    async def search(
        self, rtype: str, nhs: str, *extra: tuple[str, str], **kwargs: Any
    ) -> httpx.Response:
        params = [("patient.identifier", f"{NHS}|{nhs}"), *extra]
        return await self.http.get(f"/fhir/{rtype}", params=params, **kwargs)

    async def requests_seen(self, provider: str) -> list[Any]:
        """What the provider was asked, oldest first."""
        async with httpx.AsyncClient(timeout=5) as plain:
            r = await plain.get(f"{self.providers[provider].base_url}/_admin/requests")
        return list(r.json())

    def faults(self, provider: str, **faults: Any) -> None:
        r = httpx.put(f"{self.providers[provider].base_url}/_admin/faults", json=faults, timeout=5)
        assert r.status_code == 200, r.text


async def _token(
    http: httpx.AsyncClient, client_id: str, key: Any, scope: str, end_user: Any
) -> str:
    from sharedcare.iam.client import sign_assertion, token_form

    assertion = sign_assertion(key, client_id, f"{BASE}/oauth2/token", end_user=end_user)
    r = await http.post("/oauth2/token", data=token_form(assertion, scope))
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])
