"""FHIR R4 search (hl7.org/fhir/R4/search.html) through HTTP, on both databases.

A small named population is created through ``POST``; the tables below say, for each query,
exactly which of those resources (by the name given here) must match. ``{name}`` in a query
is replaced by the server-assigned id of that resource.

The tables only read, so they share one population per backend (:func:`population`: a
module-scoped app set up like conftest's ``client``, with the same admin system and a real
token, on its own SQLite file and its own PostgreSQL database so that conftest's per-test
TRUNCATE cannot touch it). Tests that write use the ordinary ``client`` fixture.
Registering the admin system writes ``Organization/test-admin`` and ``Endpoint/test-admin``;
they are part of the population as ``admin-org`` and ``admin-ep``.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import pytest_asyncio
from conftest import ADMIN_CLIENT_ID, ADMIN_SCOPES, END_USER, TEST_BASE, TOKEN_URL
from helpers import FHIR_JSON, nhs_number

from sharedcare.app import create_app
from sharedcare.iam.client import public_jwks, sign_assertion, token_form
from sharedcare.registry.model import new_system
from sharedcare.settings import Settings

NHS = "https://fhir.nhs.uk/Id/nhs-number"
LOCAL = "urn:test:local"
ODS = "https://fhir.nhs.uk/Id/ods-organization-code"
GMC = "https://fhir.hl7.org.uk/Id/gmc-number"
TAGS = "http://example.org/tags"
PROFILE = "http://example.org/StructureDefinition/special"

# --------------------------------------------------------------------------- population
# (name, builder): a builder gets the ids created so far, so later resources can refer to
# earlier ones. Every value below is chosen for a row of the tables that follow.


def _org_leeds(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Organization",
        "identifier": [{"system": ODS, "value": "ORG1"}],
        "active": True,
        "name": "Leeds General Practice",
        "telecom": [{"system": "phone", "value": "0113 000 0001"}],
        "address": [{"city": "Leeds"}],
    }


def _org_york(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Organization",
        "identifier": [{"system": ODS, "value": "ORG2"}],
        "active": True,
        "name": "York Health Centre, North",
        "partOf": {"reference": f"Organization/{ids['leeds']}"},
        "address": [{"city": "York"}],
    }


def _pr_ada(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": GMC, "value": "P1"}],
        "active": True,
        "name": [{"family": "Lovelace", "given": ["Ada"]}],
        "gender": "female",
        "telecom": [{"system": "email", "value": "ada@example.org"}],
    }


def _pr_bob(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "identifier": [{"system": GMC, "value": "P2"}],
        "active": False,
        "name": [{"family": "Brown", "given": ["Bob"]}],
        "gender": "male",
    }


def _role(practitioner: str, org: str, period: dict[str, str]) -> Any:
    def build(ids: dict[str, str]) -> dict[str, Any]:
        return {
            "resourceType": "PractitionerRole",
            "practitioner": {"reference": f"Practitioner/{ids[practitioner]}"},
            "organization": {"reference": f"Organization/{ids[org]}"},
            "period": period,
        }

    return build


def _zoe(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "meta": {"tag": [{"system": TAGS, "code": "vip"}]},
        "identifier": [{"system": NHS, "value": nhs_number(1)}],
        "active": True,
        "name": [{"family": "Ödegård", "given": ["Zoë"]}],
        "telecom": [
            {"system": "phone", "value": "0113 496 0000"},
            {"system": "email", "value": "zoe@example.org"},
        ],
        "gender": "female",
        "birthDate": "1980-02-29",
        "address": [{"city": "Leeds"}],
        "managingOrganization": {"reference": f"Organization/{ids['leeds']}"},
        "generalPractitioner": [{"reference": f"Practitioner/{ids['ada']}"}],
    }


def _jose(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [
            {"system": NHS, "value": nhs_number(2)},
            {"system": LOCAL, "value": "L-2"},
        ],
        "active": False,
        "name": [{"family": "Núñez", "given": ["José"]}],
        "gender": "male",
        "birthDate": "1980-03",
        "address": [{"city": "York"}],
        "managingOrganization": {"reference": f"Organization/{ids['york']}"},
    }


def _anna(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"system": LOCAL, "value": "L-3"}],
        "name": [{"family": "Smith", "given": ["Anna"]}],
        "gender": "female",
        "birthDate": "1979",
        "deceasedDateTime": "2020-05-01T10:00:00Z",
    }


def _annabel(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "name": [{"family": "Smythe", "given": ["Annabel"]}],
        "telecom": [{"system": "phone", "value": "0113 496 0001"}],
        "gender": "other",
        "birthDate": "2001-07-15",
        # an absolute reference to this server matches Organization/{id} and {id}
        "managingOrganization": {"reference": f"http://testserver/fhir/Organization/{ids['leeds']}"},
        "generalPractitioner": [{"reference": f"PractitionerRole/{ids['role-ada']}"}],
    }


def _bo(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "identifier": [{"value": "X-5"}],  # no system
        "name": [{"family": "Ng", "given": ["Bo"], "text": "Ng 😀 Bo"}],
    }


def _emile(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Patient",
        "meta": {"profile": [PROFILE]},
        "identifier": [{"system": "urn:oid:1.2.3", "value": "a|b"}],
        "name": [{"family": "D'Arcy", "given": ["Émile"]}],
        "gender": "unknown",
        "birthDate": "1980-02-28",
        "deceasedBoolean": False,
    }


def _consent(status: str, patient: str, period: dict[str, str], when: str) -> Any:
    def build(ids: dict[str, str]) -> dict[str, Any]:
        return {
            "resourceType": "Consent",
            "status": status,
            "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
            "patient": {"reference": f"Patient/{ids[patient]}"},
            "dateTime": when,
            "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "OPTIN"}]},
            "provision": {"type": "permit", "period": period},
        }

    return build


def _provenance(targets: list[str], recorded: str, agent: str) -> Any:
    def build(ids: dict[str, str]) -> dict[str, Any]:
        return {
            "resourceType": "Provenance",
            "target": [{"reference": t.format(**ids)} for t in targets],
            "recorded": recorded,
            "agent": [{"who": {"reference": agent.format(**ids)}}],
        }

    return build


def _document(status: str, subject: str, date: str, period: dict[str, str], text: str) -> Any:
    def build(ids: dict[str, str]) -> dict[str, Any]:
        return {
            "resourceType": "DocumentReference",
            "status": status,
            "subject": {"reference": f"Patient/{ids[subject]}"},
            "date": date,
            "description": text,
            "content": [{"attachment": {"contentType": "text/plain", "url": "http://example.org/doc"}}],
            "context": {"period": period},
        }

    return build


POPULATION: list[tuple[str, Any]] = [
    ("leeds", _org_leeds),
    ("york", _org_york),
    ("ada", _pr_ada),
    ("bob", _pr_bob),
    # PractitionerRole.period is the `date` parameter: a closed and an open-ended Period.
    ("role-ada", _role("ada", "leeds", {"start": "2020-01-01", "end": "2020-12-31"})),
    ("role-bob", _role("bob", "york", {"start": "2021-06-01"})),
    ("zoe", _zoe),
    ("jose", _jose),
    ("anna", _anna),
    ("annabel", _annabel),
    ("bo", _bo),
    ("emile", _emile),
    # Consent.provision.period is the `period` parameter: closed, open end, open start.
    ("c-2020", _consent("active", "zoe", {"start": "2020-01-01", "end": "2020-12-31"}, "2020-01-15T10:00:00Z")),
    ("c-open", _consent("active", "jose", {"start": "2021-06-01"}, "2021-06-01T09:00:00+01:00")),
    ("c-old", _consent("inactive", "zoe", {"end": "2019-05-31"}, "2019-05-31")),
    (
        "prov-1",
        _provenance(["Patient/{zoe}", "Patient/{jose}"], "2024-01-01T12:00:00Z", "Practitioner/{ada}"),
    ),
    ("prov-2", _provenance(["Organization/{leeds}"], "2024-02-01T12:00:00Z", "Practitioner/{bob}")),
    # DocumentReference.context.period is the `period` parameter (the end has day precision).
    (
        "doc-1",
        _document(
            "current", "zoe", "2024-03-01T10:00:00Z", {"start": "2024-02-01", "end": "2024-02-29"},
            "Discharge summary",
        ),
    ),
    (
        "doc-2",
        _document(
            "superseded", "annabel", "2024-03-12T10:00:00+02:00",
            {"start": "2024-02-15T10:00:00+02:00", "end": "2024-03-10"}, "Clinic letter 50%_off",
        ),
    ),
]


def _endpoint(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Endpoint",
        "status": "active",
        "connectionType": {
            "system": "http://terminology.hl7.org/CodeSystem/endpoint-connection-type",
            "code": "hl7-fhir-rest",
        },
        "name": "GP Connect",
        "managingOrganization": {"reference": f"Organization/{ids['leeds']}"},
        "payloadType": [{"text": "any"}],
        "address": "https://gp.example.org/fhir",
    }


def _subscription(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "status": "active",
        "reason": "Watch Leeds patients",
        "criteria": f"Patient?organization=Organization/{ids['leeds']}",
        "channel": {"type": "rest-hook", "endpoint": "https://hooks.example.org/x"},
    }


def _audit(ids: dict[str, str]) -> dict[str, Any]:
    return {
        "resourceType": "AuditEvent",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110110"},
        "action": "R",
        "recorded": "2024-04-01T09:30:00Z",
        "outcome": "0",
        "agent": [{"requestor": True, "who": {"reference": f"Practitioner/{ids['ada']}"}}],
        "source": {"observer": {"reference": f"Organization/{ids['leeds']}"}},
        "entity": [{"what": {"reference": f"Patient/{ids['zoe']}"}}],
    }


POPULATION += [("ep", _endpoint), ("sub", _subscription), ("audit", _audit)]

# Groups written with a fixed clock, so `_lastUpdated` can be tested at exact boundaries.
# Insertion order (g-d, g-b, g-a, g-c) differs from time order (g-a, g-b, g-c, g-d).
CLOCK: list[tuple[str, datetime, str, list[str]]] = [
    ("g-d", datetime(2024, 5, 2, 0, 0, 0), "animal", []),
    ("g-b", datetime(2024, 5, 1, 10, 0, 0, 500000), "person", ["jose"]),
    ("g-a", datetime(2024, 5, 1, 10, 0, 0), "person", ["zoe"]),
    ("g-c", datetime(2024, 5, 1, 11, 0, 0), "person", ["zoe", "anna"]),
]
BULK = 1001  # Binaries, for _count's default and cap
BASE = TEST_BASE


def _group(kind: str, members: list[str], ids: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {"resourceType": "Group", "type": kind, "actual": True}
    if members:
        body["member"] = [{"entity": {"reference": f"Patient/{ids[m]}"}} for m in members]
    if kind == "animal":
        body["managingEntity"] = {"reference": f"Organization/{ids['leeds']}"}
    return body


async def create(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    response = await client.post(f"/fhir/{body['resourceType']}", json=body, headers=FHIR_JSON)
    assert response.status_code == 201, response.text
    return response.json()


@dataclass(frozen=True)
class Population:
    client: httpx.AsyncClient
    ids: dict[str, str]  # name -> id, for the {name} placeholders
    names: dict[str, str]  # "Type/id" -> name, to read results back


async def _populate_all(app: Any, client: httpx.AsyncClient) -> Population:
    ids = {"admin-org": ADMIN_CLIENT_ID, "admin-ep": ADMIN_CLIENT_ID}
    names = {f"Organization/{ADMIN_CLIENT_ID}": "admin-org", f"Endpoint/{ADMIN_CLIENT_ID}": "admin-ep"}

    async def add(name: str, body: dict[str, Any]) -> None:
        ids[name] = (await create(client, body))["id"]
        names[f"{body['resourceType']}/{ids[name]}"] = name

    for name, build in POPULATION:
        await add(name, build(ids))
    for name, when, kind, members in CLOCK:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("sharedcare.store.repository.now_utc", lambda when=when: when)
            await add(name, _group(kind, members, ids))
    store = app.state.fhir.store
    # One validated body, written BULK times (create_many_in gives each its own id).
    binary = store.prepare("Binary", {"resourceType": "Binary", "contentType": "text/plain", "data": "eA=="})
    items = [(binary, None)] * BULK
    await store.db.write(lambda conn: store.create_many_in(conn, items))
    return Population(client, ids, names)


async def _authorize(app: Any, http: httpx.AsyncClient, key: Any) -> None:
    """Make ``http`` what conftest's ``client`` is: the admin system, with a real token."""
    await app.state.iam.registry.add(
        new_system(
            client_id=ADMIN_CLIENT_ID,
            kind="consumer",
            name=f"{ADMIN_CLIENT_ID} system",
            scopes=ADMIN_SCOPES,
            jwks=public_jwks(key),
        )
    )
    assertion = sign_assertion(key, ADMIN_CLIENT_ID, TOKEN_URL, end_user=END_USER)
    response = await http.post("/oauth2/token", data=token_form(assertion, ADMIN_SCOPES))
    assert response.status_code == 200, response.text
    http.headers["Authorization"] = f"Bearer {response.json()['access_token']}"


@pytest_asyncio.fixture(scope="module", params=["sqlite", "postgresql"])
async def population(
    request: pytest.FixtureRequest,
    pg_database: str | None,
    admin_key: Any,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Population]:
    """One app per backend, populated once for the module."""
    tmp: Path = tmp_path_factory.mktemp("search")
    own_db: str | None = None
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp / 'hub.db'}"
    else:
        if pg_database is None:
            pytest.skip("PostgreSQL unreachable (CI would fail here; see conftest)")
        base, _, name = pg_database.rpartition("/")
        own_db = f"{name}_search_{uuid.uuid4().hex[:6]}"
        await _admin(pg_database, f'CREATE DATABASE "{own_db}"')
        url = f"{base}/{own_db}"
    settings = Settings(
        database_url=url,
        data_dir=tmp / "data",
        base_url=BASE,
        default_page_size=50,
        max_page_size=1000,
        max_body_bytes=2 * 1024 * 1024,
        hub_key_alg="ES384",  # as conftest: quick to generate
    )
    try:
        app = create_app(settings)
        transport = httpx.ASGITransport(app=app)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url=BASE) as client,
        ):
            await _authorize(app, client, admin_key)
            yield await _populate_all(app, client)
    finally:
        if own_db is not None:
            await _admin(pg_database or "", f'DROP DATABASE IF EXISTS "{own_db}" WITH (FORCE)')


async def _admin(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1), timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def query_items(query: str, ids: dict[str, str]) -> list[tuple[str, str]]:
    """``a=1&b:x=2`` -> [(a, 1), (b:x, 2)] with ``{name}`` replaced by ids (httpx encodes)."""
    items = []
    for part in query.split("&"):
        key, _, value = part.partition("=")
        items.append((key, value.format(**ids)))
    return items


def entry_names(bundle: dict[str, Any], pop: Population, mode: str = "match") -> list[str]:
    """The population names of the entries in ``mode`` (unknown ones as Type/id), in order."""
    found = [
        f"{e['resource']['resourceType']}/{e['resource']['id']}"
        for e in bundle.get("entry", [])
        if e["search"]["mode"] == mode
    ]
    assert len(found) == len(set(found)), f"duplicate entries: {found}"
    return [pop.names.get(ref, ref) for ref in found]


def matches(bundle: dict[str, Any], pop: Population, mode: str = "match") -> set[str]:
    return set(entry_names(bundle, pop, mode))


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((x["url"] for x in bundle.get("link", []) if x["relation"] == relation), None)


async def search(client: httpx.AsyncClient, rtype: str, query: str, ids: dict[str, str], **kw: Any) -> Any:
    return await client.get(f"/fhir/{rtype}", params=query_items(query, ids) if query else None, **kw)


def outcome(response: httpx.Response, status: int = 400) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    issue = body["issue"][0]
    assert issue["severity"] == "error" and issue["diagnostics"]
    return str(issue["diagnostics"])


PATIENTS = {"zoe", "jose", "anna", "annabel", "bo", "emile"}

# (resource type, query, names expected to match)
SEARCH_TABLE: list[tuple[str, str, set[str]]] = [
    # --- token: code, system|code, |code, system|; OR with commas; :not; :missing -------
    ("Patient", "gender=female", {"zoe", "anna"}),
    ("Patient", "gender=female,male", {"zoe", "anna", "jose"}),
    ("Patient", "gender:not=female", {"jose", "annabel", "bo", "emile"}),
    ("Patient", "gender:not=female,unknown", {"jose", "annabel", "bo"}),
    ("Patient", "gender:missing=true", {"bo"}),
    ("Patient", "gender:missing=false", PATIENTS - {"bo"}),
    ("Patient", "gender=Female", set()),  # codes are case-sensitive
    ("Patient", f"identifier={NHS}|{nhs_number(1)}", {"zoe"}),
    ("Patient", f"identifier={nhs_number(2)}", {"jose"}),
    ("Patient", f"identifier={LOCAL}|", {"jose", "anna"}),
    ("Patient", f"identifier={NHS}|", {"zoe", "jose"}),
    ("Patient", "identifier=|X-5", {"bo"}),
    ("Patient", "identifier=X-5", {"bo"}),
    ("Patient", "identifier=|L-3", set()),  # L-3 has a system
    ("Patient", f"identifier={LOCAL}|L-3,{NHS}|{nhs_number(1)}", {"anna", "zoe"}),
    ("Patient", r"identifier=urn:oid:1.2.3|a\|b", {"emile"}),  # escaped "|" in the code
    ("Patient", f"identifier:not={NHS}|", {"anna", "annabel", "bo", "emile"}),
    ("Patient", "identifier:missing=true", {"annabel"}),
    ("Patient", "phone=0113 496 0000", {"zoe"}),
    ("Patient", "telecom=0113 496 0001,zoe@example.org", {"annabel", "zoe"}),
    ("Patient", "email=zoe@example.org", {"zoe"}),
    ("Patient", "email=0113 496 0000", set()),
    ("Patient", "active=true", {"zoe"}),
    ("Patient", "active=false", {"jose"}),
    ("Patient", "active:missing=true", {"anna", "annabel", "bo", "emile"}),
    ("Patient", "deceased=true", {"anna"}),
    ("Patient", "deceased=false", PATIENTS - {"anna"}),  # absent deceased is false too
    ("Patient", f"_tag={TAGS}|vip", {"zoe"}),
    ("Patient", "_tag:missing=false", {"zoe"}),
    ("Practitioner", "gender=male", {"bob"}),
    ("Practitioner", "active=false", {"bob"}),
    ("Practitioner", "email=ada@example.org", {"ada"}),
    ("Practitioner", f"identifier={GMC}|P2", {"bob"}),
    ("Organization", f"identifier={ODS}|ORG2", {"york"}),
    ("Consent", "status=active", {"c-2020", "c-open"}),
    ("Consent", "status:not=active", {"c-old"}),
    ("DocumentReference", "status=current,superseded", {"doc-1", "doc-2"}),
    # --- string: prefix, case- and accent-insensitive; :exact; :contains -----------------
    ("Patient", "name=zoe", {"zoe"}),
    ("Patient", "name=ZOË", {"zoe"}),
    ("Patient", "family=odegard", {"zoe"}),
    ("Patient", "family=Ödegård", {"zoe"}),
    ("Patient", "given=jos", {"jose"}),
    ("Patient", "name=ann", {"anna", "annabel"}),
    ("Patient", "name=anna", {"anna", "annabel"}),
    ("Patient", "name=annab", {"annabel"}),
    ("Patient", "family=sm", {"anna", "annabel"}),
    ("Patient", "family=smith,ng", {"anna", "bo"}),
    ("Patient", "name=d'arcy", {"emile"}),
    ("Patient", "name=emile", {"emile"}),
    ("Patient", "name=ng 😀", {"bo"}),  # beyond the BMP, below the prefix bound U+10FFFF
    ("Patient", "name=ng 😀 bo", {"bo"}),
    ("Patient", "name=ng 😃", set()),
    ("Patient", "name=dego", set()),  # a prefix, not a substring
    ("Patient", "name:exact=Anna", {"anna"}),
    ("Patient", "name:exact=anna", set()),
    ("Patient", "name:exact=Zoë", {"zoe"}),
    ("Patient", "name:exact=Zoe", set()),
    ("Patient", "name:exact=Ann", set()),
    ("Patient", "name:contains=egar", {"zoe"}),
    ("Patient", "name:contains=NN", {"anna", "annabel"}),
    ("Patient", "name:contains=ÑE", {"jose"}),
    ("Patient", "name:contains=%", set()),  # LIKE wildcards are escaped
    ("Patient", "name:contains=_", set()),
    ("Patient", "name:missing=true", set()),
    ("Patient", "address-city=leeds", {"zoe"}),
    ("Patient", "address-city:missing=true", {"anna", "annabel", "bo", "emile"}),
    ("Patient", "name=anna&name=smith", {"anna"}),  # repeated parameters AND
    ("Patient", "name=anna&family=smythe", {"annabel"}),
    ("Patient", "name=anna&family=ng", set()),
    ("Organization", "name=leeds", {"leeds"}),
    ("Organization", "name=york health centre\\, n", {"york"}),  # escaped comma
    ("Organization", "name=york health centre,leeds", {"york", "leeds"}),
    ("Organization", "name:contains=health", {"york"}),
    ("Organization", "address-city=york", {"york"}),
    ("Practitioner", "family=lovelace", {"ada"}),
    ("Practitioner", "name=b", {"bob"}),
    ("DocumentReference", "description=discharge", {"doc-1"}),
    ("DocumentReference", "description:contains=50%_", {"doc-2"}),
    ("DocumentReference", "description:contains=0%x", set()),
    # --- reference: Type/id, id, absolute URL, type modifier, :missing -------------------
    ("Patient", "organization=Organization/{leeds}", {"zoe", "annabel"}),
    ("Patient", "organization={leeds}", {"zoe", "annabel"}),
    ("Patient", "organization=http://testserver/fhir/Organization/{leeds}", {"zoe", "annabel"}),
    ("Patient", "organization=Organization/{leeds}/_history/1", {"zoe", "annabel"}),
    ("Patient", "organization:Organization={york}", {"jose"}),
    ("Patient", "organization=Organization/{york},{leeds}", {"jose", "zoe", "annabel"}),
    ("Patient", "organization=Practitioner/{leeds}", set()),
    ("Patient", "organization=http://elsewhere.example/fhir/Organization/{leeds}", set()),
    ("Patient", "organization:missing=true", {"anna", "bo", "emile"}),
    ("Patient", "general-practitioner={ada}", {"zoe"}),
    ("Patient", "general-practitioner:Practitioner={ada}", {"zoe"}),
    ("Patient", "general-practitioner:PractitionerRole={role-ada}", {"annabel"}),
    ("Patient", "general-practitioner:Practitioner={role-ada}", set()),
    ("Patient", "general-practitioner:missing=false", {"zoe", "annabel"}),
    ("Organization", "partof=Organization/{leeds}", {"york"}),
    ("Organization", "partof:missing=true", {"leeds", "admin-org"}),
    ("PractitionerRole", "practitioner={ada}", {"role-ada"}),
    ("PractitionerRole", "organization=Organization/{york}", {"role-bob"}),
    ("Consent", "patient=Patient/{zoe}", {"c-2020", "c-old"}),
    ("Consent", "patient:Patient={jose}", {"c-open"}),
    ("Provenance", "target=Patient/{zoe}", {"prov-1"}),
    ("Provenance", "target:Organization={leeds}", {"prov-2"}),
    ("Provenance", "target={jose}", {"prov-1"}),
    ("Provenance", "agent=Practitioner/{bob}", {"prov-2"}),
    ("Provenance", "patient=Patient/{jose}", {"prov-1"}),
    ("DocumentReference", "subject:Patient={zoe}", {"doc-1"}),
    ("DocumentReference", "patient={annabel}", {"doc-2"}),
    ("DocumentReference", "subject=Patient/{zoe}&status=superseded", set()),
    # --- uri ----------------------------------------------------------------------------------
    ("Patient", f"_profile={PROFILE}", {"emile"}),
    ("Patient", f"_profile={PROFILE}x", set()),
    ("Patient", "_profile:missing=true", PATIENTS - {"emile"}),
    # --- date: birthDate at each precision (zoe 1980-02-29, jose 1980-03, anna 1979,
    #     annabel 2001-07-15, emile 1980-02-28, bo none) --------------------------------------
    ("Patient", "birthdate=1980", {"zoe", "jose", "emile"}),
    ("Patient", "birthdate=eq1980-02", {"zoe", "emile"}),
    ("Patient", "birthdate=1980-02-29", {"zoe"}),
    ("Patient", "birthdate=1980-03", {"jose"}),
    ("Patient", "birthdate=1980-03-15", set()),  # a month is not within a day
    ("Patient", "birthdate=1980-02-29T12:00:00Z", set()),
    ("Patient", "birthdate=ne1980", {"anna", "annabel"}),
    ("Patient", "birthdate=lt1980", {"anna"}),
    ("Patient", "birthdate=lt1980-03-01", {"anna", "zoe", "emile"}),
    ("Patient", "birthdate=gt1980-02-28", {"zoe", "jose", "annabel"}),
    ("Patient", "birthdate=ge1980-03", {"jose", "annabel"}),
    ("Patient", "birthdate=ge1980-03-02", {"jose", "annabel"}),  # March overlaps what follows
    ("Patient", "birthdate=le1979", {"anna"}),
    ("Patient", "birthdate=le1980-02-28", {"anna", "emile"}),
    ("Patient", "birthdate=le1980-02-29", {"anna", "emile", "zoe"}),
    ("Patient", "birthdate=gt1979-06", {"anna", "zoe", "jose", "emile", "annabel"}),
    ("Patient", "birthdate=lt1979-06", {"anna"}),
    ("Patient", "birthdate=ge2001-07-15T00:00:00+02:00", {"annabel"}),
    ("Patient", "birthdate=lt2001-07-15T00:00:00Z", {"zoe", "jose", "anna", "emile"}),
    ("Patient", "birthdate=lt2001-07-15T00:00:01Z", {"zoe", "jose", "anna", "emile", "annabel"}),
    ("Patient", "birthdate=lt2001-07-15T01:00:00+02:00", {"zoe", "jose", "anna", "emile"}),
    ("Patient", "birthdate=lt2001-07-14T23:00:00-02:00", PATIENTS - {"bo"}),
    ("Patient", "birthdate=1980,2001", {"zoe", "jose", "emile", "annabel"}),
    ("Patient", "birthdate=ge1980&birthdate=lt1981", {"zoe", "jose", "emile"}),
    ("Patient", "birthdate:missing=true", {"bo"}),
    ("Patient", "death-date=2020-05", {"anna"}),
    ("Patient", "death-date=gt2020-05-01T10:00:00Z", set()),
    ("Patient", "death-date=ge2020-05-01T10:00:00Z", {"anna"}),
    # --- date on Period-valued elements ----------------------------------------------------
    # Consent.provision.period: c-2020 [2020-01-01, 2021-01-01), c-open [2021-06-01, ∞),
    # c-old (-∞, 2019-06-01)
    ("Consent", "period=2020", {"c-2020"}),
    ("Consent", "period=2020-06", set()),
    ("Consent", "period=ne2020", {"c-open", "c-old"}),
    ("Consent", "period=lt2020", {"c-old"}),
    ("Consent", "period=lt1900", {"c-old"}),
    ("Consent", "period=gt2020", {"c-open"}),
    ("Consent", "period=ge2020", {"c-2020", "c-open"}),
    ("Consent", "period=le2020", {"c-2020", "c-old"}),
    ("Consent", "period=gt2019-05-30", {"c-old", "c-2020", "c-open"}),
    ("Consent", "period=gt2019-05-31", {"c-2020", "c-open"}),
    ("Consent", "period=ge2300-01-01T00:00:00Z", {"c-open"}),
    ("Consent", "period:missing=false", {"c-2020", "c-open", "c-old"}),
    # Consent.dateTime (`date`): c-open is 2021-06-01T08:00:00Z, to the second
    ("Consent", "date=2021-06-01", {"c-open"}),
    ("Consent", "date=2021-06-01T08:00:00Z", {"c-open"}),
    ("Consent", "date=2021-06-01T09:00:00+01:00", {"c-open"}),
    ("Consent", "date=2021-06-01T10:00+02:00", {"c-open"}),  # minute precision
    ("Consent", "date=2021-06-01T09:00:00Z", set()),
    ("Consent", "date=ge2020-01-15T10:00:00Z", {"c-2020", "c-open"}),
    ("Consent", "date=gt2020-01-15T10:00:00Z", {"c-open"}),
    ("Consent", "date=le2020-01-15", {"c-2020", "c-old"}),
    # PractitionerRole.period (`date`): role-ada [2020-01-01, 2021-01-01), role-bob [2021-06-01, ∞)
    ("PractitionerRole", "date=2020", {"role-ada"}),
    ("PractitionerRole", "date=ge2022", {"role-bob"}),
    ("PractitionerRole", "date=lt2021", {"role-ada"}),
    ("PractitionerRole", "date=le2021-06-01", {"role-ada"}),
    ("PractitionerRole", "date=gt2020-12-31", {"role-bob"}),
    ("PractitionerRole", "date=gt2020-12-30", {"role-ada", "role-bob"}),
    # DocumentReference.context.period: doc-1 [2024-02-01, 2024-03-01),
    # doc-2 [2024-02-15T08:00:00Z, 2024-03-11)
    ("DocumentReference", "period=2024-02", {"doc-1"}),
    ("DocumentReference", "period=2024", {"doc-1", "doc-2"}),
    ("DocumentReference", "period=ge2024-03", set()),
    ("DocumentReference", "period=gt2024-02", {"doc-2"}),
    ("DocumentReference", "period=lt2024-02-15T08:00:00Z", {"doc-1"}),
    ("DocumentReference", "period=lt2024-02-15T08:00:01Z", {"doc-1", "doc-2"}),
    ("DocumentReference", "period=le2024-02-15T10:00:00+02:00", {"doc-1"}),
    ("DocumentReference", "date=2024-03-12", {"doc-2"}),
    ("DocumentReference", "date=ge2024-03-01T10:00:00Z", {"doc-1", "doc-2"}),
    ("DocumentReference", "date=lt2024-03-12T08:00:00Z", {"doc-1"}),
    ("Provenance", "recorded=2024-01-01", {"prov-1"}),
    # prov-1 was recorded to the second: [12:00:00, 12:00:01) overlaps what follows .001
    ("Provenance", "recorded=ge2024-01-01T12:00:00.001Z", {"prov-1", "prov-2"}),
    ("Provenance", "recorded=gt2024-01-01T12:00:00Z", {"prov-2"}),
    ("Provenance", "recorded=eq2024-01-01T12:00:00.001Z", set()),
    # --- _id ------------------------------------------------------------------------------
    ("Patient", "_id={zoe}", {"zoe"}),
    ("Patient", "_id={zoe},{bo}", {"zoe", "bo"}),
    ("Patient", "_id={zoe},{leeds}", {"zoe"}),  # the id of another type
    ("Patient", "_id:not={zoe}", PATIENTS - {"zoe"}),
    ("Patient", "_id:missing=false", PATIENTS),
    ("Patient", "_id:missing=true", set()),
    ("Patient", "_id=nope", set()),
    ("Patient", "_id=" + "x" * 100, set()),
    ("Patient", "_id={zoe}&gender=male", set()),
    ("Patient", "_lastUpdated:missing=false", PATIENTS),
    ("Organization", "_id={york}", {"york"}),
]


SEARCH_TABLE += [
    # --- the other hub types -------------------------------------------------------------
    ("Endpoint", "status=active", {"ep", "admin-ep"}),
    ("Endpoint", "organization=Organization/{admin-org}", {"admin-ep"}),
    ("Endpoint", "name=gp conn", {"ep"}),
    ("Endpoint", "connection-type=http://terminology.hl7.org/CodeSystem/endpoint-connection-type|", {"ep"}),
    ("Endpoint", "organization={leeds}", {"ep"}),
    ("Endpoint", "organization={york}", set()),
    ("Subscription", "status=active", {"sub"}),
    ("Subscription", "criteria=patient?organization", {"sub"}),
    ("Subscription", "url=https://hooks.example.org/x", {"sub"}),
    ("Subscription", "url=https://hooks.example.org", set()),
    ("Subscription", "type=rest-hook", {"sub"}),
    ("AuditEvent", "date=2024-04-01", {"audit"}),
    ("AuditEvent", "date=lt2024-04-01T09:30:00Z", set()),
    ("AuditEvent", "outcome=0&date=2024-04-01", {"audit"}),  # the hub audits itself too
    ("AuditEvent", "action=R", {"audit"}),
    ("AuditEvent", "agent=Practitioner/{ada}", {"audit"}),
    ("AuditEvent", "patient=Patient/{zoe}&date=2024-04-01", {"audit"}),
    ("AuditEvent", "entity=Patient/{zoe}&date=2024-04-01", {"audit"}),  # served by the audit trail
    ("Group", "member=Patient/{zoe}", {"g-a", "g-c"}),
    ("Group", "member:missing=true", {"g-d"}),
    ("Group", "type=person", {"g-a", "g-b", "g-c"}),
    ("Group", "type:not=person", {"g-d"}),
    ("Group", "actual=true", {"g-a", "g-b", "g-c", "g-d"}),
    ("Group", "managing-entity=Organization/{leeds}", {"g-d"}),
    # --- _lastUpdated, written at g-a 10:00:00, g-b 10:00:00.5, g-c 11:00 (2024-05-01),
    #     g-d 2024-05-02T00:00:00 exactly; each is an instant, i.e. the range [t, t + 1µs) --
    ("Group", "_lastUpdated=2024-05-01T10:00:00Z", {"g-a", "g-b"}),
    ("Group", "_lastUpdated=eq2024-05-01T09:59:59Z", set()),
    ("Group", "_lastUpdated=gt2024-05-01T09:59:59Z", {"g-a", "g-b", "g-c", "g-d"}),
    ("Group", "_lastUpdated=le2024-05-01T09:59:59Z", set()),
    ("Group", "_lastUpdated=ne2024-05-01T09:59:59Z", {"g-a", "g-b", "g-c", "g-d"}),
    ("Group", "_lastUpdated=lt2024-05-01T10:00:00Z", set()),
    ("Group", "_lastUpdated=lt2024-05-01T10:00:00.001Z", {"g-a"}),
    ("Group", "_lastUpdated=ge2024-05-01T10:00:00.500Z", {"g-b", "g-c", "g-d"}),
    ("Group", "_lastUpdated=gt2024-05-01T10:00:00.500Z", {"g-c", "g-d"}),
    ("Group", "_lastUpdated=gt2024-05-01T10:00:00.499Z", {"g-b", "g-c", "g-d"}),
    ("Group", "_lastUpdated=le2024-05-01T10:00:00.499Z", {"g-a"}),
    ("Group", "_lastUpdated=ne2024-05-01T10:00:00Z", {"g-c", "g-d"}),
    ("Group", "_lastUpdated=2024-05-01T10:00:00.5Z", {"g-b"}),
    ("Group", "_lastUpdated=2024-05-01T10:00:00.000000Z", {"g-a"}),
    ("Group", "_lastUpdated=2024-05-01T10:00:00.000001Z", set()),
    ("Group", "_lastUpdated=2024-05-01", {"g-a", "g-b", "g-c"}),
    ("Group", "_lastUpdated=le2024-05-01", {"g-a", "g-b", "g-c"}),
    ("Group", "_lastUpdated=gt2024-05-01", {"g-d"}),
    ("Group", "_lastUpdated=ge2024-05-02", {"g-d"}),
    ("Group", "_lastUpdated=lt2024-05-02", {"g-a", "g-b", "g-c"}),
    ("Group", "_lastUpdated=2024-05-01T12:00:00+02:00", {"g-a", "g-b"}),
    ("Group", "_lastUpdated=2024-05-01T12:00+02:00", {"g-a", "g-b"}),  # minute precision
    ("Group", "_lastUpdated=2024-05", {"g-a", "g-b", "g-c", "g-d"}),
    ("Group", "_lastUpdated=2024", {"g-a", "g-b", "g-c", "g-d"}),
    ("Group", "_lastUpdated=lt2024", set()),
    ("Group", "_lastUpdated=gt2024-05-01T10:30:00Z&_lastUpdated=lt2024-05-02", {"g-c"}),
    ("Group", "_lastUpdated=lt2024-05-01T10:00:00.001Z,ge2024-05-02", {"g-a", "g-d"}),
    ("Group", "_lastUpdated=ge2024-05-01T11:00:00Z&member=Patient/{zoe}", {"g-c"}),
]


@pytest.mark.parametrize(
    ("rtype", "query", "expected"), SEARCH_TABLE, ids=[f"{t}?{q}" for t, q, _ in SEARCH_TABLE]
)
async def test_search_table(population: Population, rtype: str, query: str, expected: set[str]) -> None:
    client, ids = population.client, population.ids
    response = await search(client, rtype, query, ids)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    assert matches(bundle, population) == expected
    assert bundle["total"] == len(expected)
    for entry in bundle.get("entry", []):
        assert entry["fullUrl"] == f"{BASE}/fhir/{rtype}/{entry['resource']['id']}"


# (resource type, query, expected matches, expected included resources)
INCLUDE_TABLE: list[tuple[str, str, set[str], set[str]]] = [
    ("Patient", "_id={zoe}&_include=Patient:organization", {"zoe"}, {"leeds"}),
    (
        "Patient",
        "organization:missing=false&_include=Patient:organization",
        {"zoe", "jose", "annabel"},
        {"leeds", "york"},  # zoe and annabel (absolute URL) both refer to leeds: once
    ),
    ("Patient", "_id={zoe},{annabel}&_include=Patient:general-practitioner", {"zoe", "annabel"}, {"ada", "role-ada"}),
    ("Patient", "_id={zoe},{annabel}&_include=Patient:general-practitioner:Practitioner", {"zoe", "annabel"}, {"ada"}),
    (
        "Patient",
        "_id={zoe},{annabel}&_include=Patient:general-practitioner&_include=Patient:organization",
        {"zoe", "annabel"},
        {"ada", "role-ada", "leeds"},
    ),
    ("Patient", "_id={anna}&_include=Patient:organization", {"anna"}, set()),
    ("PractitionerRole", "_include=PractitionerRole:practitioner", {"role-ada", "role-bob"}, {"ada", "bob"}),
    (
        "PractitionerRole",
        "_include=PractitionerRole:practitioner&_include=PractitionerRole:organization",
        {"role-ada", "role-bob"},
        {"ada", "bob", "leeds", "york"},
    ),
    ("Patient", "_id={zoe}&_revinclude=Provenance:target", {"zoe"}, {"prov-1"}),
    (
        "Patient",
        "_id={jose},{anna}&_revinclude=Provenance:target&_revinclude=Consent:patient",
        {"jose", "anna"},
        {"prov-1", "c-open"},
    ),
    ("Patient", "_id={zoe}&_revinclude=Provenance:target:Patient", {"zoe"}, {"prov-1"}),
    ("Organization", "_revinclude=Patient:organization", {"leeds", "york", "admin-org"}, {"zoe", "jose", "annabel"}),
    ("Organization", "_include=Organization:partof", {"leeds", "york", "admin-org"}, set()),  # leeds is a match
    ("Organization", "_id={york}&_include=Organization:partof&_revinclude=Provenance:target", {"york"}, {"leeds"}),
    (
        "Organization",
        "_id={leeds}&_revinclude=Provenance:target&_revinclude=PractitionerRole:organization",
        {"leeds"},
        {"prov-2", "role-ada"},
    ),
    ("Practitioner", "gender=female&_revinclude=PractitionerRole:practitioner", {"ada"}, {"role-ada"}),
    ("DocumentReference", "_include=DocumentReference:subject:Patient", {"doc-1", "doc-2"}, {"zoe", "annabel"}),
    ("Group", "type=person&_include=Group:member", {"g-a", "g-b", "g-c"}, {"zoe", "jose", "anna"}),
]


@pytest.mark.parametrize(
    ("rtype", "query", "expected", "included"), INCLUDE_TABLE, ids=[f"{t}?{q}" for t, q, _, _ in INCLUDE_TABLE]
)
async def test_include_and_revinclude(
    population: Population, rtype: str, query: str, expected: set[str], included: set[str]
) -> None:
    client, ids = population.client, population.ids
    response = await search(client, rtype, query, ids)
    assert response.status_code == 200, response.text
    bundle = response.json()
    assert matches(bundle, population) == expected
    assert matches(bundle, population, "include") == included
    assert bundle["total"] == len(expected)  # included resources are not counted
    modes = [e["search"]["mode"] for e in bundle.get("entry", [])]
    assert modes == sorted(modes, key=lambda m: m != "match")  # matches first
    everything = [e["resource"]["id"] for e in bundle.get("entry", [])]
    assert len(everything) == len(set(everything))
    assert "_include" in (link(bundle, "self") or "") or "_revinclude" in (link(bundle, "self") or "")


async def test_default_order_is_insertion_and_sort_by_last_updated(population: Population) -> None:
    client, ids = population.client, population.ids
    inserted = [name for name, *_ in CLOCK]  # g-d, g-b, g-a, g-c
    by_time = sorted(inserted, key=lambda n: next(w for m, w, *_ in CLOCK if m == n))
    for query, expected in [
        ("", inserted),
        ("_sort=_lastUpdated", by_time),
        ("_sort=-_lastUpdated", by_time[::-1]),
        ("_sort=-_lastUpdated&_sort=_lastUpdated", by_time),  # the last one given wins
    ]:
        bundle = (await search(client, "Group", query, ids)).json()
        assert entry_names(bundle, population) == expected, query
    first = (await search(client, "Group", "_id={g-a}", ids)).json()["entry"][0]["resource"]
    assert first["meta"]["lastUpdated"] == "2024-05-01T10:00:00.000Z"
    patients = (await search(client, "Patient", "", ids)).json()
    assert entry_names(patients, population) == [n for n, _ in POPULATION if n in PATIENTS]


async def test_count_default_cap_zero_and_total(population: Population) -> None:
    client = population.client
    default = (await client.get("/fhir/Binary")).json()
    assert len(default["entry"]) == 50 and default["total"] == BULK
    assert link(default, "next") and not link(default, "previous")
    capped = (await client.get("/fhir/Binary", params={"_count": "5000"})).json()
    assert len(capped["entry"]) == 1000 and capped["total"] == BULK
    rest = (await client.get(link(capped, "next") or "")).json()
    assert len(rest["entry"]) == 1 and not link(rest, "next") and link(rest, "previous")
    huge = (await client.get("/fhir/Binary", params={"_count": "9" * 40})).json()
    assert len(huge["entry"]) == 1000
    only_total = (await client.get("/fhir/Binary", params={"_count": "0"})).json()
    assert only_total["total"] == BULK and not only_total.get("entry")
    assert not link(only_total, "next")
    none = (await client.get("/fhir/Binary", params={"_total": "none", "_count": "3"})).json()
    assert "total" not in none and len(none["entry"]) == 3
    males = (await client.get("/fhir/Patient", params={"gender": "male", "_count": "0", "_include": "Patient:organization"})).json()
    assert males["total"] == 1 and not males.get("entry")
    nothing = (await client.get("/fhir/Binary", params={"_total": "none", "_count": "0"})).json()
    assert "total" not in nothing and not nothing.get("entry")
    for total in ("accurate", "estimate"):
        page = (await client.get("/fhir/Binary", params={"_total": total, "_count": "2"})).json()
        assert page["total"] == BULK
    second = (await client.get(link(default, "next") or "")).json()
    assert second["total"] == BULK and len(second["entry"]) == 50  # total on later pages too


def test_page_size_defaults_are_50_and_1000() -> None:
    fields = Settings.model_fields
    assert (fields["default_page_size"].default, fields["max_page_size"].default) == (50, 1000)


POST_QUERIES = [
    ("Patient", "gender=female,male&_sort=-_lastUpdated"),
    ("Patient", "name=ann&birthdate=ge1979"),
    ("Patient", r"identifier=urn:oid:1.2.3|a\|b&_include=Patient:organization"),
    ("Organization", "name=york health centre\\, n&_revinclude=Patient:organization"),
    ("Consent", "period=ge2020&_count=1"),
    ("Group", "_lastUpdated=2024-05-01&_count=0"),
]


@pytest.mark.parametrize(("rtype", "query"), POST_QUERIES, ids=[f"{t}?{q}" for t, q in POST_QUERIES])
async def test_post_search_with_form_body_equals_get(population: Population, rtype: str, query: str) -> None:
    client, ids = population.client, population.ids
    items = query_items(query, ids)
    got = (await client.get(f"/fhir/{rtype}", params=items)).json()
    posted = await client.post(
        f"/fhir/{rtype}/_search",
        content=str(httpx.QueryParams(items)).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert posted.status_code == 200, posted.text
    body = posted.json()
    for key in ("type", "total", "link"):
        assert body.get(key) == got.get(key)
    assert [e["fullUrl"] for e in body.get("entry", [])] == [e["fullUrl"] for e in got.get("entry", [])]
    assert [e["search"] for e in body.get("entry", [])] == [e["search"] for e in got.get("entry", [])]
    # half in the URL, half in the body: still one search
    half = len(items) // 2
    mixed = await client.post(
        f"/fhir/{rtype}/_search",
        params=items[:half],
        content=str(httpx.QueryParams(items[half:])).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert [e["fullUrl"] for e in mixed.json().get("entry", [])] == [e["fullUrl"] for e in got.get("entry", [])]


async def test_post_search_needs_a_form_body(population: Population) -> None:
    client = population.client
    response = await client.post("/fhir/Patient/_search", json={"gender": "female"})
    assert outcome(response, 415)


async def test_unknown_parameter_is_400_unless_lenient(population: Population) -> None:
    client, ids = population.client, population.ids
    strict = await search(client, "Patient", "gender=female&favourite-colour=blue", ids)
    assert "favourite-colour" in outcome(strict)
    assert strict.json()["issue"][0]["code"] == "not-supported"
    for prefer in ("handling=lenient", "return=representation, handling=lenient"):
        lenient = await search(client, "Patient", "gender=female&favourite-colour=blue", ids, headers={"Prefer": prefer})
        assert lenient.status_code == 200, lenient.text
        bundle = lenient.json()
        assert matches(bundle, population) == {"zoe", "anna"} and bundle["total"] == 2
        outcomes = [e for e in bundle["entry"] if e["search"]["mode"] == "outcome"]
        assert len(outcomes) == 1
        oo = outcomes[0]["resource"]
        assert oo["resourceType"] == "OperationOutcome"
        assert oo["issue"][0]["severity"] == "warning" and "favourite-colour" in oo["issue"][0]["diagnostics"]
        assert "favourite-colour" not in (link(bundle, "self") or "")
    explicit = await search(client, "Patient", "favourite-colour=blue", ids, headers={"Prefer": "handling=strict"})
    assert outcome(explicit)


def _cursor(raw: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


# (resource type, query, fragment the diagnostics must contain); all are 400s
BAD_TABLE: list[tuple[str, str, str]] = [
    ("Patient", "birthdate=1980-13", "not a FHIR date"),
    ("Patient", "birthdate=1980-02-30", "not a FHIR date"),
    ("Patient", "birthdate=yesterday", "YYYY-MM-DD"),
    ("Patient", "birthdate=gt", "not a FHIR date"),
    ("Patient", "birthdate=sa1980", "prefix 'sa' is not supported"),
    ("Patient", "birthdate=2020-01-01T10:00:00+15:00", "not a FHIR date"),
    ("Patient", "birthdate=0000", "not a FHIR date"),
    ("Patient", "_lastUpdated=2024-05-01T25:00:00Z", "_lastUpdated"),
    ("Patient", "_count=abc", "_count must be a whole number"),
    ("Patient", "_count=-1", "_count must be a whole number"),
    ("Patient", "_count=1.5", "_count must be a whole number"),
    ("Patient", "_count=²", "_count must be a whole number"),
    ("Patient", "_count=", "_count must be a whole number"),
    ("Patient", "gender:missing=maybe", "true or false"),
    ("Patient", "_id:missing=yes", "true or false"),
    ("Patient", "_cursor=garbage", "_cursor"),
    ("Patient", "_cursor=" + _cursor(b'["after",null,18446744073709551615]'), "_cursor"),
    ("Patient", "_cursor=" + _cursor(b'["after",null,1e300]'), "_cursor"),
    ("Patient", "_cursor=" + _cursor(b'["sideways",null,1]'), "_cursor"),
    ("Patient", "_cursor=" + _cursor(b'["after","2024-01-01T00:00:00+05:00",1]') + "&_sort=_lastUpdated", "_cursor"),
    ("Patient", "_cursor=" + _cursor(b'["after",null,1]') + "&_sort=_lastUpdated", "different _sort"),
    ("Patient", "_cursor=" + _cursor(b'["after","2024-01-01T00:00:00",1]'), "different _sort"),
    ("Patient", "name:text=x", "Modifier :text is not supported"),
    ("Patient", "gender:exact=female", "Modifier :exact is not supported"),
    ("Patient", "birthdate:not=1980", "Modifier :not is not supported"),
    ("Patient", "organization:Patient=1", "Modifier :Patient is not supported"),
    ("Patient", "organization:identifier=x", "Modifier :identifier is not supported"),
    ("Patient", "_id:contains=x", "Modifier :contains is not supported"),
    ("Patient", "_lastUpdated:not=2024", "Modifier :not is not supported"),
    ("Patient", "_sort=name", "_sort='name' is not supported"),
    ("Patient", "_sort=_id", "_sort='_id' is not supported"),
    ("Patient", "_total=maybe", "_total must be"),
    ("Patient", "_include=Patient:name", "referenceParameter"),
    ("Patient", "_include=Patient", "referenceParameter"),
    ("Patient", "_include=Organization:partof", "must start with the searched type"),
    ("Patient", "_include=Patient:organization:Practitioner", "does not refer to Practitioner"),
    ("Patient", "_include:iterate=Patient:organization", "one level"),
    ("Patient", "_revinclude=PractitionerRole:practitioner", "cannot refer to the searched type"),
    ("Patient", "_revinclude=Provenance:target:Organization", "cannot refer to the searched type"),
    ("Patient", "_revinclude=Nope:target", "referenceParameter"),
    ("Patient", "_count:x=3", "takes no modifier"),
    ("Patient", "name=", "has no value"),
    ("Patient", "gender=,", "has no value"),
    ("Patient", "favourite-colour=blue", "Unknown search parameter 'favourite-colour'"),
    ("Patient", "name.family=x", "Unknown search parameter 'name.family'"),
    ("Patient", "_has:Provenance:target:agent=x", "Unknown search parameter '_has'"),
    ("Patient", "name=a\x00b", "NUL"),
    ("Patient", "identifier=\x00", "NUL"),
    ("Consent", "period=2020-02-30", "not a FHIR date"),
]


@pytest.mark.parametrize(("rtype", "query", "fragment"), BAD_TABLE, ids=[f"{t}?{q}" for t, q, _ in BAD_TABLE])
async def test_bad_values_are_400_with_a_diagnostic(population: Population, rtype: str, query: str, fragment: str) -> None:
    client, ids = population.client, population.ids
    response = await search(client, rtype, query, ids)
    assert fragment in outcome(response)
    # the same through POST _search
    posted = await client.post(
        f"/fhir/{rtype}/_search",
        content=str(httpx.QueryParams(query_items(query, ids))).encode(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert fragment in outcome(posted)


@pytest.mark.parametrize("rtype", ["Measure", "Spaceship"])  # an R4 type nobody serves; not FHIR at all
async def test_unknown_type_is_404(population: Population, rtype: str) -> None:
    client = population.client
    assert "not supported" in outcome(await client.get(f"/fhir/{rtype}"), 404)


async def test_history_refuses_a_search_cursor(population: Population) -> None:
    client, ids = population.client, population.ids
    page = (await search(client, "Patient", "_count=2", ids)).json()
    cursor = (link(page, "next") or "").rpartition("_cursor=")[2]
    assert cursor
    assert "_cursor" in outcome(await client.get("/fhir/Patient/_history", params={"_cursor": cursor}))


async def test_deleted_resources_leave_search_and_includes(client: httpx.AsyncClient) -> None:
    org = await create(client, {"resourceType": "Organization", "name": "Gone Practice"})
    ref = {"reference": f"Organization/{org['id']}"}
    kept = await create(client, {"resourceType": "Patient", "name": [{"family": "Kept"}], "managingOrganization": ref})
    gone = await create(client, {"resourceType": "Patient", "name": [{"family": "Gone"}], "managingOrganization": ref})
    assert (await client.delete(f"/fhir/Patient/{gone['id']}")).status_code == 204
    bundle = (await client.get("/fhir/Patient", params={"organization": org["id"]})).json()
    assert [e["resource"]["id"] for e in bundle["entry"]] == [kept["id"]] and bundle["total"] == 1
    assert (await client.get("/fhir/Patient", params={"name": "gone"})).json()["total"] == 0
    rev = (await client.get("/fhir/Organization", params={"_revinclude": "Patient:organization"})).json()
    assert [e["resource"]["id"] for e in rev["entry"] if e["search"]["mode"] == "include"] == [kept["id"]]
    assert (await client.delete(f"/fhir/Organization/{org['id']}")).status_code == 204
    inc = (await client.get("/fhir/Patient", params={"_include": "Patient:organization"})).json()
    assert [e["search"]["mode"] for e in inc["entry"]] == ["match"]


async def test_unencoded_plus_in_a_timezone_offset_is_understood(population: Population) -> None:
    """A raw ``+`` in a query string arrives as a space; a date search still means ``+``."""
    client = population.client
    raw = await client.get("/fhir/Consent?date=2021-06-01T09:00:00+01:00")
    assert raw.status_code == 200, raw.text
    assert matches(raw.json(), population) == {"c-open"}
    encoded = await client.get("/fhir/Consent?date=2021-06-01T09:00:00%2B01:00")
    assert matches(encoded.json(), population) == {"c-open"}
