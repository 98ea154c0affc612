"""Keyset paging of searches (search.html#paging): next/previous links, on both databases.

Following ``next`` to the end must return every match exactly once, in order; ``previous``
must walk back over the same pages; resources inserted while a client pages must not make
it see an existing match twice or miss one.
"""

from __future__ import annotations

import uuid
import warnings
from typing import Any

import httpx
from helpers import FHIR_JSON
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# When a @given test fails, hypothesis' pytest plugin imports this module (and libcst, which
# uses the deprecated mypy_extensions.TypedDict); under `-W error` that DeprecationWarning
# becomes an INTERNALERROR that hides the failure. Import it now, with the warning silenced.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)
    try:
        import hypothesis.extra._patching  # noqa: F401
    except ImportError:  # libcst not installed: the plugin then skips the import itself
        pass

SORTS = [None, "_lastUpdated", "-_lastUpdated"]


def link(bundle: dict[str, Any], relation: str) -> str | None:
    return next((x["url"] for x in bundle.get("link", []) if x["relation"] == relation), None)


def ids_of(bundle: dict[str, Any]) -> list[str]:
    return [e["resource"]["id"] for e in bundle.get("entry", []) if e["search"]["mode"] == "match"]


def chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def chunks_from_end(items: list[str], size: int) -> list[list[str]]:
    """Pages aligned to the end of ``items`` (what walking backwards produces)."""
    return [list(reversed(c)) for c in reversed(chunks(items[::-1], size))]


async def create_patient(client: httpx.AsyncClient, tag: str, n: int, gender: str = "female") -> str:
    body = {
        "resourceType": "Patient",
        "meta": {"tag": [{"system": "urn:test:run", "code": tag}]},
        "name": [{"family": f"Page{n:02d}", "given": ["Test"]}],
        "gender": gender,
    }
    response = await client.post("/fhir/Patient", json=body, headers=FHIR_JSON)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def first_url(tag: str, count: int, sort: str | None, extra: str = "") -> str:
    url = f"/fhir/Patient?_tag=urn:test:run|{tag}&_count={count}{extra}"
    return url + (f"&_sort={sort}" if sort else "")


async def walk(client: httpx.AsyncClient, url: str | None, relation: str) -> list[dict[str, Any]]:
    """Every page from ``url`` following ``relation`` links, in the order visited."""
    pages = []
    while url:
        response = await client.get(url)
        assert response.status_code == 200, response.text
        pages.append(response.json())
        url = link(pages[-1], relation)
        assert len(pages) < 200, "paging does not end"
    return pages


async def test_forward_and_back_with_count_3(client: httpx.AsyncClient) -> None:
    tag = "fixed"
    created = [await create_patient(client, tag, n, "male" if n % 4 == 0 else "female") for n in range(20)]
    # Touch three patients so that _lastUpdated order differs from insertion order.
    touched = [created[0], created[5], created[10]]
    for pid in touched:
        current = (await client.get(f"/fhir/Patient/{pid}")).json()
        current["active"] = True
        assert (await client.put(f"/fhir/Patient/{pid}", json=current, headers=FHIR_JSON)).status_code == 200
    by_time = [p for p in created if p not in touched] + touched
    expected_orders = {None: created, "_lastUpdated": by_time, "-_lastUpdated": by_time[::-1]}

    for sort, order in expected_orders.items():
        forward = await walk(client, first_url(tag, 3, sort), "next")
        assert [ids_of(p) for p in forward] == chunks(order, 3), sort
        assert [len(ids_of(p)) for p in forward] == [3] * 6 + [2]
        assert all(p["total"] == 20 for p in forward)
        assert link(forward[0], "previous") is None and link(forward[-1], "next") is None
        assert all(link(p, "previous") and link(p, "next") for p in forward[1:-1])
        for page in forward:
            self_link = link(page, "self") or ""
            assert "_count=3" in self_link and (sort is None or f"_sort={sort}" in self_link)
            assert "_cursor" not in self_link
        # previous walks back over the very same pages ...
        back = await walk(client, link(forward[-1], "previous"), "previous")
        assert [ids_of(p) for p in reversed(back)] == [ids_of(p) for p in forward[:-1]], sort
        assert link(back[-1], "previous") is None
        # ... and next from a page reached backwards is the page we came back from
        for i, page in enumerate(reversed(back)):
            after = (await client.get(link(page, "next") or "")).json()
            assert ids_of(after) == ids_of(forward[i + 1])
        # a link followed again gives the same page
        again = (await client.get(link(forward[0], "next") or "")).json()
        assert ids_of(again) == ids_of(forward[1])

    # with a filter: the links keep it
    males = [p for i, p in enumerate(created) if i % 4 == 0]
    pages = await walk(client, first_url(tag, 3, None, "&gender=male"), "next")
    assert [ids_of(p) for p in pages] == chunks(males, 3)
    assert all("gender=male" in (link(p, "next") or "gender=male") for p in pages)


async def test_paging_carries_includes_per_page(client: httpx.AsyncClient) -> None:
    org = (
        await client.post("/fhir/Organization", json={"resourceType": "Organization", "name": "O"}, headers=FHIR_JSON)
    ).json()["id"]
    created = []
    for n in range(5):
        body = {"resourceType": "Patient", "managingOrganization": {"reference": f"Organization/{org}"}}
        created.append((await client.post("/fhir/Patient", json=body, headers=FHIR_JSON)).json()["id"])
    pages = await walk(client, "/fhir/Patient?_count=2&_include=Patient:organization", "next")
    assert [ids_of(p) for p in pages] == chunks(created, 2)
    for page in pages:
        included = [e["resource"]["id"] for e in page["entry"] if e["search"]["mode"] == "include"]
        assert included == [org]


async def test_deleted_matches_disappear_without_breaking_the_walk(client: httpx.AsyncClient) -> None:
    created = [await create_patient(client, "del", n) for n in range(9)]
    first = (await client.get(first_url("del", 3, None))).json()
    second = (await client.get(link(first, "next") or "")).json()
    assert ids_of(second) == created[3:6]
    for pid in created[:3] + created[6:7]:  # the whole first page, and one ahead
        assert (await client.delete(f"/fhir/Patient/{pid}")).status_code == 204
    rest = await walk(client, link(second, "next"), "next")
    assert [ids_of(p) for p in rest] == [created[7:9]]
    # nothing is left before page 2: "previous" gives the first page, which can go on
    previous = (await client.get(link(second, "previous") or "")).json()
    assert ids_of(previous) == created[3:6] and link(previous, "next")
    assert previous["total"] == 5


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    n=st.integers(min_value=0, max_value=8),
    size=st.integers(min_value=1, max_value=4),
    sort=st.sampled_from(SORTS),
    insert_before=st.lists(st.integers(min_value=1, max_value=6), max_size=3),
)
async def test_pages_partition_the_result_even_while_inserting(
    client: httpx.AsyncClient, n: int, size: int, sort: str | None, insert_before: list[int]
) -> None:
    """Pages partition the result; inserts between page fetches never duplicate or skip
    an existing match (they only appear at the end, or not at all for -_lastUpdated)."""
    tag = uuid.uuid4().hex  # each example searches only its own patients
    existing = [await create_patient(client, tag, i) for i in range(n)]
    everything = (await client.get(first_url(tag, 1000, sort))).json()
    snapshot = ids_of(everything)
    assert snapshot == (existing[::-1] if sort == "-_lastUpdated" else existing)
    assert everything["total"] == n

    inserted: list[str] = []
    pages: list[dict[str, Any]] = []
    url: str | None = first_url(tag, size, sort)
    while url:
        for _ in range(insert_before.count(len(pages)) if pages else 0):
            inserted.append(await create_patient(client, tag, 100 + len(inserted)))
        response = await client.get(url)
        assert response.status_code == 200, response.text
        pages.append(response.json())
        url = link(pages[-1], "next")
        assert len(pages) <= n + len(inserted) + 1, "paging does not end"
    seen = [pid for page in pages for pid in ids_of(page)]
    assert len(seen) == len(set(seen)), "a match was returned twice"
    assert [p for p in seen if p in snapshot] == snapshot, "an existing match was skipped or moved"
    if sort == "-_lastUpdated":
        expected = snapshot  # newer resources sort before the cursor
    else:
        expected = snapshot + inserted  # appended in insertion order
    assert [ids_of(p) for p in pages] == (chunks(expected, size) or [[]])

    # Walking back from the last page returns the same pages, plus (newest first) pages
    # with whatever was inserted before the first page.
    back = await walk(client, link(pages[-1], "previous"), "previous")
    front = chunks_from_end(inserted[::-1], size) if sort == "-_lastUpdated" else []
    assert [ids_of(p) for p in reversed(back)] == front + [ids_of(p) for p in pages[:-1]]
