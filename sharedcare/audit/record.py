"""What one audit record holds, and the FHIR R4 AuditEvent it becomes.

An :class:`AuditRecord` is a plain value built by whoever releases or refuses patient data;
:func:`to_audit_event` turns it into an AuditEvent shaped after IHE Basic Audit Log Patterns
(BALP, profiles.ihe.net/ITI/BALP): ``IHE.BasicAudit.PatientQuery`` for searches and
operations, ``IHE.BasicAudit.PatientRead`` for reads. Elements are chosen so that the R4
search parameters of the hub's store find every event (hl7.org/fhir/R4/auditevent.html#search):

==============  ==========================================  ==================================
search          indexes                                     what this module puts there
==============  ==========================================  ==================================
``patient``     agent.who / entity.what → Patient           entity[patient].what = Patient/{id}
``altid``       agent.altId                                 requesting user's id; requesting
                                                            organisation's ODS code
``agent-name``  agent.name                                  requesting user's name
``agent-role``  agent.role                                  the user's role (SDS job role code)
``agent``       agent.who (literal reference)               Organization/{id} when known
``entity-role`` entity.role                                 1 patient, 24 query, 17 provider
``date``        recorded                                    when the release happened
``type``,       type, subtype, action, outcome              rest; read/search-type/...; R/E;
``subtype``...                                              0/4/8/12
==============  ==========================================  ==================================

Identifiers alone (``who.identifier``) are recorded too, but the store does not search
Reference.identifier (the ``:identifier`` modifier), hence ``altId`` for the two identities
that arrive as plain strings in the access token (R4 defines altId as "a user identifier
text string from authentication system").
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from sharedcare.iam.context import PURPOSE_OF_USE_SYSTEM
from sharedcare.registry.model import CLIENT_ID_SYSTEM, HUB, ODS_SYSTEM

__all__ = [
    "ACTIONS",
    "OUTCOMES",
    "AuditRecord",
    "to_audit_event",
]

# hl7.org/fhir/R4/valueset-audit-event-outcome.html
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12
OUTCOMES: Final = frozenset({SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE})
# restful-interaction codes (hl7.org/fhir/R4/codesystem-restful-interaction.html) that
# release data; reads use the BALP Read pattern, the rest the Query pattern.
_READS: Final = frozenset({"read", "vread"})
# Writes the hub audits (Consent records change what may be shared): BALP Create/Update.
_WRITES: Final = {"create": "C", "update": "U"}
ACTIONS: Final = _READS | frozenset(_WRITES) | frozenset(
    {"search", "search-type", "search-system", "history-instance", "history-type", "operation",
     "batch", "transaction"}
)

NHS_NUMBER_SYSTEM: Final = "https://fhir.nhs.uk/Id/nhs-number"
USER_ID_SYSTEM: Final = f"{HUB}/Id/requesting-user"
JOB_ROLE_SYSTEM: Final = "https://fhir.nhs.uk/CodeSystem/NHSDigital-SDS-JobRoleCode"
HUB_NAME: Final = "sharedcare hub"

_BALP = "https://profiles.ihe.net/ITI/BALP/StructureDefinition/IHE.BasicAudit."
_DCM = "http://dicom.nema.org/resources/ontology/DCM"
_OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
_ENTITY_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
_TYPE = {
    "system": "http://terminology.hl7.org/CodeSystem/audit-event-type",
    "code": "rest",
    "display": "Restful Operation",
}
_SOURCE_ROLE = {"coding": [{"system": _DCM, "code": "110153", "display": "Source Role ID"}]}
_DEST_ROLE = {"coding": [{"system": _DCM, "code": "110152", "display": "Destination Role ID"}]}
_USER_TYPE = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
            "code": "IRCP",
            "display": "information recipient",
        }
    ]
}
# The requesting organisation as its own agent, as BALP's comprehensive token pattern does.
_ORG_TYPE = {
    "coding": [
        {
            "system": "http://terminology.hl7.org/CodeSystem/v3-RoleClass",
            "code": "PROV",
            "display": "healthcare provider",
        }
    ]
}
_SOURCE_TYPE = [
    {
        "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
        "code": "4",
        "display": "Application Server",
    }
]
_PERSON = {"system": _ENTITY_TYPE, "code": "1", "display": "Person"}
_SYSTEM_OBJECT = {"system": _ENTITY_TYPE, "code": "2", "display": "System Object"}
_ROLE_PATIENT = {"system": _OBJECT_ROLE, "code": "1", "display": "Patient"}
_ROLE_DOMAIN_RESOURCE = {"system": _OBJECT_ROLE, "code": "4", "display": "Domain Resource"}
_ROLE_DATA_REPOSITORY = {"system": _OBJECT_ROLE, "code": "17", "display": "Data Repository"}
_ROLE_QUERY = {"system": _OBJECT_ROLE, "code": "24", "display": "Query"}
_ROLE_SECURITY_RESOURCE = {"system": _OBJECT_ROLE, "code": "13", "display": "Security Resource"}
_REQUEST_ID_TYPE = {
    "system": "https://profiles.ihe.net/ITI/BALP/CodeSystem/BasicAuditEntityType",
    "code": "XrequestId",
}
_OUTCOME_TEXT = {0: None, 4: "Minor failure", 8: "Serious failure", 12: "Major failure"}

_PATIENT_REF = re.compile(r"Patient/[A-Za-z0-9\-.]{1,64}")
_RESOURCE_REF = re.compile(r"(?:.*/)?[A-Z][A-Za-z]{1,63}/[A-Za-z0-9\-.]{1,64}(?:/_history/[0-9]+)?")
_CONSENT_REF = re.compile(r"Consent/[A-Za-z0-9\-.]{1,64}")
_ORG_REF = re.compile(r"Organization/[A-Za-z0-9\-.]{1,64}")
_LIMIT = 4096  # the raw query is kept whole up to here (base64 in entity.query)


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One release of data across the platform boundary, or one refused patient-data request.

    Plain values only, so every pathway (query, bulk, messaging) can build one. ``action`` is
    the FHIR restful interaction (``read``, ``search-type``, ``operation``...); ``outcome``
    is R4 audit-event-outcome: 0 released, 4 refused (access denied), 8/12 failures.
    """

    action: str
    request_id: str
    client_id: str
    query: str  # the request as received, e.g. "GET /fhir/Observation?patient=..."
    outcome: int = SUCCESS
    outcome_desc: str | None = None  # why it was refused or failed
    user_id: str | None = None
    user_name: str | None = None
    user_role: str | None = None  # SDS job role code, e.g. R8000
    purpose_of_use: str | None = None  # v3-ActReason code, e.g. TREAT
    organization: str | None = None  # ODS code of the requesting organisation
    organization_ref: str | None = None  # "Organization/{id}" when the hub holds it
    patient: str | None = None  # "Patient/{id}" in the hub's index
    nhs_number: str | None = None
    resource: str | None = None  # for reads: the resource released
    providers: tuple[str, ...] = ()  # client ids of the providers asked
    released: int = 0
    withheld: int = 0
    client_address: str | None = None  # the client's IP address
    recorded: datetime = field(default_factory=_now)
    other_patients: tuple[str, ...] = ()  # further people whose data a store search released
    consents: tuple[str, ...] = ()  # "Consent/{id}" records in force for the decision
    policy: str | None = None  # version of the regional policy that decided

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ValueError(f"action must be one of {sorted(ACTIONS)}, not {self.action!r}")
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be 0, 4, 8 or 12, not {self.outcome!r}")
        if self.released < 0 or self.withheld < 0:
            raise ValueError("released and withheld are counts (>= 0)")
        if not self.request_id or not self.client_id:
            raise ValueError("request_id and client_id are required")
        if self.patient is not None and not _PATIENT_REF.fullmatch(self.patient):
            raise ValueError(f"patient must be a reference 'Patient/{{id}}', not {self.patient!r}")
        if self.organization_ref is not None and not _ORG_REF.fullmatch(self.organization_ref):
            raise ValueError(f"organization_ref must be 'Organization/{{id}}', not {self.organization_ref!r}")
        if self.resource is not None and not _RESOURCE_REF.fullmatch(self.resource):
            raise ValueError(f"resource must be a literal reference, not {self.resource!r}")
        for name in ("providers", "other_patients", "consents"):
            if isinstance(getattr(self, name), list):  # a list would make the frozen value unhashable
                object.__setattr__(self, name, tuple(getattr(self, name)))
        for ref in self.other_patients:
            if not _PATIENT_REF.fullmatch(ref):
                raise ValueError(f"other_patients holds references 'Patient/{{id}}', not {ref!r}")
        for ref in self.consents:
            if not _CONSENT_REF.fullmatch(ref):
                raise ValueError(f"consents holds references 'Consent/{{id}}', not {ref!r}")

    @property
    def identifies_patient(self) -> bool:
        return self.patient is not None or self.nhs_number is not None


def _text(value: str, limit: int = 1024) -> str:
    """A string safe to index on both databases: no NUL (PostgreSQL text refuses it), bounded."""
    if "\x00" in value:
        value = value.replace("\x00", "")
    return value[:limit] if len(value) > limit else value


def instant(ts: datetime) -> str:
    """FHIR instant in UTC with milliseconds (naive datetimes are taken as UTC)."""
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts.isoformat(timespec="milliseconds") + "Z"


def _agents(r: AuditRecord, hub_base: str) -> list[dict[str, Any]]:
    # BALP Query: the client is the Source Role (the query flows client → server);
    # BALP Read: the client is the Destination Role (the resource flows server → client).
    read = r.action in _READS
    client: dict[str, Any] = {
        "type": _DEST_ROLE if read else _SOURCE_ROLE,
        "who": {"identifier": {"system": CLIENT_ID_SYSTEM, "value": _text(r.client_id, 64)}},
        "requestor": False,
    }
    if r.client_address:
        client["network"] = {"address": _text(r.client_address, 64), "type": "2"}  # IP address
    server = {
        "type": _SOURCE_ROLE if read else _DEST_ROLE,
        "who": {"identifier": {"system": "urn:ietf:rfc:3986", "value": hub_base}, "display": HUB_NAME},
        "requestor": False,
        "network": {"address": hub_base, "type": "5"},  # URI
    }
    agents = [client, server]
    if r.user_id or r.user_name:
        user: dict[str, Any] = {"type": _USER_TYPE, "requestor": True}
        who: dict[str, Any] = {}
        if r.user_id:
            who["identifier"] = {"system": USER_ID_SYSTEM, "value": _text(r.user_id, 128)}
            user["altId"] = _text(r.user_id, 128)
        if r.user_name:
            who["display"] = _text(r.user_name, 200)
            user["name"] = _text(r.user_name, 200)
        user["who"] = who
        if r.user_role:
            user["role"] = [{"coding": [{"system": JOB_ROLE_SYSTEM, "code": _text(r.user_role, 64)}]}]
        if r.purpose_of_use:
            user["purposeOfUse"] = [
                {"coding": [{"system": PURPOSE_OF_USE_SYSTEM, "code": _text(r.purpose_of_use, 64)}]}
            ]
        agents.append(user)
    if r.organization or r.organization_ref:
        org_who: dict[str, Any] = {}
        if r.organization_ref:
            org_who["reference"] = r.organization_ref
        if r.organization:
            org_who["identifier"] = {"system": ODS_SYSTEM, "value": _text(r.organization, 64)}
        org: dict[str, Any] = {"type": _ORG_TYPE, "who": org_who, "requestor": False}
        if r.organization:
            org["altId"] = _text(r.organization, 64)
        agents.append(org)
    return agents


def _entities(r: AuditRecord) -> list[dict[str, Any]]:
    entities: list[dict[str, Any]] = []
    if r.identifies_patient:
        what: dict[str, Any] = {}
        if r.patient:
            what["reference"] = r.patient
        if r.nhs_number:
            what["identifier"] = {"system": NHS_NUMBER_SYSTEM, "value": _text(r.nhs_number, 64)}
        entities.append({"what": what, "type": _PERSON, "role": _ROLE_PATIENT})
    for other in r.other_patients:
        entities.append({"what": {"reference": other}, "type": _PERSON, "role": _ROLE_PATIENT})
    query = _text(r.query, _LIMIT)
    if r.action in _READS or r.action in _WRITES:
        data: dict[str, Any] = {"type": _SYSTEM_OBJECT, "role": _ROLE_DOMAIN_RESOURCE}
        if r.resource:
            data["what"] = {"reference": r.resource}
        data["description"] = query
        entities.append(data)
    else:
        # BALP: the raw request base64-encoded in .query, readable in .description.
        entities.append(
            {
                "type": _SYSTEM_OBJECT,
                "role": _ROLE_QUERY,
                "description": query,
                "query": base64.b64encode(query.encode()).decode("ascii"),
            }
        )
    entities.append(
        {
            "what": {"identifier": {"value": _text(r.request_id, 128)}},
            "type": _REQUEST_ID_TYPE,
        }
    )
    for provider in r.providers:
        entities.append(
            {
                "what": {"identifier": {"system": CLIENT_ID_SYSTEM, "value": _text(provider, 64)}},
                "type": _SYSTEM_OBJECT,
                "role": _ROLE_DATA_REPOSITORY,
            }
        )
    for consent in r.consents:  # the person's consent records that took part in the decision
        entities.append({"what": {"reference": consent}, "type": _SYSTEM_OBJECT, "role": _ROLE_SECURITY_RESOURCE})
    # BALP records no result counts; the hub must (REQUIREMENTS §3, §4: withheld data).
    detail = [
        {"type": "released", "valueString": str(r.released)},
        {"type": "withheld", "valueString": str(r.withheld)},
    ]
    if r.policy:
        detail.append({"type": "policy", "valueString": _text(r.policy, 128)})
    entities.append(
        {
            "type": _SYSTEM_OBJECT,
            "description": "resources released to the client, and withheld by consent",
            "detail": detail,
        }
    )
    return entities


def to_audit_event(record: AuditRecord, *, hub_base: str = HUB) -> dict[str, Any]:
    """The R4 AuditEvent for ``record`` (no id or meta.versionId: the store assigns those)."""
    r = record
    read = r.action in _READS
    write = _WRITES.get(r.action)
    event: dict[str, Any] = {"resourceType": "AuditEvent"}
    if r.outcome == SUCCESS and (r.resource or not (read or write)):
        # The BALP profiles fix outcome to success (and a read or write names its resource);
        # anything else follows the same shape without claiming the profile.
        kind = "Read" if read else r.action.capitalize() if write else "Query"
        profile = f"Patient{kind}" if r.identifies_patient else kind
        event["meta"] = {"profile": [_BALP + profile]}
    event["type"] = _TYPE
    event["subtype"] = [{"system": "http://hl7.org/fhir/restful-interaction", "code": r.action}]
    event["action"] = "R" if read else write or "E"
    event["recorded"] = instant(r.recorded)
    event["outcome"] = str(r.outcome)
    if r.outcome_desc or r.outcome:
        event["outcomeDesc"] = _text(r.outcome_desc or _OUTCOME_TEXT[r.outcome] or "", 1024)
    event["agent"] = _agents(r, hub_base)
    event["source"] = {
        "site": hub_base,
        "observer": {"display": HUB_NAME},
        "type": _SOURCE_TYPE,
    }
    event["entity"] = _entities(r)
    return event


def request_id_of(event: dict[str, Any]) -> str | None:
    """The request id recorded in an AuditEvent (its X-Request-Id entity), if any."""
    for entity in event.get("entity", ()):
        if entity.get("type", {}).get("code") == _REQUEST_ID_TYPE["code"]:
            return entity.get("what", {}).get("identifier", {}).get("value")
    return None
