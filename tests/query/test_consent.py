"""Consent applies to every resource a provider returns; the consumer is told what was withheld."""

from __future__ import annotations

from typing import Any

import orjson
from query.federation import Federated

from sharedcare.consent.gate import CONSENT_PAGE, _about, attached_bodies
from sharedcare.pix.lookup import find_with
from sharedcare.simulators.provider import provider_people

ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"


async def test_an_opt_out_withholds_everything_and_says_so(federated: Federated) -> None:
    nhs = federated.people_at("leeds-pas", "gp-b86001")[0]
    person = await federated.app.state.pix.find(nhs_number=nhs)
    consent = {
        "resourceType": "Consent",
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/{person.id}"},
        "dateTime": "2024-01-01",
        "policyRule": {"coding": [{"system": ACT, "code": "OPTOUT"}]},
    }
    created = await federated.app.state.fhir.create("Consent", consent)
    assert created.status == 201
    r = await federated.search("Observation", nhs)
    assert r.status_code == 200
    bundle = r.json()
    assert [e for e in bundle.get("entry", []) if e["search"]["mode"] == "match"] == []
    issues = [
        i
        for e in bundle["entry"]
        if e["search"]["mode"] == "outcome"
        for i in e["resource"]["issue"]
    ]
    assert any(i["code"] == "suppressed" for i in issues)
    assert "total" not in bundle


def _consent(patient_ref: str, status: str = "active", code: str = "OPTOUT") -> dict[str, Any]:
    return {
        "resourceType": "Consent",
        "status": status,
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [{"coding": [{"system": "http://loinc.org", "code": "59284-0"}]}],
        "patient": {"reference": patient_ref},
        "dateTime": "2024-01-01",
        "policyRule": {"coding": [{"system": ACT, "code": code}]},
    }


async def test_the_consents_fetched_with_the_person_are_those_the_store_search_finds(
    federated: Federated,
) -> None:
    """The federated query takes a person's consent records from the patient index's lookup
    (one statement, on PostgreSQL and SQLite alike); they must be exactly what the gate's own
    search finds, in the same order, whatever state the records are in."""
    app = federated.app
    gate, fhir, pix = app.state.release, app.state.fhir, app.state.pix
    opted_out = federated.people_at("leeds-pas", "gp-b86001")[0]  # the test above's person
    everyone = {
        p.nhs_number for s in federated.providers.values() for p in provider_people(s.config)
    }
    someone, other = sorted(everyone - {opted_out})[-2:]
    person = await pix.find(nhs_number=someone)
    neighbour = await pix.find(nhs_number=other)
    ref = f"Patient/{person.id}"

    async def create(body: dict[str, Any]) -> str:
        created = await fhir.create("Consent", body)
        assert created.status == 201
        return str(orjson.loads(created.body)["id"])

    await create(_consent(ref))  # kept
    await create(_consent(ref, code="OPTIN"))  # kept, after the first
    await create(_consent(ref, status="inactive"))  # not in force
    await create(_consent(ref, status="draft"))  # not in force
    await create(_consent(f"{fhir.base}/{ref}"))  # an absolute reference to the hub's Patient
    await create(_consent(f"Patient/{neighbour.id}"))  # someone else's
    gone = await create(_consent(ref))
    assert (await fhir.delete("Consent", gone)).status in (200, 204)
    lapsed = await create(_consent(ref))
    revised = {**_consent(ref, status="inactive"), "id": lapsed}
    assert (await fhir.update("Consent", lapsed, revised)).status == 200

    searched = (await gate.consents([ref]))[ref]
    found, attached = await pix.find_with(gate.consent_sql(), nhs_number=someone)
    assert found == person
    bodies = attached_bodies(attached)
    assert bodies is not None
    assert _about(ref, bodies) == searched
    assert [c["policyRule"]["coding"][0]["code"] for c in searched][:2] == ["OPTOUT", "OPTIN"]
    assert all(c["status"] == "active" for c in searched)


async def _work(app: Any, sql: str, nhs: str) -> int:
    """How much the database does to find ``nhs`` with ``sql`` attached: SQLite's virtual
    machine steps, or the rows PostgreSQL's plan reads (output plus those filtered out)."""
    db = app.state.db
    if db.dialect != "postgresql":
        steps = [0]

        def count() -> int:
            steps[0] += 1
            return 0

        conn = db.inline._connection()
        conn.set_progress_handler(count, 10)
        try:
            db.inline.fetch(find_with("nhs_number", sql, "?"), (nhs,))
        finally:
            conn.set_progress_handler(None, 10)
        return steps[0]
    async with app.state.pix._driver() as driver:
        await driver.execute("ANALYZE")
        explained = await driver.fetchval(
            "EXPLAIN (ANALYZE, FORMAT JSON) " + find_with("nhs_number", sql), nhs
        )

    def rows(node: dict[str, Any]) -> int:
        own = (node.get("Actual Rows", 0) + node.get("Rows Removed by Filter", 0)) * node.get(
            "Actual Loops", 1
        )
        return own + sum(rows(child) for child in node.get("Plans", ()))

    plan = orjson.loads(explained) if isinstance(explained, str | bytes) else explained
    return rows(plan[0]["Plan"])


async def _copied_consents(app: Any, template: dict[str, Any], count: int, who: str | None = None) -> None:
    """``count`` Consents like ``template``: the template written by the store, then
    ``count - 1`` copies of its resource and index rows (thousands through the API would take
    minutes), each about ``who`` (a Patient id), or about another person each when None."""
    from sqlalchemy import func, insert, select, text

    from sharedcare.store.schema import idx_reference, idx_token, resources

    fhir, db = app.state.fhir, app.state.db
    created = await fhir.create("Consent", template)
    assert created.status == 201
    template_id = orjson.loads(created.body)["id"]
    async with db.read() as conn:
        row = (
            await conn.execute(
                select(resources).where(
                    resources.c.type == "Consent", resources.c.id == template_id
                )
            )
        ).one()
        refs = (
            await conn.execute(select(idx_reference).where(idx_reference.c.rid == row.rid))
        ).all()
        tokens = (await conn.execute(select(idx_token).where(idx_token.c.rid == row.rid))).all()
        start = (await conn.execute(select(func.max(resources.c.rid)))).scalar_one() + 1

    def copy(table_rows: Any, rid: int, **changes: Any) -> list[dict[str, Any]]:
        return [
            {**{k: v for k, v in r._mapping.items() if k != "id"}, "rid": rid, **changes}
            for r in table_rows
        ]

    copies: dict[Any, list[dict[str, Any]]] = {resources: [], idx_reference: [], idx_token: []}
    for rid in range(start, start + count - 1):
        target = who or f"other-{rid}"
        copies[resources].append({**row._mapping, "rid": rid, "id": f"copy-{rid}"})
        copies[idx_reference] += [
            {**r, "target_id": target} if r["param"] == "patient" else r for r in copy(refs, rid)
        ]
        copies[idx_token] += copy(tokens, rid)

    async def write(conn: Any) -> None:
        for table, values in copies.items():
            await conn.execute(insert(table), values)
        if db.dialect == "postgresql":  # the store's next rid comes after the copies
            await conn.execute(
                text(
                    "SELECT setval(pg_get_serial_sequence('resources', 'rid'), "
                    "(SELECT max(rid) FROM resources))"
                )
            )

    await db.write(write)


async def test_finding_the_persons_consents_does_not_read_the_regions(federated: Federated) -> None:
    """A region holds many people's Consents: the lookup each federated query makes must
    read only the person's own. It once listed every active Consent in the region first
    (83 ms per query with 20,000 of them, bench/consent_lookup.py)."""
    app = federated.app
    sql = app.state.release.consent_sql()
    nhs = federated.people_at("leeds-pas", "gp-b86001")[-1]
    person = await app.state.pix.find(nhs_number=nhs)
    await app.state.fhir.create("Consent", _consent(f"Patient/{person.id}", code="OPTIN"))
    alone = await _work(app, sql, nhs)
    await _copied_consents(app, _consent("Patient/other-0"), 2001)
    crowded = await _work(app, sql, nhs)
    assert crowded <= alone * 1.5 + 20, (alone, crowded)
    found, attached = await app.state.pix.find_with(sql, nhs_number=nhs)
    assert found == person
    assert [
        c["patient"]["reference"]
        for c in _about(f"Patient/{person.id}", attached_bodies(attached) or [])
    ] == [f"Patient/{person.id}"]


async def test_a_person_with_more_consents_than_a_page_has_every_one_applied(
    federated: Federated,
) -> None:
    """The lookup attaches at most a page (1,000) of a person's consent records and one more
    to say there are more; the gate then pages through the store's search. An opt-out written
    after 1,001 opt-ins, on the search's second page, must still withhold the person's
    records (deny wins across records)."""
    app = federated.app
    gate = app.state.release
    everyone = {
        p.nhs_number for s in federated.providers.values() for p in provider_people(s.config)
    }
    for nhs in sorted(everyone):  # someone no other test here gave consent records
        person = await app.state.pix.find(nhs_number=nhs)
        ref = f"Patient/{person.id}"
        if not (await gate.consents([ref]))[ref]:
            break
    else:
        raise AssertionError("everyone has consent records already")
    before = await federated.search("Observation", nhs)
    released = [e for e in before.json()["entry"] if e["search"]["mode"] == "match"]
    assert released, "the person's providers hold Observations"

    await _copied_consents(app, _consent(ref, code="OPTIN"), CONSENT_PAGE + 1, who=person.id)
    assert (await app.state.fhir.create("Consent", _consent(ref))).status == 201  # OPTOUT, last
    _found, attached = await app.state.pix.find_with(gate.consent_sql(), nhs_number=nhs)
    bodies = attached_bodies(attached) or []
    # More than a page came along (so the gate must search), and the opt-out is not among them.
    assert len(bodies) == CONSENT_PAGE + 1
    assert {c["policyRule"]["coding"][0]["code"] for c in _about(ref, bodies)} == {"OPTIN"}

    r = await federated.search("Observation", nhs)
    assert r.status_code == 200
    bundle = r.json()
    assert [e for e in bundle["entry"] if e["search"]["mode"] == "match"] == []
    issues = [
        i
        for e in bundle["entry"]
        if e["search"]["mode"] == "outcome"
        for i in e["resource"]["issue"]
    ]
    assert any(i["code"] == "suppressed" for i in issues)
