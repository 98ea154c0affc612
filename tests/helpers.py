"""Helpers shared by test modules: resource builders and constants."""

from __future__ import annotations

from typing import Any

FHIR_JSON = {"Content-Type": "application/fhir+json"}


def nhs_number(seed: int) -> str:
    """A valid NHS number (Modulus 11) derived from ``seed``."""
    n = seed
    while True:
        digits = [int(d) for d in f"{n % 10**9:09d}"]
        total = sum(d * w for d, w in zip(digits, range(10, 1, -1), strict=True))
        check = 11 - total % 11
        check = 0 if check == 11 else check
        if check != 10:
            return "".join(map(str, digits)) + str(check)
        n += 1


def patient(family: str = "Smith", given: str = "Jo", nhs: str | None = None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "resourceType": "Patient",
        "identifier": [{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": nhs or nhs_number(1)}],
        "name": [{"family": family, "given": [given]}],
        "gender": "female",
        "birthDate": "1970-01-02",
        "address": [{"line": ["1 High St"], "city": "Leeds", "postalCode": "LS1 1AA"}],
    }
    body.update(extra)
    return body
