"""Generated, clinically plausible FHIR R4 records for one person at one provider.

Everything is reproducible from ``(seed, provider id, NHS number)``. A person's long-term
picture (conditions, allergies, regular medicines) is drawn from ``(seed, NHS number)`` alone,
so two providers that know the same person agree that she has type 2 diabetes; the events each
provider recorded (encounters, readings, results, letters) are drawn per provider.

Codes are SNOMED CT (conditions, procedures, allergies, record artefacts), LOINC with UCUM
units (vital signs per http://hl7.org/fhir/R4/observation-vitalsigns.html, laboratory results),
dm+d-style medicine codes (``https://dmd.nhs.uk``) and CVX vaccine codes. They are
representative, for demos and load, not a curated terminology.

Clinical resources can be padded to a target size with a generated narrative (``text.div``), as
many EHRs send one, so benchmarks see realistic payloads (about 5 KB per resource by default).
"""

from __future__ import annotations

import base64
import hashlib
import random
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final

import orjson

from sharedcare.pix.nhs import NHS_NUMBER_SYSTEM
from sharedcare.simulators.codes import (
    ACT_CODE,
    ACUTE,
    ACUTE_DAYS,
    ALLERGIES,
    ALLERGY_CLINICAL,
    ALLERGY_VERIFICATION,
    BLOOD_PRESSURE,
    COND_CATEGORY,
    COND_CLINICAL,
    COND_VERIFICATION,
    CONDITIONS,
    CVX,
    DMD,
    DOCUMENTS,
    ENCOUNTERS,
    INTERPRETATION,
    LOINC,
    MED_REQ_CATEGORY,
    MED_STMT_CATEGORY,
    MEDICINES,
    OBS_CATEGORY,
    PANELS,
    PHRASES,
    PROCEDURES,
    SCT,
    UCUM,
    V2_0074,
    VACCINES,
    VITALS,
    XHTML,
)

CLINICAL_TYPES: Final = (
    "Encounter",
    "Condition",
    "Observation",
    "MedicationRequest",
    "MedicationStatement",
    "AllergyIntolerance",
    "Immunization",
    "Procedure",
    "DiagnosticReport",
    "DocumentReference",
)
RESOURCE_TYPES: Final = ("Patient", *CLINICAL_TYPES)


@dataclass(frozen=True, slots=True)
class SimPerson:
    """One person as a provider knows them: NHS number, the provider's local id, demographics."""

    nhs_number: str
    local_id: str  # the provider's Patient.id and its local identifier value
    family: str
    given: tuple[str, ...]
    gender: str
    birth_date: str
    address: dict[str, Any] = field(hash=False, compare=False)

    @property
    def postal_code(self) -> str:
        return str(self.address.get("postalCode", ""))

    def patient(self, identifier_system: str) -> dict[str, Any]:
        """The provider's Patient resource: id = local id; local and NHS identifiers."""
        return {
            "resourceType": "Patient",
            "id": self.local_id,
            "meta": {"versionId": "1", "lastUpdated": "2026-01-01T00:00:00Z"},
            "identifier": [
                {"use": "usual", "system": identifier_system, "value": self.local_id},
                {"use": "official", "system": NHS_NUMBER_SYSTEM, "value": self.nhs_number},
            ],
            "active": True,
            "name": [{"use": "official", "family": self.family, "given": list(self.given)}],
            "gender": self.gender,
            "birthDate": self.birth_date,
            "address": [self.address],
        }


def coding(system: str, code: str, display: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}], "text": display}


@dataclass(frozen=True, slots=True)
class Shape:
    """How much a provider holds per person and how big each resource is."""

    observations: int = 13  # Observations per person: the size of a typical Observation search
    resource_bytes: int = 5000  # target serialised size of each clinical resource (0: no padding)
    as_of: date = date(2026, 1, 1)  # records fall in the five years before this date


def _rng(*parts: object) -> random.Random:
    return random.Random(hashlib.sha256(":".join(map(str, parts)).encode()).digest())


def _age(birth: str, on: date) -> int:
    born = date.fromisoformat(birth)
    return on.year - born.year - ((on.month, on.day) < (born.month, born.day))


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _quantity(value: float, unit: str, display: str | None = None) -> dict[str, Any]:
    return {"value": value, "unit": display or unit, "system": UCUM, "code": unit}


class _Builder:
    """Builds one person's records at one provider, in chronological order of events."""

    def __init__(self, provider: str, seed: int, person: SimPerson, shape: Shape):
        self.person = person
        self.shape = shape
        self.subject = {"reference": f"Patient/{person.local_id}", "display": self._display()}
        self.shared = _rng(seed, "person", person.nhs_number)  # the same at every provider
        self.rng = _rng(seed, provider, person.nhs_number)
        self.counters: dict[str, int] = {}
        self.out: list[dict[str, Any]] = []
        born = date.fromisoformat(person.birth_date)
        self.start = max(born, shape.as_of - timedelta(days=5 * 365))
        self.age = _age(person.birth_date, shape.as_of)

    def _display(self) -> str:
        return f"{' '.join(self.person.given)} {self.person.family.upper()}"

    def new(self, type_: str, **body: Any) -> dict[str, Any]:
        n = self.counters[type_] = self.counters.get(type_, 0) + 1
        abbreviation = "".join(c for c in type_ if c.isupper()).lower()
        resource = {
            "resourceType": type_,
            "id": f"{self.person.local_id}-{abbreviation}{n}",
            **body,
        }
        self.out.append(resource)
        return resource

    def moment(self, on: date | None = None) -> datetime:
        if on is None:
            span = max((self.shape.as_of - self.start).days, 1)
            on = self.start + timedelta(days=self.rng.randrange(span))
        hour = self.rng.randint(8, 18)
        return datetime(
            on.year, on.month, on.day, hour, self.rng.choice((0, 15, 30, 45)), tzinfo=UTC
        )

    # -- the long-term picture, shared across providers ---------------------------------------
    def chronic(self) -> list[tuple[str, str, tuple[str, ...]]]:
        found: list[tuple[str, str, tuple[str, ...]]] = [
            (code, display, tuple(medicines))
            for code, display, min_age, prevalence, medicines in CONDITIONS
            if self.shared.random() < prevalence * (2.5 if self.age >= 65 else 1.0)
            and self.age >= min_age
        ]
        return found[:4]

    def allergies(self) -> list[tuple[str, ...]]:
        count = self.shared.choices((0, 1, 2), (0.7, 0.22, 0.08))[0]
        return self.shared.sample(ALLERGIES, count)

    def build(self) -> list[dict[str, Any]]:
        chronic = self.chronic()
        allergies = self.allergies()
        encounters = [self.encounter() for _ in range(self.rng.randint(2, 5))]
        encounters.sort(key=lambda e: e["period"]["start"])
        for code, display, medicines in chronic:
            condition = self.condition(code, display, "problem-list-item", None)
            for key in medicines:
                self.medication_request(key, condition, None, regular=True)
                self.medication_statement(key, condition)
        for encounter in encounters:
            if self.rng.random() < 0.6:
                problem = self.rng.choice(ACUTE)
                condition = self.condition(problem[0], problem[1], "encounter-diagnosis", encounter)
                self.medication_request(problem[2], condition, encounter, regular=False)
            if encounter["class"]["code"] in ("EMER", "IMP") or self.rng.random() < 0.3:
                self.document(encounter)
            if self.rng.random() < 0.25:
                self.procedure(encounter)
        for allergy in allergies:
            self.allergy(allergy, encounters[0])
        for _ in range(self.rng.randint(1, 3)):
            self.immunization()
        self.observations(encounters)
        return [self.pad(resource) for resource in self.out]

    # -- resources -------------------------------------------------------------------------
    def encounter(self) -> dict[str, Any]:
        cls, cls_display, type_code, type_display, service = self.rng.choices(
            ENCOUNTERS, (0.5, 0.25, 0.15, 0.1)
        )[0]
        start = self.moment()
        hours = {"AMB": 0.25, "EMER": 4.0, "IMP": 24.0 * self.rng.randint(1, 6)}[cls]
        end = start + timedelta(hours=hours)
        return self.new(
            "Encounter",
            status="finished",
            **{"class": {"system": ACT_CODE, "code": cls, "display": cls_display}},
            type=[coding(SCT, type_code, type_display)],
            serviceType={"text": service},
            subject=self.subject,
            period={"start": _when(start), "end": _when(end)},
        )

    def condition(
        self, code: str, display: str, category: str, encounter: dict[str, Any] | None
    ) -> dict[str, Any]:
        if encounter is None:
            onset = self.moment(self.start - timedelta(days=self.shared.randrange(0, 3650)))
            onset = max(onset, self.moment(date.fromisoformat(self.person.birth_date)))
            recorded = self.moment()
            status = "active"
        else:
            onset = recorded = datetime.fromisoformat(encounter["period"]["start"])
            status = "resolved"
        body: dict[str, Any] = {
            "clinicalStatus": coding(COND_CLINICAL, status, status.capitalize()),
            "verificationStatus": coding(COND_VERIFICATION, "confirmed", "Confirmed"),
            "category": [
                coding(
                    COND_CATEGORY,
                    category,
                    "Problem List Item"
                    if category == "problem-list-item"
                    else "Encounter Diagnosis",
                )
            ],
            "code": coding(SCT, code, display),
            "subject": self.subject,
            "onsetDateTime": _when(min(onset, recorded)),
            "recordedDate": _when(recorded),
        }
        if encounter is not None:
            body["encounter"] = {"reference": f"Encounter/{encounter['id']}"}
            body["abatementDateTime"] = _when(recorded + timedelta(days=self.rng.randint(5, 21)))
        return self.new("Condition", **body)

    def medication_request(
        self,
        key: str,
        condition: dict[str, Any],
        encounter: dict[str, Any] | None,
        *,
        regular: bool,
    ) -> dict[str, Any]:
        code, display, dose, per_day = MEDICINES[key]
        authored = (
            datetime.fromisoformat(encounter["period"]["start"]) if encounter else self.moment()
        )
        days = 28 if regular else ACUTE_DAYS.get(key, 5)
        category = "community" if regular or encounter is None else "discharge"
        body: dict[str, Any] = {
            "status": "active" if regular else "completed",
            "intent": "order",
            "category": [coding(MED_REQ_CATEGORY, category, category.capitalize())],
            "medicationCodeableConcept": coding(DMD, code, display),
            "subject": self.subject,
            "authoredOn": _when(authored),
            "reasonReference": [{"reference": f"Condition/{condition['id']}"}],
            "dosageInstruction": [
                {
                    "text": dose,
                    "timing": {"repeat": {"frequency": per_day, "period": 1, "periodUnit": "d"}},
                }
            ],
            "dispenseRequest": {
                "expectedSupplyDuration": {
                    "value": days,
                    "unit": "days",
                    "system": UCUM,
                    "code": "d",
                },
            },
        }
        if regular:
            body["courseOfTherapyType"] = coding(
                "http://terminology.hl7.org/CodeSystem/medicationrequest-course-of-therapy",
                "continuous",
                "Continuous long term therapy",
            )
        if encounter is not None:
            body["encounter"] = {"reference": f"Encounter/{encounter['id']}"}
        return self.new("MedicationRequest", **body)

    def medication_statement(self, key: str, condition: dict[str, Any]) -> dict[str, Any]:
        code, display, dose, _ = MEDICINES[key]
        asserted = self.moment()
        return self.new(
            "MedicationStatement",
            status="active",
            category=coding(MED_STMT_CATEGORY, "community", "Community"),
            medicationCodeableConcept=coding(DMD, code, display),
            subject=self.subject,
            effectivePeriod={"start": condition["onsetDateTime"]},
            dateAsserted=_when(asserted),
            reasonReference=[{"reference": f"Condition/{condition['id']}"}],
            dosage=[{"text": dose}],
        )

    def allergy(self, allergy: tuple[str, ...], encounter: dict[str, Any]) -> dict[str, Any]:
        code, display, category, criticality, reaction, reaction_display = allergy
        return self.new(
            "AllergyIntolerance",
            clinicalStatus=coding(ALLERGY_CLINICAL, "active", "Active"),
            verificationStatus=coding(ALLERGY_VERIFICATION, "confirmed", "Confirmed"),
            type="allergy",
            category=[category],
            criticality=criticality,
            code=coding(SCT, code, display),
            patient=self.subject,
            encounter={"reference": f"Encounter/{encounter['id']}"},
            recordedDate=encounter["period"]["start"],
            reaction=[
                {
                    "manifestation": [coding(SCT, reaction, reaction_display)],
                    "severity": "severe" if criticality == "high" else "mild",
                }
            ],
        )

    def immunization(self) -> dict[str, Any]:
        code, display = self.rng.choice(VACCINES)
        return self.new(
            "Immunization",
            status="completed",
            vaccineCode=coding(CVX, code, display),
            patient=self.subject,
            occurrenceDateTime=_when(self.moment()),
            primarySource=True,
            lotNumber=f"{self.rng.choice('ABCDEFGHJK')}{self.rng.randint(1000, 9999)}",
            site=coding(SCT, "368208006", "Left upper arm structure"),
            route=coding(SCT, "78421000", "Intramuscular route"),
            doseQuantity=_quantity(0.5, "mL"),
        )

    def procedure(self, encounter: dict[str, Any]) -> dict[str, Any]:
        code, display, category, category_display = self.rng.choice(PROCEDURES)
        return self.new(
            "Procedure",
            status="completed",
            category=coding(SCT, category, category_display),
            code=coding(SCT, code, display),
            subject=self.subject,
            encounter={"reference": f"Encounter/{encounter['id']}"},
            performedDateTime=encounter["period"]["start"],
        )

    def document(self, encounter: dict[str, Any]) -> dict[str, Any]:
        loinc, display, sct, sct_display = (
            DOCUMENTS[0] if encounter["class"]["code"] == "IMP" else self.rng.choice(DOCUMENTS[1:])
        )
        letter = "\n".join(
            [
                f"{display} for {self._display()} (NHS number {self.person.nhs_number})",
                f"Seen: {encounter['period']['start'][:10]}",
                *self.rng.sample(PHRASES, 5),
            ]
        ).encode()
        return self.new(
            "DocumentReference",
            status="current",
            docStatus="final",
            type=coding(LOINC, loinc, display),
            category=[coding(SCT, sct, sct_display)],
            subject=self.subject,
            date=encounter["period"]["end"],
            description=display,
            content=[
                {
                    "attachment": {
                        "contentType": "text/plain; charset=utf-8",
                        "language": "en-GB",
                        "data": base64.b64encode(letter).decode(),
                        "size": len(letter),
                        "hash": base64.b64encode(hashlib.sha1(letter).digest()).decode(),
                        "title": f"{display} {encounter['period']['start'][:10]}",
                        "creation": encounter["period"]["end"],
                    }
                }
            ],
            context={
                "encounter": [{"reference": f"Encounter/{encounter['id']}"}],
                "period": encounter["period"],
            },
        )

    # -- observations: vital-sign sets and laboratory panels, exactly shape.observations ---------
    def observations(self, encounters: list[dict[str, Any]]) -> None:
        remaining = self.shape.observations
        index = 0
        while remaining > 0:
            encounter = encounters[index % len(encounters)]
            taken = datetime.fromisoformat(encounter["period"]["start"])
            if index >= len(encounters):  # more readings than encounters: later, unscheduled
                taken = self.moment()
            if index % 2 == 0:
                remaining -= self.vital_signs(encounter, taken, remaining)
            else:
                remaining -= self.panel(encounter, taken, remaining)
            index += 1

    def vital(
        self, encounter: dict[str, Any], taken: datetime, code: str, display: str, **value: Any
    ) -> dict[str, Any]:
        return self.new(
            "Observation",
            status="final",
            category=[coding(OBS_CATEGORY, "vital-signs", "Vital Signs")],
            code=coding(LOINC, code, display),
            subject=self.subject,
            encounter={"reference": f"Encounter/{encounter['id']}"},
            effectiveDateTime=_when(taken),
            issued=_when(taken + timedelta(minutes=5)),
            **value,
        )

    def vital_signs(self, encounter: dict[str, Any], taken: datetime, limit: int) -> int:
        child = self.age < 16
        made = 0
        systolic = self.rng.randint(100, 165)
        self.vital(
            encounter, taken, *BLOOD_PRESSURE,
            component=[
                {"code": coding(LOINC, "8480-6", "Systolic blood pressure"),
                 "valueQuantity": _quantity(systolic, "mm[Hg]", "mmHg")},
                {"code": coding(LOINC, "8462-4", "Diastolic blood pressure"),
                 "valueQuantity": _quantity(self.rng.randint(60, min(systolic - 30, 100)), "mm[Hg]", "mmHg")},
            ],
        )  # fmt: skip
        made += 1
        for code, display, unit, unit_display, (low, high) in VITALS:
            if made >= limit:
                break
            if code == "29463-7" and child:
                low, high = 3.5 + self.age * 2.5, 6 + self.age * 3.5
            if code == "8867-4" and child:
                low, high = 75, 130
            value = self.rng.uniform(low, high)
            value = round(value, 1) if isinstance(low, float) else round(value)
            self.vital(
                encounter, taken, code, display, valueQuantity=_quantity(value, unit, unit_display)
            )
            made += 1
        return made

    def panel(self, encounter: dict[str, Any], taken: datetime, limit: int) -> int:
        panel_code, panel_display, section, tests = self.rng.choice(PANELS)
        collected = taken + timedelta(minutes=20)
        results = []
        for code, display, unit, low, high in tests[:limit]:
            spread = (high - low) * 0.25
            value = self.rng.uniform(low - spread, high + spread)
            value = round(value, 1) if isinstance(low, float) or high < 20 else round(value)
            flag = "L" if value < low else "H" if value > high else "N"
            flag_display = {"L": "Low", "H": "High", "N": "Normal"}[flag]
            results.append(
                self.new(
                    "Observation",
                    status="final",
                    category=[coding(OBS_CATEGORY, "laboratory", "Laboratory")],
                    code=coding(LOINC, code, display),
                    subject=self.subject,
                    encounter={"reference": f"Encounter/{encounter['id']}"},
                    effectiveDateTime=_when(collected),
                    issued=_when(collected + timedelta(hours=3)),
                    valueQuantity=_quantity(value, unit),
                    interpretation=[coding(INTERPRETATION, flag, flag_display)],
                    referenceRange=[{"low": _quantity(low, unit), "high": _quantity(high, unit)}],
                )
            )
        self.new(
            "DiagnosticReport",
            status="final",
            category=[coding(V2_0074, section, "Hematology" if section == "HM" else "Chemistry")],
            code=coding(LOINC, panel_code, panel_display),
            subject=self.subject,
            encounter={"reference": f"Encounter/{encounter['id']}"},
            effectiveDateTime=_when(collected),
            issued=_when(collected + timedelta(hours=3)),
            result=[{"reference": f"Observation/{r['id']}"} for r in results],
            conclusion=f"{len(results)} result(s) reviewed.",
        )
        return len(results)

    # -- size ------------------------------------------------------------------------------
    def pad(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Add a narrative so the resource serialises to about ``shape.resource_bytes``."""
        last = resource.get("issued") or _last_date(resource)
        resource["meta"] = {"versionId": "1", "lastUpdated": last}
        target = self.shape.resource_bytes
        if target <= 0:
            return resource
        rng = _rng(resource["id"], "narrative")
        lines = [f"<p><b>{resource['resourceType']}</b> for {self._display()}</p>"]
        resource["text"] = {"status": "generated", "div": ""}
        size = len(orjson.dumps(resource)) + len(XHTML) + len("</div>") + len(lines[0])
        while size < target:
            line = f"<p>{rng.choice(PHRASES)}</p>"
            lines.append(line)
            size += len(line)
        resource["text"]["div"] = f"{XHTML}{''.join(lines)}</div>"
        return resource


def _last_date(resource: dict[str, Any]) -> str:
    dates = [d for d in (when_of(resource) or ()) if d]
    return dates[-1] if dates else "2026-01-01T00:00:00Z"


# The date each type is searched by (``date`` and its R4 aliases): (start, end) strings.
def when_of(resource: dict[str, Any]) -> tuple[str, str] | None:
    """The clinically relevant time of a resource as FHIR date/dateTime strings (start, end)."""
    type_ = resource["resourceType"]
    value: str | None
    if type_ == "Encounter":
        period = resource.get("period") or {}
        return period.get("start", ""), period.get("end", period.get("start", ""))
    if type_ == "MedicationStatement":
        value = resource.get("dateAsserted")
    else:
        key = {
            "Observation": "effectiveDateTime",
            "DiagnosticReport": "effectiveDateTime",
            "Condition": "recordedDate",
            "MedicationRequest": "authoredOn",
            "AllergyIntolerance": "recordedDate",
            "Immunization": "occurrenceDateTime",
            "Procedure": "performedDateTime",
            "DocumentReference": "date",
            "Patient": "birthDate",
        }.get(type_)
        value = resource.get(key) if key else None
    return (value, value) if value else None


def records(
    provider: str, seed: int, person: SimPerson, shape: Shape | None = None
) -> list[dict[str, Any]]:
    """Every clinical resource ``provider`` holds for ``person`` (Patient excluded)."""
    return _Builder(provider, seed, person, shape or Shape()).build()
