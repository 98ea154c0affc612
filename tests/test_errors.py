"""Every error has one shape: a 4xx ``application/fhir+json`` OperationOutcome a person can act on.

One table of client errors, one shape assertion; each case also checks that nothing was
written. The 500 case runs on a fresh app with a test-only route that raises.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from helpers import FHIR_JSON, patient
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from sharedcare.app import create_app
from sharedcare.settings import Settings

LIMIT = 2 * 1024 * 1024  # the settings fixture's max_body_bytes


def assert_outcome(response: httpx.Response, status: int, expression: str | None = None) -> dict[str, Any]:
    """The one error shape: status, FHIR JSON, OperationOutcome, issues a person can act on."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"], outcome
    for issue in outcome["issue"]:
        assert issue["severity"] in ("fatal", "error", "warning", "information")
        assert issue["code"]
        assert isinstance(issue["diagnostics"], str) and len(issue["diagnostics"].strip()) > 10
    if expression is not None:
        found = [e for issue in outcome["issue"] for e in issue.get("expression", [])]
        assert expression in found, found
    return outcome


async def totals(client: httpx.AsyncClient) -> dict[str, int]:
    """How many Patients and Organizations the store holds."""
    out = {}
    for rtype in ("Patient", "Organization"):
        response = await client.get(f"/fhir/{rtype}?_count=0")
        assert response.status_code == 200, response.text
        out[rtype] = response.json()["total"]
    return out


async def _chunked_oversize() -> AsyncIterator[bytes]:
    """A streamed body (no Content-Length) that grows past the limit."""
    chunk = b" " * (256 * 1024)
    for _ in range(LIMIT // len(chunk) + 2):
        yield chunk


@dataclass(frozen=True)
class Case:
    method: str
    url: str
    status: int
    json: Any = None
    content: bytes | Callable[[], Any] | None = None
    headers: dict[str, str] = field(default_factory=lambda: dict(FHIR_JSON))
    expression: str | None = None

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"headers": self.headers}
        if self.json is not None:
            out["json"] = self.json
        if self.content is not None:
            out["content"] = self.content() if callable(self.content) else self.content
        return out


CASES = {
    "invalid JSON": Case("POST", "/fhir/Patient", 400, content=b'{"resourceType": "Patient",'),
    "empty body": Case("POST", "/fhir/Patient", 400, content=b""),
    "body is a JSON array": Case("POST", "/fhir/Patient", 400, json=[patient()]),
    "unknown type: search": Case("GET", "/fhir/Foo", 404),
    "unknown type: read": Case("GET", "/fhir/Foo/1", 404),
    "unknown type: create": Case("POST", "/fhir/Foo", 404, json={"resourceType": "Foo"}),
    "resourceType differs from URL": Case(
        "POST", "/fhir/Patient", 400, json={"resourceType": "Organization", "name": "X"}
    ),
    "id differs from URL on PUT": Case(
        "PUT", "/fhir/Patient/a", 400, json={**patient(), "id": "b"}, expression="Patient.id"
    ),
    "invalid date": Case(
        "POST", "/fhir/Patient", 422, json={"resourceType": "Patient", "birthDate": "not-a-date"},
        expression="Patient.birthDate",
    ),
    "unknown element": Case(
        "POST", "/fhir/Patient", 422, json={**patient(), "foo": 1}, expression="Patient.foo"
    ),
    "code outside required binding": Case(
        "POST", "/fhir/Patient", 422, json={**patient(), "gender": "blue"}, expression="Patient.gender"
    ),
    "string where a boolean belongs": Case(
        "POST", "/fhir/Patient", 422, json={**patient(), "active": "yes"}, expression="Patient.active"
    ),
    "nested invalid element": Case(
        "POST", "/fhir/Patient", 422, json={**patient(), "name": [{"given": "Jo"}]},
        expression="Patient.name[0].given",
    ),
    "If-None-Exist without criteria": Case(
        "POST", "/fhir/Patient", 400, json=patient(), headers={**FHIR_JSON, "If-None-Exist": "_count=1"}
    ),
    "If-None-Exist with unknown parameter": Case(
        "POST", "/fhir/Patient", 400, json=patient(), headers={**FHIR_JSON, "If-None-Exist": "nonsense=1"}
    ),
    "unsupported search parameter (strict)": Case("GET", "/fhir/Patient?foo=1", 400),
    "bad _count": Case("GET", "/fhir/Patient?_count=many", 400),
    "body over limit (Content-Length)": Case("POST", "/fhir/Patient", 413, content=b" " * (LIMIT + 1)),
    "body over limit (chunked stream)": Case("POST", "/fhir/Patient", 413, content=_chunked_oversize),
    "wrong Content-Type": Case(
        "POST", "/fhir/Patient", 415, content=b"{}", headers={"Content-Type": "text/plain"}
    ),
    "no Content-Type": Case("POST", "/fhir/Patient", 415, content=b"{}", headers={}),
    "unknown route": Case("GET", "/no/such/route", 404),
    "wrong method": Case("PATCH", "/fhir/Patient/1", 405, json=patient()),
    "wrong method on type": Case("DELETE", "/fhir/Patient", 405),
}


@pytest.mark.parametrize("case", CASES.values(), ids=list(CASES))
async def test_client_errors_are_operation_outcomes(client: httpx.AsyncClient, case: Case) -> None:
    before = await totals(client)
    response = await client.request(case.method, case.url, **case.kwargs())
    assert_outcome(response, case.status, case.expression)
    assert await totals(client) == before  # nothing was written


async def test_chunked_body_really_was_streamed(client: httpx.AsyncClient) -> None:
    """The chunked case above must not carry a Content-Length, or it tests nothing new."""
    seen: dict[str, str] = {}

    async def record(request: httpx.Request) -> None:
        seen.update(request.headers)

    client.event_hooks["request"].append(record)
    response = await client.post("/fhir/Patient", content=_chunked_oversize(), headers=FHIR_JSON)
    assert_outcome(response, 413)
    assert "content-length" not in seen and seen.get("transfer-encoding") == "chunked"


async def test_wrong_method_names_every_allowed_method(client: httpx.AsyncClient) -> None:
    response = await client.patch("/fhir/Patient/1", json=patient(), headers=FHIR_JSON)
    assert_outcome(response, 405)
    assert {m.strip() for m in response.headers["Allow"].split(",")} >= {"GET", "PUT", "DELETE"}


async def test_lenient_search_ignores_unknown_parameter_with_a_warning(client: httpx.AsyncClient) -> None:
    response = await client.get("/fhir/Patient?foo=1", headers={"Prefer": "handling=lenient"})
    assert response.status_code == 200
    bundle = response.json()
    outcomes = [e["resource"] for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
    assert outcomes and outcomes[0]["issue"][0]["severity"] == "warning"
    assert "foo" in outcomes[0]["issue"][0]["diagnostics"]


async def test_server_error_hides_internals_and_carries_the_request_id(settings: Settings) -> None:
    app = create_app(settings)

    async def boom(request: Request) -> Response:
        raise RuntimeError("secret-internal-detail at /srv/sharedcare/db.py line 42")

    app.router.routes.append(Route("/test-only/boom", boom))
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with app.router.lifespan_context(app), httpx.AsyncClient(
        transport=transport, base_url="http://testserver"
    ) as http:
        response = await http.get("/test-only/boom", headers={"X-Request-ID": "req-boom-1"})
        generated = await http.get("/test-only/boom")
    outcome = assert_outcome(response, 500)
    assert "secret-internal-detail" not in response.text and "db.py" not in response.text
    assert "RuntimeError" not in response.text and "Traceback" not in response.text
    assert "req-boom-1" in outcome["issue"][0]["diagnostics"]
    assert response.headers["X-Request-ID"] == "req-boom-1"
    request_id = generated.headers["X-Request-ID"]
    assert request_id and request_id in generated.json()["issue"][0]["diagnostics"]


async def test_a_lost_database_connection_is_503_with_retry_after_then_recovers(
    backend: str, app: Any, client: httpx.AsyncClient
) -> None:
    """PostgreSQL restarted under a running hub (here: every connection of the hub's database
    terminated): the requests that meet a dead connection get a 503 a client can retry,
    never a 500, and the hub serves again once its pool has reconnected."""
    if backend != "postgresql":
        pytest.skip("terminates PostgreSQL server processes")
    import asyncpg
    from sqlalchemy import make_url

    org = {"resourceType": "Organization", "name": "Leeds Teaching Hospitals"}
    created = await client.post("/fhir/Organization", json=org, headers=FHIR_JSON)
    assert created.status_code == 201, created.text
    url = f"/fhir/Organization/{created.json()['id']}"
    dsn = make_url(app.state.db.url).set(drivername="postgresql").render_as_string(False)
    killer = await asyncpg.connect(dsn)
    try:
        killed = await killer.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    finally:
        await killer.close()
    assert killed >= 1
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    statuses: list[int] = []
    async with httpx.AsyncClient(
        transport=transport, base_url=str(client.base_url), headers=client.headers
    ) as http:
        for _ in range(30):
            answer = await http.get(url)
            statuses.append(answer.status_code)
            if answer.status_code == 200:
                break
            outcome = assert_outcome(answer, 503)
            assert answer.headers["Retry-After"] == "1"
            assert "Retry shortly" in outcome["issue"][0]["diagnostics"]
    assert statuses[0] == 503 and statuses[-1] == 200, statuses
