"""Security signals: claims per participant, rejections by reason, duplicate jti."""

from __future__ import annotations

from typing import Any

import httpx
from conftest import TOKEN_URL
from prometheus_client.parser import text_string_to_metric_families

from sharedcare.iam.client import sign_assertion, token_form


async def samples(http: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = (await http.get("/metrics")).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def delta(before: dict, after: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    key = (name, frozenset(labels.items()))
    return after.get(key, 0.0) - before.get(key, 0.0)


async def test_claims_and_rejections_are_counted(
    anon_client: httpx.AsyncClient, register_system: Any, es_key: Any, es_key_b: Any
) -> None:
    await register_system("counted", es_key, "system/*.read")
    before = await samples(anon_client)
    good = token_form(sign_assertion(es_key, "counted", TOKEN_URL), "system/*.read")
    assert (await anon_client.post("/oauth2/token", data=good)).status_code == 200
    assert (await anon_client.post("/oauth2/token", data=good)).status_code == 400  # replay
    forged = token_form(sign_assertion(es_key_b, "counted", TOKEN_URL, header={"kid": es_key.kid}), "system/*.read")
    assert (await anon_client.post("/oauth2/token", data=forged)).status_code == 400
    stranger = token_form(sign_assertion(es_key, "stranger", TOKEN_URL), "system/*.read")
    assert (await anon_client.post("/oauth2/token", data=stranger)).status_code == 400
    after = await samples(anon_client)
    claims = "sharedcare_iam_claims_total"
    assert delta(before, after, claims, participant="counted", outcome="accepted") == 1
    assert delta(before, after, claims, participant="counted", outcome="rejected") == 2
    # an unregistered iss is not a label value: labels stay bounded
    assert delta(before, after, claims, participant="<unknown>", outcome="rejected") == 1
    rejections = "sharedcare_iam_claim_rejections_total"
    assert delta(before, after, rejections, reason="replayed_jti") == 1
    assert delta(before, after, rejections, reason="bad_signature") == 1
    assert delta(before, after, rejections, reason="unknown_client") == 1
    assert delta(before, after, "sharedcare_iam_duplicate_jti_total", participant="counted") == 1
    # every reason is exported, at zero if need be, so alert rules always find the series
    for reason in ("expired", "suspended", "bad_audience", "bad_scope"):
        assert (rejections, frozenset({("reason", reason)})) in after
