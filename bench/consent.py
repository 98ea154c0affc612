"""Benchmark of the consent decision engine on one core (a benchmark, not a test).

Target (issue 5): at least 100,000 decisions/s on one core, for 40-resource responses under
a realistic policy. "Realistic" here: the shipped default policy plus 22 regional rules
(roles, purposes, organisations, providers, resource types and SNOMED/LOINC codes), a person
with three consent records (a named-provider opt-out, a withheld category with an emergency
exception, an expired opt-out), and responses of 40 resources of 8 types from 3 providers,
some carrying sensitivity labels, with codes drawn from pools of a few hundred.

Every response pays the full per-request cost: build a Decider (context, consents) and run
``filter`` over the 40 resources, per provider as a federated query would, with metrics on.
A record is opened for 10 queries in a row by one user (REQUIREMENTS §2), then the next of
5,000 people, each with their own three records.

Phases (single thread, pinned to one CPU, ``time.perf_counter``; after a warm-up, each
phase's measured time is cut into slices run round-robin with the other phases'):

  response       decider + filter of a 40-resource response, people with 3 consent records
  response-cold  the same, but every response for a different person (no reuse at all)
  response-nc    as ``response`` for people without consent records (90% of the population)
  response-nom   as ``response`` with metrics off (what Prometheus costs)
  decide         ``Decider.decide`` alone on a warm decider (the per-resource floor)

Rates are given per wall-clock second (overall and the best slice), per CPU-second of the
benchmark's thread, and at the median response time: on a shared machine the wall clock
also counts time the thread waited for a core.

Prints a table and writes JSON to bench/results/consent-<ts>.json.

    python bench/consent.py                  # ~30 s
    python bench/consent.py --seconds 10 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__:
    from . import common
else:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common

from sharedcare.consent import PolicySet, RequestContext
from sharedcare.consent.policy import PackageSource

TARGET_DECISIONS_PER_S = 100_000
RESPONSE_SIZE = 40
QUERIES_PER_RECORD = 10  # REQUIREMENTS §2
PEOPLE = 5000  # distinct people (each with 3 records), more than the engine keeps compiled
SNOMED = "http://snomed.info/sct"
LOINC = "http://loinc.org"
ACT = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONF = "http://terminology.hl7.org/CodeSystem/v3-Confidentiality"
DMD = "https://dmd.nhs.uk"
PROVIDERS = ("gp-leeds-1", "ltht-acute", "lypft-mh")

EXTRA_RULES = f"""
[sets]
admin_roles = ["R8006", "R8008", "R8009", "R8010"]
social_care_orgs = ["SC001", "SC002", "SC003", "SC004"]
clinical_types = ["Observation", "Condition", "MedicationRequest", "MedicationStatement", "Procedure", "DiagnosticReport", "DocumentReference", "AllergyIntolerance"]
gender_codes = ["{SNOMED}|93461009", "{SNOMED}|407374003", "{SNOMED}|407375002"]
reproductive_codes = ["{SNOMED}|386639001", "{SNOMED}|52765003", "{SNOMED}|177128002", "{SNOMED}|63596003"]
safeguarding_codes = ["{SNOMED}|951201000000107", "{SNOMED}|2981000000106", "{SNOMED}|872691000000100"]
embargoed_tests = ["{LOINC}|7917-8", "{LOINC}|75622-1", "{LOINC}|56888-1", "{LOINC}|48345-3"]
research_orgs = ["RES01", "RES02"]

[labels]
research-only = {{ system = "https://sharedcare.example.org/fhir/CodeSystem/consent-label", code = "research-only" }}
pseudonymise = {{ system = "{ACT}", code = "PSEUD" }}
"""

RULES = [
    ("never-audit", 'when.type = ["AuditEvent", "Provenance", "Consent"]', "withhold"),
    ("admin-no-clinical", 'when.role = "@admin_roles"\nwhen.type = "@clinical_types"', "withhold"),
    ("social-care-no-results", 'when.organization = "@social_care_orgs"\nwhen.type = ["Observation", "DiagnosticReport", "MedicationRequest"]\nunless.purpose = "ETREAT"', "withhold"),
    ("gender-identity", 'when.code = "@gender_codes"\nunless.purpose = "@direct_care"\nunless.role = "@clinical_roles"', "withhold"),
    ("gender-identity-direct", 'when.code = "@gender_codes"', "qualify:no-redisclosure"),
    ("reproductive", 'when.code = "@reproductive_codes"\nunless.purpose = "@direct_care"\nunless.role = "@clinical_roles"', "withhold"),
    ("reproductive-direct", 'when.code = "@reproductive_codes"', "qualify:no-redisclosure"),
    ("safeguarding", 'when.code = "@safeguarding_codes"\nunless.role = "@clinical_roles"', "withhold"),
    ("safeguarding-flag", 'when.type = "Flag"\nunless.role = "@clinical_roles"', "withhold"),
    ("lab-embargo", 'when.code = "@embargoed_tests"\nwhen.provider = "ltht-acute"\nunless.role = ["R8000"]', "withhold"),
    ("mh-documents", 'when.provider = "lypft-mh"\nwhen.type = "DocumentReference"', "qualify:no-redisclosure"),
    ("mh-notes-students", 'when.provider = "lypft-mh"\nwhen.role = "R8004"', "withhold"),
    ("research", 'when.purpose = ["HRESCH", "CLINTRCH"]\nwhen.organization = "@research_orgs"', "qualify:research-only,pseudonymise"),
    ("research-elsewhere", 'when.purpose = ["HRESCH", "CLINTRCH"]', "withhold"),
    ("population-health", 'when.purpose = ["POPHLTH", "PUBHLTH"]\nunless.type = ["Observation", "Condition", "Immunization", "Encounter"]', "withhold"),
    ("population-health-use", 'when.purpose = ["POPHLTH", "PUBHLTH"]', "qualify:pseudonymise,no-persistence"),
    ("payment", 'when.purpose = "HPAYMT"\nunless.type = ["Encounter", "Coverage", "Claim"]', "withhold"),
    ("legal", 'when.purpose = "HLEGAL"', "withhold"),
    ("sysadmin", 'when.purpose = "HSYSADMIN"', "withhold"),
    ("family-request", 'when.purpose = ["FAMRQT", "PWATRNY"]\nwhen.type = "@clinical_types"', "withhold"),
    ("quality", 'when.purpose = "HQUALIMP"\nwhen.label = "@sensitive"', "withhold"),
    ("student-sensitive", 'when.role = "R8004"\nwhen.label = "@sensitive"', "withhold"),
]


def realistic_policy() -> PolicySet:
    """The default policy with the regional sets, labels and rules above merged in."""
    default = PackageSource().read()
    head, _, rest = default.partition("[[rule]]")
    sets_block, _, labels_tail = EXTRA_RULES.partition("[labels]")
    sets_lines = sets_block.replace("[sets]", "").strip()
    labels_lines = labels_tail.strip()
    head = head.replace("[sets]\n", "[sets]\n" + sets_lines + "\n", 1).replace("[labels]\n", "[labels]\n" + labels_lines + "\n", 1)
    rules = []
    for rid, when, decision in RULES:
        if decision.startswith("qualify:"):
            names = ", ".join(f'"{n}"' for n in decision.split(":", 1)[1].split(","))
            body = f'decision = "qualify"\nlabels = [{names}]'
        else:
            body = f'decision = "{decision}"'
        rules.append(f'[[rule]]\nid = "{rid}"\n{when}\n{body}\n')
    # Regional rules go after the default's emergency override and before its sensitive rules.
    first, _, others = rest.partition("[[rule]]\nid = \"sensitive-direct-care\"")
    text = head + "[[rule]]" + first + "\n".join(rules) + "\n[[rule]]\nid = \"sensitive-direct-care\"" + others
    return PolicySet.from_text(text, "bench-policy")


# --------------------------------------------------------------------------- data


def consent_records(person: int = 1) -> list[dict[str, Any]]:
    """Three records of one person, as the store returns them (ids and meta differ per person)."""
    base = {
        "resourceType": "Consent",
        "meta": {"versionId": "1", "lastUpdated": f"2023-04-01T10:{person % 60:02d}:00Z"},
        "status": "active",
        "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}]},
        "category": [{"coding": [{"system": LOINC, "code": "59284-0"}]}],
        "patient": {"reference": f"Patient/p{person}"},
        "dateTime": "2023-04-01",
    }
    optin = {"coding": [{"system": ACT, "code": "OPTIN"}]}
    return [
        {**base, "id": f"{person}-not-gp", "policyRule": optin, "provision": {
            "type": "deny",
            "actor": [{"role": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType", "code": "CST"}]},
                       "reference": {"identifier": {"value": "gp-leeds-1"}}}],
        }},
        {**base, "id": f"{person}-no-docs", "policyRule": optin, "provision": {
            "type": "deny",
            "class": [{"system": "http://hl7.org/fhir/resource-types", "code": "DocumentReference"}],
            "securityLabel": [{"system": ACT, "code": "PSY"}],
            "provision": [{"type": "permit", "purpose": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActReason", "code": "ETREAT"}]}],
        }},
        {**base, "id": f"{person}-old-optout", "policyRule": {"coding": [{"system": ACT, "code": "OPTOUT"}]},
         "provision": {"period": {"start": "2019-01-01", "end": "2020-12-31"}}},
    ]


def _cc(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


def make_resource(rng: random.Random, n: int) -> dict[str, Any]:
    """One plausible clinical resource (a few hundred bytes to a few KB)."""
    rtype = rng.choices(
        ["Observation", "Condition", "MedicationRequest", "Encounter", "Procedure", "AllergyIntolerance", "Immunization", "DocumentReference"],
        weights=[15, 6, 6, 4, 3, 2, 2, 2],
    )[0]
    r: dict[str, Any] = {
        "resourceType": rtype,
        "id": f"{rtype[:3].lower()}-{n}",
        "meta": {"versionId": "1", "lastUpdated": "2025-01-02T10:00:00Z", "source": "urn:provider"},
        "subject": {"reference": "Patient/p1"},
    }
    code = str(rng.randint(100000, 100400))
    if rtype == "Observation":
        loinc = rng.choice(["7917-8", "2345-7", "718-7", "4548-4", "8480-6", "8462-4", "29463-7"]) if rng.random() < 0.3 else f"{code}-1"
        r |= {"status": "final", "category": [_cc("http://terminology.hl7.org/CodeSystem/observation-category", "laboratory", "Laboratory")],
              "code": _cc(LOINC, loinc, "Test"), "valueQuantity": {"value": rng.random() * 10, "unit": "mmol/L"},
              "effectiveDateTime": "2025-01-01T09:00:00Z"}
    elif rtype == "Condition":
        sct = rng.choice(["93461009", "386639001", "44054006", "38341003", "195967001"]) if rng.random() < 0.25 else code
        r |= {"clinicalStatus": _cc("http://terminology.hl7.org/CodeSystem/condition-clinical", "active", "Active"),
              "code": {"coding": [{"system": SNOMED, "code": sct, "display": "Condition"}, {"system": "http://hl7.org/fhir/sid/icd-10", "code": "X00"}]}}
    elif rtype == "MedicationRequest":
        r |= {"status": "active", "intent": "order", "medicationCodeableConcept": _cc(DMD, code, "Drug"),
              "reasonCode": [_cc(SNOMED, str(rng.randint(1000, 1100)), "Reason")], "dosageInstruction": [{"text": "one daily"}]}
    elif rtype == "Encounter":
        r |= {"status": "finished", "class": {"code": "AMB"}, "type": [_cc(SNOMED, "185349003", "Consultation")],
              "reasonCode": [_cc(SNOMED, code, "Reason")], "period": {"start": "2025-01-01T09:00:00Z"}}
    elif rtype == "Procedure":
        r |= {"status": "completed", "code": _cc(SNOMED, rng.choice(["52765003", code, code]), "Procedure")}
    elif rtype == "AllergyIntolerance":
        r |= {"code": _cc(SNOMED, code, "Allergy"), "patient": {"reference": "Patient/p1"}}
    elif rtype == "Immunization":
        r |= {"status": "completed", "vaccineCode": _cc(SNOMED, code, "Vaccine"), "occurrenceDateTime": "2024-10-01"}
    else:
        r |= {"status": "current", "type": _cc(LOINC, "11488-4", "Consult note"), "content": [{"attachment": {"url": "Binary/1"}}]}
    roll = rng.random()
    if roll < 0.05:
        r["meta"]["security"] = [{"system": ACT, "code": rng.choice(["PSY", "HIV", "SDV", "STD", "ETH"])}]
    elif roll < 0.08:
        r["meta"]["security"] = [{"system": CONF, "code": "R"}]
    elif roll < 0.09:
        r["meta"]["security"] = [{"system": CONF, "code": "V"}]
    elif roll < 0.30:
        r["meta"]["security"] = [{"system": CONF, "code": "N"}]
    return r


def make_responses(count: int, seed: int = 5) -> list[list[tuple[str, list[dict[str, Any]]]]]:
    """``count`` responses, each 40 resources grouped by source provider."""
    rng = random.Random(seed)
    out = []
    n = 0
    for _ in range(count):
        groups: dict[str, list[dict[str, Any]]] = {p: [] for p in PROVIDERS}
        for _ in range(RESPONSE_SIZE):
            n += 1
            groups[rng.choice(PROVIDERS)].append(make_resource(rng, n))
        out.append([(p, rs) for p, rs in groups.items() if rs])
    return out


CONTEXTS = [
    RequestContext("portal", "R8000", "RR8", "TREAT"),
    RequestContext("portal", "R8001", "RR8", "TREAT"),
    RequestContext("ed-epr", "R8000", "RXX", "ETREAT"),
    RequestContext("sc-portal", "R8003", "SC001", "TREAT"),
    RequestContext("portal", "R8010", "RR8", "TREAT"),
]


# --------------------------------------------------------------------------- phases


class Runner:
    """Calls ``fn(i)`` (returning decisions made) back to back, in slices interleaved with the
    other phases' slices, so that load from elsewhere on a shared machine hits every phase
    alike. Keeps per-call latencies, wall and CPU time, and the rate of each slice."""

    def __init__(self, fn: Callable[[int], int]):
        self.fn = fn
        self.i = 0
        self.latencies: list[float] = []
        self.decisions = 0
        self.wall = 0.0
        self.cpu = 0.0
        self.slice_rates: list[float] = []

    def warm(self, seconds: float) -> None:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            self.fn(self.i)
            self.i += 1

    def run(self, seconds: float) -> None:
        fn, latencies = self.fn, self.latencies
        decisions = 0
        cpu0 = time.thread_time()
        start = t = time.perf_counter()
        end = start + seconds
        while t < end:
            decisions += fn(self.i)
            self.i += 1
            now = time.perf_counter()
            latencies.append((now - t) * 1e6)
            t = now
        self.cpu += time.thread_time() - cpu0
        self.wall += t - start
        self.decisions += decisions
        self.slice_rates.append(decisions / (t - start))

    def summary(self) -> dict[str, Any]:
        lat = common.latency_summary(self.latencies)
        rates = sorted(self.slice_rates)
        return {
            "calls": len(self.latencies),
            "decisions": self.decisions,
            "seconds": round(self.wall, 3),
            "cpu_seconds": round(self.cpu, 3),
            "decisions_per_s": round(self.decisions / self.wall),
            "decisions_per_s_best_slice": round(rates[-1]),
            "decisions_per_s_median_slice": round(common.percentile(rates, 50) or 0),
            # Per CPU-second of this thread: the rate on a core of our own, which a shared,
            # busy machine's wall clock understates.
            "decisions_per_cpu_s": round(self.decisions / self.cpu) if self.cpu else None,
            "decisions_per_s_at_p50": round(RESPONSE_SIZE / lat["p50"] * 1e6) if lat["p50"] else None,
            "us_per_call_p50": round(lat["p50"] or 0, 1),
            "us_per_call_p99": round(lat["p99"] or 0, 1),
            "us_per_call_mean": round(lat["mean"] or 0, 1),
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per phase")
    ap.add_argument("--rounds", type=int, default=6, help="slices each phase's time is cut into, interleaved")
    ap.add_argument("--warmup", type=float, default=1.5, help="warm-up seconds per phase")
    ap.add_argument("--responses", type=int, default=500, help="distinct generated responses")
    ap.add_argument("--profile", action="store_true", help="cProfile the response phase and print the top functions")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    cpu = max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    policy = realistic_policy()
    consents = consent_records()
    responses = make_responses(args.responses)
    common.log(f"policy {policy.version}: {len(policy.policy.rules)} rules; {len(responses)} responses; CPU {cpu}")

    people = [consent_records(p) for p in range(PEOPLE)]

    def response(queries_per_person: int, with_consents: bool, record: bool) -> Callable[[int], int]:
        """One 40-resource response; a person's record is opened for ``queries_per_person``
        responses in a row (REQUIREMENTS §2: 10 queries per record opened) by one user."""
        def fn(i: int) -> int:
            person = i // queries_per_person
            records = people[person % PEOPLE] if with_consents else []
            decider = policy.decider(CONTEXTS[person % len(CONTEXTS)], records)
            n = 0
            for provider, resources in responses[i % len(responses)]:
                result = decider.filter(resources, provider, record=record)
                n += len(result.released) + result.withheld
            return n
        return fn

    warm = policy.decider(CONTEXTS[0], consents)
    flat = [(p, r) for resp in responses for p, rs in resp for r in rs]

    def decide(i: int) -> int:
        start = (i * RESPONSE_SIZE) % len(flat)
        d = warm.decide
        for provider, r in flat[start : start + RESPONSE_SIZE]:
            d(r, provider)
        return min(RESPONSE_SIZE, len(flat) - start)

    phases = {
        "response": response(QUERIES_PER_RECORD, True, True),
        "response-cold": response(1, True, True),
        "response-nc": response(QUERIES_PER_RECORD, False, True),
        "response-nom": response(QUERIES_PER_RECORD, True, False),
        "decide": decide,
    }
    quiet = common.wait_for_quiet(threshold=1.0, max_wait=20)
    runners = {name: Runner(fn) for name, fn in phases.items()}
    for runner in runners.values():
        runner.warm(args.warmup)
    for r in range(args.rounds):
        for runner in runners.values():
            gc.collect()
            runner.run(args.seconds / args.rounds)
        common.log(f"round {r + 1}/{args.rounds}")
    results: dict[str, Any] = {name: runner.summary() for name, runner in runners.items()}

    # Outcome mix, so a reader can see the policy does real work.
    mix: dict[str, int] = {}
    for i, resp in enumerate(responses[:200]):
        d = policy.decider(CONTEXTS[i % len(CONTEXTS)], consent_records(i))
        for provider, rs in resp:
            for r in rs:
                o = d.decide(r, provider)
                key = f"{o.decision.value}:{o.rule}"
                mix[key] = mix.get(key, 0) + 1

    profile_text = None
    if args.profile:
        prof = cProfile.Profile()
        fn = phases["response"]
        prof.enable()
        for i in range(20_000):
            fn(i)
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(15)
        profile_text = buf.getvalue()
        print(profile_text)

    rows = [
        [name, r["decisions_per_s"], r["decisions_per_s_best_slice"], r["decisions_per_cpu_s"],
         r["decisions_per_s_at_p50"], r["us_per_call_p50"], r["us_per_call_p99"], r["calls"]]
        for name, r in results.items()
    ]
    common.print_table(
        f"consent decisions on one core (target ≥ {TARGET_DECISIONS_PER_S:,}/s; a call = one 40-resource response)",
        ["phase", "decisions/s (wall)", "best slice", "decisions/CPU-s", "at p50", "µs/call p50", "µs/call p99", "calls"],
        rows,
    )
    head = results["response"]
    ok = head["decisions_per_s"] >= TARGET_DECISIONS_PER_S
    print(f"target {'met' if ok else 'MISSED'} on the wall clock: {head['decisions_per_s']:,} decisions/s "
          f"({head['decisions_per_cpu_s']:,} per CPU-second, {head['decisions_per_s_at_p50']:,} at the median "
          f"response; other load on the machine: {quiet}) "
          f"for 40-resource responses, people with 3 consent records, 10 queries per record opened, metrics on")
    print("outcome mix (first 200 responses):", dict(sorted(mix.items(), key=lambda kv: -kv[1])))
    out = args.json or common.RESULTS_DIR / f"consent-{common.timestamp()}.json"
    common.write_json(out, {
        "benchmark": "consent",
        "target_decisions_per_s": TARGET_DECISIONS_PER_S,
        "target_met": ok,
        "policy": {"version": policy.version, "rules": len(policy.policy.rules)},
        "consent_records_per_person": len(consents),
        "people": PEOPLE,
        "queries_per_record": QUERIES_PER_RECORD,
        "response_size": RESPONSE_SIZE,
        "responses": len(responses),
        "contexts": [c.__repr__() for c in CONTEXTS],
        "cpu": cpu,
        "machine_quiet": quiet,
        "rounds": args.rounds,
        "phases": results,
        "outcome_mix": mix,
        "profile": profile_text,
        "machine": common.machine_info(),
    })
    common.log(f"wrote {out}")


if __name__ == "__main__":
    main()
