"""Consent: what may leave the platform, decided per resource (REQUIREMENTS §4).

One decision function serves every pathway (query, bulk export, subscriptions, messaging).
Per request, build a :class:`Decider` once; per resource it costs a few dict lookups::

    policies = PolicySet.load("policy.toml")          # or PolicySet.default()
    ctx = RequestContext.from_access(access)          # client, role, organisation, purpose
    decider = policies.decider(ctx, consents)         # the person's Consent resources (dicts)
    result = decider.filter(resources, provider="gp-leeds-1")
    result.released      # what may leave; qualified resources are labelled copies
    result.withheld      # how many were kept back
    result.notice()      # OperationOutcome for the consumer, None when nothing was withheld
    result.reviewed      # [("Type/id", Outcome)] releases the audit must flag for review

Public API
----------
``RequestContext(client_id, user_role=None, organization=None, purpose=None, provider=None)``
    Who asks, for which organisation, why (a v3 PurposeOfUse code), and the source provider
    when it is the same for the whole request. ``RequestContext.from_access(access)``.
``Provider.of(*aliases)``
    A provider known by several names (client id, ODS code, Organization id); a plain string
    is one name. Consent actors match on any of them.
``Decision``: ``RELEASE``, ``WITHHOLD``, ``QUALIFY``.
``Outcome(decision, rule, labels=(), review=False, reason="")``
    ``rule`` is a policy rule id, or ``consent`` / ``default`` / ``malformed`` (the engine's).
``Coding(system, code, display=None)``: a security label.
``PolicySet.load(path)``, ``PolicySet.default()``, ``PolicySet.from_text(text)``
    ``.version``, ``.digest`` (sha256 of the text), ``.reload()`` (keeps the policy in force
    and raises :class:`PolicyError` when the new text is bad),
    ``.decider(ctx, consents=(), *, now=None) -> Decider``: ``consents`` are the person's
    Consent resources as stored (any status; only active patient-privacy ones count);
    ``now`` defaults to the current time (naive values are UTC).
``Decider.decide(resource, provider=None) -> Outcome``
    Never mutates ``resource``. Anything unreadable is withheld (rule ``malformed``). A
    resource carrying others (``contained``, a Bundle's ``entry.resource``) is withheld if
    any of them is, and carries their qualifications; to release part of a Bundle, filter
    its entries instead.
``Decider.filter(resources, provider=None, *, record=True) -> Filtered``
    ``Filtered(released, withheld, qualified, reviewed)``, ``.review``, ``.notice()``;
    counts the decisions in the metrics unless ``record=False``.
``Decider.consent_refs``, ``Decider.policy_version``: for the audit record.
``withheld_notice(count) -> dict`` (an OperationOutcome.issue), ``withheld_outcome(count)``
    (a whole OperationOutcome): issue-type ``suppressed``, severity warning, details coding
    ``https://sharedcare.example.org/fhir/CodeSystem/issue|consent-withheld``.
``check_consent_record(resource)``
    Raises a 422 :class:`~sharedcare.fhir.errors.FHIRError` when the hub could not honour a
    Consent as written (scope, patient, policyRule, provisions).
``sharedcare.consent.metrics``: counters, ``count_consents_by_policy(store)``,
    ``refresh_consent_records(store)``.

Cost
----
Per request: the rules for the context (role, organisation, purpose, client) are cached
per policy version; a person's compiled records, and the outcomes already decided for them,
are reused while the records' JSON and the context are the same and no period or
``dateTime`` boundary has passed (a record opened in a portal is queried ~10 times). Per
resource: the type, the few labels and codes any rule or record mentions, and the source
provider form a key into a memo of outcomes; a miss walks the records and the rules.
``bench/consent.py`` measures it.

How a decision is made
----------------------
1. The person's consent records in force (active, patient-privacy, ``dateTime`` reached,
   inside the root ``provision.period``) give ``deny``, ``permit`` or no opinion for the
   resource; any record denying wins. See :mod:`sharedcare.consent.records` for the reading
   of R4 provisions (base policyRule, nested exceptions, fail-closed criteria).
2. The policy's rules are tried in file order; the first that applies decides. A rule
   applies when every key of its ``when`` table holds and its ``unless`` table (if any)
   does not wholly hold. If the consent denies the resource, a releasing rule applies only
   if its ``when.consent`` names ``deny``; such an override is always flagged for review.
3. No rule applied: withheld (rule ``consent``) if the consent denies it, else the
   policy's ``[default]`` decision (rule ``default``).

Policy file (TOML)
------------------
::

    version = "north-region-2025.3"      # required; recorded with every decision's audit
    description = "..."

    [sets]                                 # named lists, used as "@name" in conditions
    clinical_roles = ["R8000", "R8001"]

    [labels]                               # named qualification labels
    no-redisclosure = { system = "http://terminology.hl7.org/CodeSystem/v3-ActCode", code = "NORDSCLCD" }

    [[rule]]
    id = "sensitive-direct-care"           # unique; the metric and audit label
    when.label = "@sensitive"              # conditions (AND across keys, OR within a list)
    when.purpose = ["TREAT", "ETREAT"]
    unless.organization = "X99"           # optional exception to the rule
    decision = "qualify"                   # release | withhold | qualify
    labels = ["no-redisclosure"]           # qualify only: names from [labels] or "system|code"
    review = false                         # flag releases by this rule for review
    reason = "..."                         # recorded in the audit

    [default]
    decision = "release"

Condition keys: ``type`` (resource types), ``label`` (``meta.security``, ``system|code``),
``code`` (the resource's codes, see :mod:`sharedcare.consent.features`), ``provider``
(the resource's source), ``consent`` (``deny``, ``permit``, ``none``), ``role``,
``organization``, ``purpose``, ``client``.
"""

from __future__ import annotations

from sharedcare.consent.decider import Decider, with_labels
from sharedcare.consent.model import (
    Coding,
    Decision,
    Filtered,
    Outcome,
    Provider,
    RequestContext,
)
from sharedcare.consent.notice import withheld_issue, withheld_notice, withheld_outcome
from sharedcare.consent.policy import Policy, PolicySet, PolicySource, parse_policy
from sharedcare.consent.policy_file import PolicyError
from sharedcare.consent.validation import check_consent_record

__all__ = [
    "Coding",
    "Decider",
    "Decision",
    "Filtered",
    "Outcome",
    "Policy",
    "PolicyError",
    "PolicySet",
    "PolicySource",
    "Provider",
    "RequestContext",
    "check_consent_record",
    "parse_policy",
    "with_labels",
    "withheld_issue",
    "withheld_notice",
    "withheld_outcome",
]
