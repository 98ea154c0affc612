"""The patient index's values: linkage statuses, people, linkages and the golden Patient.

See :mod:`sharedcare.pix.index` for what they mean and how the index keeps them.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM
from sharedcare.pix.registration import Registration
from sharedcare.pix.tracing import Demographics, TraceOutcome
from sharedcare.store.repository import Prepared, Store

PENDING, UNVERIFIED, VERIFIED = "pending", "unverified", "verified"
MISMATCH, NOT_FOUND, ERROR, UNLINKED = "mismatch", "not_found", "error", "unlinked"
STATUSES: Final = (PENDING, UNVERIFIED, VERIFIED, MISMATCH, NOT_FOUND, ERROR, UNLINKED)
ROUTABLE: Final = frozenset({VERIFIED})
REVIEW: Final = (PENDING, UNVERIFIED, MISMATCH, NOT_FOUND, ERROR)
TRACE_STATUS: Final = {
    TraceOutcome.VERIFIED: VERIFIED,
    TraceOutcome.MISMATCH: MISMATCH,
    TraceOutcome.NOT_FOUND: NOT_FOUND,
    TraceOutcome.PERMANENT_ERROR: ERROR,
    TraceOutcome.TRANSIENT_ERROR: ERROR,  # only reported once the queue gave up
}
MAX_MERGE_HOPS: Final = 16


@dataclass(frozen=True, slots=True)
class Linkage:
    provider: str  # client_id of the provider system (registry)
    system: str  # the provider's local identifier system
    value: str  # the provider's local patient id (its Patient/{value})
    status: str  # one of STATUSES
    updated: datetime


@dataclass(frozen=True, slots=True)
class Person:
    id: str  # the hub Patient id; "Patient/{id}" is what consent and audit reference
    nhs_number: str | None
    links: tuple[Linkage, ...]

    @property
    def routable(self) -> tuple[Linkage, ...]:
        """Links a query may be routed to: verified only."""
        return tuple(link for link in self.links if link.status in ROUTABLE)


@dataclass(frozen=True, slots=True)
class RegisterResult:
    link_id: int
    person_id: str | None
    status: str
    created: bool  # a new linkage (201) rather than an update or repeat (200)
    changed: bool  # something was written


@dataclass(frozen=True, slots=True)
class ReviewItem:
    link_id: int
    provider: str
    system: str
    value: str
    status: str
    person_id: str | None
    nhs_number: str | None
    reasons: str | None
    updated: datetime


def golden_patient(nhs_number: str | None, demographics: Demographics) -> dict[str, Any]:
    """The hub's Patient for a person: NHS number and demographics only, no clinical data."""
    patient: dict[str, Any] = {"resourceType": "Patient", "active": True}
    if nhs_number:
        patient["identifier"] = [{"system": NHS_NUMBER_SYSTEM, "value": nhs_number}]
    name: dict[str, Any] = {"use": "official", "family": demographics.family}
    if demographics.given:
        name["given"] = [demographics.given]
    patient["name"] = [name]
    patient["gender"] = demographics.gender
    patient["birthDate"] = demographics.birth_date
    if demographics.postcode:
        patient["address"] = [{"use": "home", "postalCode": demographics.postcode}]
    return patient


def prepare_golden(store: Store, nhs_number: str | None, demographics: Demographics) -> Prepared:
    """The golden Patient ready to write. Built by the hub from checked values, so it skips
    the pydantic model pass (the audit writer does the same for its server-built events)."""
    body = golden_patient(nhs_number, demographics)
    return Prepared("Patient", body, store.indexer.extract(body))


def _review_item(row: Any) -> ReviewItem:
    return ReviewItem(
        row.id,
        row.provider,
        row.system,
        row.value,
        row.status,
        row.person_id,
        row.nhs_number,
        row.reasons,
        row.updated,
    )


def registration_id(link_id: int, revision: int) -> str:
    return f"{link_id}.{revision}"


def demographics_of_row(row: Any) -> Demographics:
    return Demographics(row.family, row.given, row.birth_date, row.gender, row.postcode)


def demographic_values(reg: Registration) -> dict[str, Any]:
    d = reg.demographics
    return {
        "family": d.family,
        "given": d.given,
        "birth_date": d.birth_date,
        "gender": d.gender,
        "postcode": d.postcode,
    }
