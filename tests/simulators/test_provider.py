"""The provider simulator over a real socket: valid R4 records, determinism, search, paging."""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM
from sharedcare.simulators import clinical
from sharedcare.simulators.clinical import CLINICAL_TYPES, RESOURCE_TYPES, when_of
from sharedcare.simulators.pds import generated_nhs_numbers
from sharedcare.simulators.provider import (
    ProviderConfig,
    ProviderServer,
    create_provider_app,
    provider_people,
    provider_state,
)
from sharedcare.simulators.provider_search import date_range, parse

PEOPLE, SEED = 40, 2026
CONFIG = ProviderConfig(id="test-pas", people=PEOPLE, seed=SEED)


# One keep-alive client for the module: a new httpx client per request costs ~0.2 s (TLS setup).
HTTP = httpx.Client(timeout=10)


@pytest.fixture(scope="module", autouse=True)
def _close_http() -> Iterator[None]:
    yield
    HTTP.close()


@pytest.fixture(scope="module")
def provider() -> Iterator[ProviderServer]:
    with ProviderServer(CONFIG) as server:
        yield server


def search(provider: ProviderServer, type_: str, **params: Any) -> dict[str, Any]:
    response = HTTP.get(f"{provider.base_url}/{type_}", params=params, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/fhir+json")
    bundle: dict[str, Any] = response.json()
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "searchset"
    return bundle


def resources(bundle: dict[str, Any]) -> list[dict[str, Any]]:
    return [e["resource"] for e in bundle.get("entry", [])]


def everything(provider: ProviderServer, type_: str, **params: Any) -> list[dict[str, Any]]:
    """Every match, following ``next`` links."""
    bundle = search(provider, type_, **params)
    out = resources(bundle)
    while nxt := [link["url"] for link in bundle["link"] if link["relation"] == "next"]:
        bundle = HTTP.get(nxt[0], timeout=10).json()
        out += resources(bundle)
    return out


def r4b_model(type_: str) -> Any:
    return getattr(importlib.import_module(f"fhir.resources.R4B.{type_.lower()}"), type_)


# -- the population --------------------------------------------------------------------------
def test_people_are_a_deterministic_share_of_the_pds_population() -> None:
    held = provider_people(CONFIG)
    population = generated_nhs_numbers(PEOPLE, SEED)
    numbers = [p.nhs_number for p in held]
    assert numbers == [n for n in population if n in set(numbers)]  # population order, a subset
    assert 0.5 * PEOPLE < len(held) < 0.9 * PEOPLE  # share 0.7
    assert provider_people(CONFIG) == held
    assert len({p.local_id for p in held}) == len(held)
    other = provider_people(ProviderConfig(id="other-gp", people=PEOPLE, seed=SEED))
    assert {p.nhs_number for p in other} != set(numbers)
    assert not {p.local_id for p in other} & {p.local_id for p in held}


def test_three_providers_share_many_people() -> None:
    ids = ("leeds-pas", "bradford-gp", "york-ehr")
    known = Counter(
        p.nhs_number for i in ids for p in provider_people(ProviderConfig(id=i, people=300))
    )
    by_count = Counter(known.values())
    assert by_count[2] + by_count[3] > 150  # most of the 300 are known to two or three
    assert by_count[3] > 50


def test_records_are_reproducible_from_the_seed() -> None:
    person = provider_people(CONFIG)[0]
    first = clinical.records(CONFIG.id, SEED, person, CONFIG.shape)
    assert clinical.records(CONFIG.id, SEED, person, CONFIG.shape) == first
    assert clinical.records(CONFIG.id, SEED + 1, person, CONFIG.shape) != first


def test_providers_agree_on_a_persons_long_term_conditions() -> None:
    a = ProviderConfig(id="leeds-pas", people=PEOPLE)
    b = ProviderConfig(id="bradford-gp", people=PEOPLE)
    people_b = {p.nhs_number: p for p in provider_people(b)}
    compared = 0
    for person in provider_people(a):
        if person.nhs_number not in people_b:
            continue

        def problems(cfg: ProviderConfig, who: clinical.SimPerson) -> set[str]:
            return {
                r["code"]["coding"][0]["code"]
                for r in clinical.records(cfg.id, cfg.seed, who, cfg.shape)
                if r["resourceType"] == "Condition"
                and r["category"][0]["coding"][0]["code"] == "problem-list-item"
            }

        assert problems(a, person) == problems(b, people_b[person.nhs_number])
        compared += 1
    assert compared > 10


# -- validity --------------------------------------------------------------------------------
@pytest.mark.parametrize("type_", RESOURCE_TYPES)
def test_records_are_valid_r4_with_resolvable_references(
    provider: ProviderServer, type_: str
) -> None:
    model = r4b_model(type_)
    seen = 0
    for person in provider.people[:8]:
        for resource in everything(provider, type_, patient=person.local_id):
            model.model_validate(resource)
            seen += 1
            text = orjson.dumps(resource).decode()
            assert person.local_id in text
            for ref in _references(resource):
                target_type, target_id = ref.split("/")
                read = HTTP.get(f"{provider.base_url}/{target_type}/{target_id}", timeout=10)
                assert read.status_code == 200, f"{resource['id']} refers to missing {ref}"
    assert seen > 0 or type_ in ("AllergyIntolerance", "Procedure")


def _references(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "reference" and isinstance(item, str):
                yield item
            else:
                yield from _references(item)
    elif isinstance(value, list):
        for item in value:
            yield from _references(item)


def test_codings_use_standard_systems(provider: ProviderServer) -> None:
    local = provider.people[0].local_id
    observations = everything(provider, "Observation", patient=local)
    for obs in observations:
        assert obs["code"]["coding"][0]["system"] == "http://loinc.org"
        quantities = [obs.get("valueQuantity")] + [
            c["valueQuantity"] for c in obs.get("component", [])
        ]
        for q in filter(None, quantities):
            assert q["system"] == "http://unitsofmeasure.org" and q["code"]
    meds = everything(provider, "MedicationRequest")
    assert {m["medicationCodeableConcept"]["coding"][0]["system"] for m in meds} == {
        "https://dmd.nhs.uk"
    }
    conditions = everything(provider, "Condition")
    assert {c["code"]["coding"][0]["system"] for c in conditions} == {"http://snomed.info/sct"}
    reports = everything(provider, "DiagnosticReport")
    assert reports and all(r["result"] for r in reports)


def test_dates_are_realistic(provider: ProviderServer) -> None:
    for person in provider.people[:10]:
        born = datetime.fromisoformat(person.birth_date).replace(tzinfo=UTC)
        for type_ in CLINICAL_TYPES:
            for resource in everything(provider, type_, patient=person.local_id):
                start, end = when_of(resource) or ("", "")
                when = datetime.fromisoformat(start)
                assert born.date() <= when.date(), (resource["id"], start, person.birth_date)
                assert when <= datetime(2026, 1, 8, tzinfo=UTC)
                assert start <= end


def test_typical_observation_search_is_13_resources_of_about_5_kb(
    provider: ProviderServer,
) -> None:
    for person in provider.people[:5]:
        bundle = search(provider, "Observation", patient=person.local_id)
        assert bundle["total"] == 13 and len(bundle["entry"]) == 13
        sizes = [len(orjson.dumps(r)) for r in resources(bundle)]
        assert all(4_900 <= s <= 5_300 for s in sizes), sizes


def test_size_page_size_and_total_are_configurable() -> None:
    config = ProviderConfig(
        id="small", people=10, resources_per_search=4, resource_bytes=0, default_count=3,
        include_total=False,
    )  # fmt: skip
    with ProviderServer(config) as small:
        bundle = search(small, "Observation", patient=small.people[0].local_id)
        assert "total" not in bundle and len(bundle["entry"]) == 3
        assert [link["relation"] for link in bundle["link"]] == ["self", "next"]
        bundle = search(small, "Observation", patient=small.people[0].local_id, _count="10")
    assert len(bundle["entry"]) == 4
    assert all("text" not in r and len(orjson.dumps(r)) < 2_000 for r in resources(bundle))


# -- search ----------------------------------------------------------------------------------
def _patient_forms(provider: ProviderServer) -> list[tuple[str, str]]:
    person = provider.people[1]
    return [
        ("patient", person.local_id),
        ("patient", f"Patient/{person.local_id}"),
        ("subject", f"{provider.base_url}/Patient/{person.local_id}"),
        ("patient.identifier", f"{NHS_NUMBER_SYSTEM}|{person.nhs_number}"),
        ("subject:Patient.identifier", f"{CONFIG.identifier_system}|{person.local_id}"),
        ("patient:Patient.identifier", person.nhs_number),
    ]


@pytest.mark.parametrize("form", range(6))
def test_search_by_patient_in_every_form(provider: ProviderServer, form: int) -> None:
    name, value = _patient_forms(provider)[form]
    found = everything(provider, "Observation", **{name: value})
    local = provider.people[1].local_id
    assert len(found) == 13
    assert {r["subject"]["reference"] for r in found} == {f"Patient/{local}"}


def test_unknown_patient_gives_an_empty_searchset(provider: ProviderServer) -> None:
    assert search(provider, "Observation", patient="NOPE")["total"] == 0
    nobody = search(
        provider, "Condition", **{"patient.identifier": f"{NHS_NUMBER_SYSTEM}|9434765919"}
    )
    assert nobody["total"] == 0 and "entry" not in nobody


def test_patient_search_by_identifier(provider: ProviderServer) -> None:
    person = provider.people[2]
    bundle = search(provider, "Patient", identifier=f"{NHS_NUMBER_SYSTEM}|{person.nhs_number}")
    (patient,) = resources(bundle)
    assert patient["id"] == person.local_id
    assert {
        "use": "usual",
        "system": CONFIG.identifier_system,
        "value": person.local_id,
    } in patient["identifier"]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"category": "vital-signs"}, {"vital-signs"}),
        ({"category": "http://terminology.hl7.org/CodeSystem/observation-category|laboratory"}, {"laboratory"}),
        ({"category": "vital-signs,laboratory"}, {"vital-signs", "laboratory"}),
        ({"category": "http://example.org/other|vital-signs"}, set()),
        ({"category": "|vital-signs"}, set()),  # "|code": the coding must have no system
    ],
)  # fmt: skip
def test_search_by_category(
    provider: ProviderServer, params: dict[str, str], expected: set[str]
) -> None:
    found = everything(provider, "Observation", patient=provider.people[0].local_id, **params)
    assert {r["category"][0]["coding"][0]["code"] for r in found} == expected


@pytest.mark.parametrize(
    "code", ["http://loinc.org|8867-4", "8867-4", "http://loinc.org|8867-4,http://loinc.org|9279-1"]
)
def test_search_by_code(provider: ProviderServer, code: str) -> None:
    found = everything(provider, "Observation", code=code, _count="100")
    wanted = {c.rpartition("|")[2] for c in code.split(",")}
    assert found and {r["code"]["coding"][0]["code"] for r in found} == wanted
    everyone = everything(provider, "Observation", _count="500")
    assert len(found) == sum(r["code"]["coding"][0]["code"] in wanted for r in everyone)


def _day(resource: dict[str, Any]) -> str:
    return str(resource["effectiveDateTime"][:10])


@pytest.mark.parametrize("prefix", ["", "eq", "ne", "gt", "lt", "ge", "le", "sa", "eb"])
def test_search_by_date_prefix(provider: ProviderServer, prefix: str) -> None:
    local = provider.people[0].local_id
    every = everything(provider, "Observation", patient=local)
    pivot = sorted(_day(r) for r in every)[len(every) // 2]  # a day some readings fall on
    found = everything(provider, "Observation", patient=local, date=f"{prefix}{pivot}")
    # A reading is a point in time; the search value is the whole day (search.html#prefix).
    expected = {
        "": lambda d: d == pivot, "eq": lambda d: d == pivot, "ne": lambda d: d != pivot,
        "gt": lambda d: d > pivot, "sa": lambda d: d > pivot, "ge": lambda d: d >= pivot,
        "lt": lambda d: d < pivot, "eb": lambda d: d < pivot, "le": lambda d: d <= pivot,
    }[prefix]  # fmt: skip
    assert sorted(r["id"] for r in found) == sorted(r["id"] for r in every if expected(_day(r)))


def test_date_range_with_two_parameters_and_coarse_precision(provider: ProviderServer) -> None:
    local = provider.people[0].local_id
    every = everything(provider, "Encounter", patient=local)
    year = every[0]["period"]["start"][:4]
    response = HTTP.get(
        f"{provider.base_url}/Encounter",
        params=[("patient", local), ("date", f"ge{year}"), ("date", f"lt{int(year) + 1}-01")],
    )
    found = resources(response.json())
    assert {r["id"] for r in found} == {r["id"] for r in every if r["period"]["start"][:4] == year}


def test_results_are_newest_first(provider: ProviderServer) -> None:
    found = everything(provider, "Observation", patient=provider.people[0].local_id)
    dates = [r["effectiveDateTime"] for r in found]
    assert dates == sorted(dates, reverse=True)


@pytest.mark.parametrize("count", [1, 5, 13, 50])
def test_paging_with_count_and_next_links(provider: ProviderServer, count: int) -> None:
    local = provider.people[0].local_id
    first = search(provider, "Observation", patient=local, _count=str(count))
    assert len(first["entry"]) == min(count, 13) and first["total"] == 13
    assert any(link["relation"] == "next" for link in first["link"]) == (count < 13)
    pages = everything(provider, "Observation", patient=local, _count=str(count))
    assert len(pages) == 13 and len({r["id"] for r in pages}) == 13
    assert [r["id"] for r in pages] == [
        r["id"] for r in resources(search(provider, "Observation", patient=local))
    ]


def test_summary_count_and_post_search(provider: ProviderServer) -> None:
    local = provider.people[0].local_id
    counted = search(provider, "Observation", patient=local, _summary="count")
    assert counted["total"] == 13 and "entry" not in counted
    posted = HTTP.post(
        f"{provider.base_url}/Observation/_search",
        data={"patient": local, "category": "vital-signs"},
    )
    assert posted.status_code == 200
    assert {r["category"][0]["coding"][0]["code"] for r in resources(posted.json())} == {
        "vital-signs"
    }


@pytest.mark.parametrize(
    ("path", "params", "headers", "status", "says"),
    [
        ("/Observation", {"colour": "red"}, {"Prefer": "handling=strict"}, 400, "colour"),
        ("/Observation", {"date": "2024-02-30"}, {}, 400, "not a valid date"),
        ("/Observation", {"date": "yesterday"}, {}, 400, "not a FHIR date"),
        ("/Observation", {"_count": "many"}, {}, 400, "_count"),
        ("/Observation", {"_sort": "colour"}, {}, 400, "_sort"),
        ("/Observation", {"patient": "Practitioner/1"}, {}, 400, "Patient"),
        ("/Medication", {}, {}, 404, "Medication"),
        ("/Observation/nope-o1", {}, {}, 404, "not known"),
    ],
)  # fmt: skip
def test_bad_requests_get_an_operation_outcome(
    provider: ProviderServer,
    path: str,
    params: dict[str, str],
    headers: dict[str, str],
    status: int,
    says: str,
) -> None:
    response = HTTP.get(f"{provider.base_url}{path}", params=params, headers=headers)
    assert response.status_code == status
    body = response.json()
    assert body["resourceType"] == "OperationOutcome"
    assert says in body["issue"][0]["diagnostics"]


def test_unknown_parameters_are_ignored_without_strict_handling(provider: ProviderServer) -> None:
    bundle = search(provider, "Observation", patient=provider.people[0].local_id, colour="red")
    assert bundle["total"] == 13
    assert "colour" not in bundle["link"][0]["url"]


def test_capability_statement(provider: ProviderServer) -> None:
    response = HTTP.get(f"{provider.base_url}/metadata")
    assert response.status_code == 200
    statement = response.json()
    r4b_model("CapabilityStatement").model_validate(statement)
    resources_ = {r["type"]: r for r in statement["rest"][0]["resource"]}
    assert set(resources_) == set(RESOURCE_TYPES)
    observation = {p["name"] for p in resources_["Observation"]["searchParam"]}
    assert {"patient", "subject", "category", "code", "date"} <= observation


# -- date semantics hold for every value (search.html#prefix) --------------------------------
_DATES = st.datetimes(min_value=datetime(2019, 1, 1), max_value=datetime(2026, 12, 31)).map(
    lambda d: d.replace(tzinfo=UTC)
)
_PRECISION = st.sampled_from([4, 7, 10, 16, 19])


@settings(max_examples=60, deadline=None)
@given(search_at=_DATES, precision=_PRECISION, target=_DATES)
def test_date_prefixes_partition_point_values(
    search_at: datetime, precision: int, target: datetime
) -> None:
    value = search_at.strftime("%Y-%m-%dT%H:%M:%S")[:precision]
    if precision > 10:
        value += "Z"
    resource = {
        "resourceType": "Observation",
        "id": "x",
        "effectiveDateTime": target.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }

    def matches(prefix: str) -> bool:
        query = parse(
            "Observation", [("date", f"{prefix}{value}")], strict=True, default_count=10,
            max_count=10, resolve_identifier=lambda v, s: None,
        )  # fmt: skip
        return query.matches(resource)

    start, end = date_range(value)
    point = target.replace(microsecond=0)
    assert matches("eq") == (start <= point < end)
    assert matches("eq") != matches("ne")
    assert matches("lt") + matches("eq") + matches("gt") == 1  # a point is before, in or after
    assert matches("ge") == (matches("gt") or matches("eq"))
    assert matches("le") == (matches("lt") or matches("eq"))
    assert matches("sa") == matches("gt") and matches("eb") == matches("lt")
    assert not matches("eq") or matches("ap")  # "approximately" widens the range


def test_in_process_app_state_exposes_people_and_requests() -> None:
    app = create_provider_app(ProviderConfig(id="inproc", people=5))
    state = provider_state(app)
    assert [p.local_id for p in state.data.people] == [
        p.local_id for p in provider_people(ProviderConfig(id="inproc", people=5))
    ]
    assert state.requests.maxlen == 10_000
