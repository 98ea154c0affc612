"""Message Bundles as plain values: what ``$process-message`` checks, and the hub's responses.

FHIR messaging (hl7.org/fhir/R4/messaging.html): a message is a Bundle of type ``message``
whose first entry is a MessageHeader; ``Bundle.id`` identifies the message for reliable
delivery (the receiver recognises a resent Bundle.id); a response message's
``MessageHeader.response.identifier`` is the id of the MessageHeader it answers, and its
``code`` is ``ok``, ``transient-error`` or ``fatal-error``.

Participants are named ``urn:participant:{client id}`` in ``source.endpoint`` and
``destination.endpoint`` (or by their registered messaging endpoint URL).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from sharedcare.fhir.errors import FHIRError

PARTICIPANT_PREFIX: Final = "urn:participant:"
HUB_SENDER: Final = "sharedcare.hub"  # never a client id (client ids have no dots)
RESPONSE_CODES: Final = ("ok", "transient-error", "fatal-error")
ORDERING_URL: Final = "https://sharedcare.example.org/fhir/StructureDefinition/message-ordering"
FHIR_ID: Final = re.compile(r"^[A-Za-z0-9\-.]{1,64}$")
# Resource types that carry no patient data: a message holding only these (an
# acknowledgement) is not a release of patient data and is not audited.
NON_PATIENT_TYPES: Final = frozenset(
    {
        "MessageHeader",
        "OperationOutcome",
        "Organization",
        "Practitioner",
        "PractitionerRole",
        "Endpoint",
        "Device",
    }
)
NHS_NUMBER_SYSTEM: Final = "https://fhir.nhs.uk/Id/nhs-number"
HEADER: Final = "Bundle.entry[0].resource"


@dataclass(frozen=True, slots=True)
class Message:
    """The parts of a message Bundle the hub routes on."""

    bundle_id: str
    header_id: str
    event: str
    source: str  # MessageHeader.source.endpoint
    destination: str | None  # MessageHeader.destination[0].endpoint
    sender_org: tuple[
        str | None, str | None
    ]  # (ODS code, Organization id) named by MessageHeader.sender
    response_to: str | None  # response.identifier
    response_code: str | None
    ordered: bool
    patient_data: bool
    nhs_number: str | None
    entries: int


def _invalid(message: str, expression: str | None = None, status: int = 400) -> FHIRError:
    return FHIRError.of(
        status, "invalid" if status == 400 else "processing", message, expression=expression
    )


def parse_message(body: Any) -> Message:
    """Check a decoded ``$process-message`` body; FHIRError (400/422) says what to fix."""
    if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
        raise _invalid(
            "$process-message takes a Bundle of type 'message' (hl7.org/fhir/R4/messaging.html)."
        )
    if body.get("type") != "message":
        raise _invalid(f"Bundle.type must be 'message', not {body.get('type')!r}.", "Bundle.type")
    bundle_id = body.get("id")
    if not isinstance(bundle_id, str) or not FHIR_ID.match(bundle_id):
        raise _invalid(
            "Bundle.id is required (1-64 letters, digits, '-' or '.'): it identifies the message, "
            "and a resend must carry the same Bundle.id.",
            "Bundle.id",
        )
    entries = body.get("entry")
    first = (
        entries[0] if isinstance(entries, list) and entries and isinstance(entries[0], dict) else {}
    )
    header = first.get("resource")
    if not isinstance(header, dict) or header.get("resourceType") != "MessageHeader":
        raise _invalid(
            "The first entry of a message Bundle must be its MessageHeader.", "Bundle.entry[0]"
        )
    assert isinstance(entries, list)
    header_id = header.get("id")
    if not isinstance(header_id, str) or not FHIR_ID.match(header_id):
        raise _invalid("MessageHeader.id is required: responses cite it.", f"{HEADER}.id")
    event = _event(header)
    source = (
        (header.get("source") or {}).get("endpoint")
        if isinstance(header.get("source"), dict)
        else None
    )
    if not isinstance(source, str) or not source:
        raise _invalid(
            f"MessageHeader.source.endpoint is required: {PARTICIPANT_PREFIX}{{your client id}}.",
            f"{HEADER}.source.endpoint",
        )
    destinations = header.get("destination") or []
    if not isinstance(destinations, list) or len(destinations) > 1:
        raise FHIRError.of(
            422,
            "not-supported",
            "Send one message per recipient: MessageHeader.destination must have one entry.",
            expression=f"{HEADER}.destination",
        )
    destination = None
    if destinations:
        dest = destinations[0]
        destination = dest.get("endpoint") if isinstance(dest, dict) else None
        if not isinstance(destination, str) or not destination:
            raise _invalid(
                f"MessageHeader.destination.endpoint is required: {PARTICIPANT_PREFIX}{{recipient id}} "
                "or the recipient's registered messaging endpoint.",
                f"{HEADER}.destination[0].endpoint",
            )
    response = header.get("response")
    response_to = response_code = None
    if response is not None:
        if not isinstance(response, dict):
            raise _invalid("MessageHeader.response must be an object.", f"{HEADER}.response")
        response_to, response_code = response.get("identifier"), response.get("code")
        if not isinstance(response_to, str) or not response_to:
            raise _invalid(
                "MessageHeader.response.identifier must be the id of the MessageHeader answered.",
                f"{HEADER}.response.identifier",
            )
        if response_code not in RESPONSE_CODES:
            raise _invalid(
                f"MessageHeader.response.code must be one of {', '.join(RESPONSE_CODES)}.",
                f"{HEADER}.response.code",
            )
    if destination is None and response is None:
        raise _invalid(
            f"MessageHeader.destination.endpoint is required: {PARTICIPANT_PREFIX}{{recipient id}}.",
            f"{HEADER}.destination",
        )
    patient_data = False
    nhs_number = None
    for entry in entries[1:]:
        resource = entry.get("resource") if isinstance(entry, dict) else None
        rtype = resource.get("resourceType") if isinstance(resource, dict) else None
        if not isinstance(rtype, str):
            raise _invalid(
                "Every Bundle entry needs a resource with a resourceType.", "Bundle.entry"
            )
        if rtype not in NON_PATIENT_TYPES:
            patient_data = True
        if rtype == "Patient" and nhs_number is None:
            nhs_number = _nhs_number(resource)  # type: ignore[arg-type]
    return Message(
        bundle_id=bundle_id,
        header_id=header_id,
        event=event,
        source=source,
        destination=destination,
        sender_org=_sender_org(header.get("sender")),
        response_to=response_to,
        response_code=response_code,
        ordered=_ordered(header),
        patient_data=patient_data,
        nhs_number=nhs_number,
        entries=len(entries),
    )


def _event(header: dict[str, Any]) -> str:
    coding = header.get("eventCoding")
    if isinstance(coding, dict) and (coding.get("code") or coding.get("system")):
        text = f"{coding.get('system', '')}|{coding.get('code', '')}"
        return text[:255]
    uri = header.get("eventUri")
    if isinstance(uri, str) and uri:
        return uri[:255]
    raise _invalid("MessageHeader.eventCoding (or eventUri) is required.", f"{HEADER}.event[x]")


def _sender_org(sender: Any) -> tuple[str | None, str | None]:
    if not isinstance(sender, dict):
        return None, None
    ident = sender.get("identifier")
    ods = (
        ident.get("value")
        if isinstance(ident, dict) and ident.get("system", "").endswith("ods-organization-code")
        else None
    )
    ref = sender.get("reference")
    org_id = (
        ref.removeprefix("Organization/")
        if isinstance(ref, str) and ref.startswith("Organization/")
        else None
    )
    return ods, org_id


def _ordered(header: dict[str, Any]) -> bool:
    for ext in header.get("extension") or []:
        if isinstance(ext, dict) and ext.get("url") == ORDERING_URL:
            return ext.get("valueCode") != "unordered"
    return True


def _nhs_number(patient: dict[str, Any]) -> str | None:
    for ident in patient.get("identifier") or []:
        if (
            isinstance(ident, dict)
            and ident.get("system") == NHS_NUMBER_SYSTEM
            and isinstance(ident.get("value"), str)
        ):
            return ident["value"][:64]
    return None


def participant(client_id: str) -> str:
    return f"{PARTICIPANT_PREFIX}{client_id}"


def instant(ts: datetime | None = None) -> str:
    ts = ts or datetime.now(UTC)
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts.isoformat(timespec="milliseconds") + "Z"


def response_message(
    *,
    hub_base: str,
    original_header_id: str,
    event: str,
    to: str,
    code: str,
    diagnostics: str,
) -> dict[str, Any]:
    """A response message from the hub itself (a dead letter's ``fatal-error``)."""
    system, _, ecode = event.partition("|")
    event_el: dict[str, Any] = (
        {"eventCoding": {"system": system, "code": ecode} if system else {"code": ecode}}
        if "|" in event
        else {"eventUri": event}
    )
    outcome_id = str(uuid.uuid4())
    return {
        "resourceType": "Bundle",
        "id": str(uuid.uuid4()),
        "type": "message",
        "timestamp": instant(),
        "entry": [
            {
                "fullUrl": f"urn:uuid:{uuid.uuid4()}",
                "resource": {
                    "resourceType": "MessageHeader",
                    "id": str(uuid.uuid4()),
                    **event_el,
                    "destination": [{"endpoint": participant(to)}],
                    "source": {"name": "sharedcare hub", "endpoint": hub_base},
                    "response": {
                        "identifier": original_header_id,
                        "code": code,
                        "details": {"reference": f"urn:uuid:{outcome_id}"},
                    },
                },
            },
            {
                "fullUrl": f"urn:uuid:{outcome_id}",
                "resource": {
                    "resourceType": "OperationOutcome",
                    "issue": [{"severity": "error", "code": "timeout", "diagnostics": diagnostics}],
                },
            },
        ],
    }
