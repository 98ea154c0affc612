"""Stamping a provider's page: meta.source, hub fullUrls, provider URLs rewritten to the hub's."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharedcare.query.merge import Stamp

PROXY = "http://hub.example/fhir/providers/gp"


def _page(stamp: Stamp, resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    raw = stamp.entries("Observation", resources)
    return orjson.loads(b"[" + raw + b"]")


@pytest.mark.parametrize(
    "provider_base",
    [
        "http://gp.example/fhir",
        "http://hub.example",  # the hub's own URLs start with this provider's base
        "http://hub.example/fhir/providers",
    ],
)
def test_references_into_the_provider_become_hub_urls_and_full_urls_stay_the_hubs(
    provider_base: str,
) -> None:
    stamp = Stamp("gp", provider_base, PROXY)
    resource = {
        "resourceType": "Observation",
        "id": "o1",
        "meta": {"versionId": "3"},
        "subject": {"reference": f"{provider_base}/Patient/p1"},
        "note": [{"text": f"see {provider_base}/x"}],  # not a reference: left as written
    }
    [entry] = _page(stamp, [resource])
    assert entry["fullUrl"] == f"{PROXY}/Observation/o1"
    assert entry["search"] == {"mode": "match"}
    got = entry["resource"]
    assert got["meta"] == {"versionId": "3", "source": PROXY}
    assert got["subject"]["reference"] == f"{PROXY}/Patient/p1"
    assert got["note"][0]["text"] == f"see {provider_base}/x"


def test_an_empty_page_renders_nothing() -> None:
    assert Stamp("gp", "http://gp.example/fhir", PROXY).entries("Observation", []) == b""


_text = st.text(alphabet='ab/:"\\é ', max_size=12)
_value = st.one_of(
    _text,
    st.sampled_from(["http://gp.example/fhir/Patient/1", "http://hub.example/x", "Patient/1"]),
)


@given(
    st.lists(
        st.fixed_dictionaries(
            {"id": st.text(alphabet="abc123-.", min_size=1, max_size=8)},
            optional={"meta": st.dictionaries(st.sampled_from(["versionId", "source"]), _text)},
        ).flatmap(
            lambda base: st.dictionaries(st.sampled_from(["a", "b", "note"]), _value).map(
                lambda extra: {"resourceType": "Observation", **extra, **base}
            )
        ),
        max_size=5,
    ),
    st.sampled_from(["http://gp.example/fhir", "http://hub.example"]),
)
def test_a_whole_page_renders_as_each_resource_does_alone(
    resources: list[dict[str, Any]], provider_base: str
) -> None:
    stamp = Stamp("gp", provider_base, PROXY)
    alone = [orjson.loads(stamp.render(copy.deepcopy(r))) for r in resources]
    assert [e["resource"] for e in _page(stamp, copy.deepcopy(resources))] == alone
