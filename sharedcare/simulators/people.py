"""Generated, plausible people: names, valid NHS numbers, birth dates and UK addresses.

Reproducible from a seed, so the demo, tests and benchmarks see the same population.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

# Modulus 11 lives with the patient index; re-exported here for existing callers.
from sharedcare.pix.nhs import is_valid_nhs_number, nhs_check_digit  # noqa: F401

NHS_SYSTEM = "https://fhir.nhs.uk/Id/nhs-number"

FAMILY = ["Smith", "Jones", "Taylor", "Brown", "Williams", "Wilson", "Johnson", "Davies", "Patel", "Wright", "Robinson", "Thompson", "Evans", "Walker", "White", "Roberts", "Green", "Hall", "Wood", "Jackson", "Clarke", "Khan", "Hughes", "Edwards", "Lewis", "Harris", "Martin", "Cooper", "Ward", "Turner", "Hill", "Moore", "Clark", "Wilkinson", "Mahmood", "Hussain", "Kaur", "Singh", "Begum", "Ahmed", "Okafor", "Nowak", "Kowalski", "Murphy", "O'Brien", "Kelly", "Campbell", "Stewart", "Scott", "Morris"]
GIVEN_F = ["Olivia", "Amelia", "Isla", "Ava", "Mia", "Sophia", "Grace", "Lily", "Freya", "Emily", "Aisha", "Fatima", "Zara", "Chloe", "Ruby", "Ellie", "Maya", "Priya", "Hannah", "Niamh"]
GIVEN_M = ["Oliver", "George", "Noah", "Arthur", "Harry", "Leo", "Jack", "Charlie", "Jacob", "Thomas", "Mohammed", "Ali", "Yusuf", "Oscar", "James", "William", "Adam", "Rohan", "Daniel", "Liam"]
STREETS = ["High Street", "Station Road", "Church Lane", "Park Avenue", "Victoria Road", "Green Lane", "Manor Road", "Mill Lane", "Kings Road", "Queens Drive"]
TOWNS = [("Leeds", "LS"), ("Bradford", "BD"), ("Wakefield", "WF"), ("Harrogate", "HG"), ("York", "YO"), ("Halifax", "HX"), ("Huddersfield", "HD"), ("Sheffield", "S")]


def nhs_number(rng: random.Random) -> str:
    """A random valid NHS number in the issued 4xx–9xx ranges."""
    while True:
        nine = str(rng.randint(400_000_000, 999_999_999))
        check = nhs_check_digit(nine)
        if check is not None:
            return nine + str(check)


def person(rng: random.Random) -> dict[str, Any]:
    """One Patient resource (no id) with NHS number, name, gender, birth date and address."""
    female = rng.random() < 0.51
    town, area = rng.choice(TOWNS)
    postcode = f"{area}{rng.randint(1, 29)} {rng.randint(1, 9)}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}{rng.choice('ABDEFGHJLNPQRSTUWXYZ')}"
    return {
        "resourceType": "Patient",
        "identifier": [{"system": NHS_SYSTEM, "value": nhs_number(rng)}],
        "name": [
            {
                "use": "official",
                "family": rng.choice(FAMILY),
                "given": [rng.choice(GIVEN_F if female else GIVEN_M)],
            }
        ],
        "gender": "female" if female else "male",
        "birthDate": f"{rng.randint(1925, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "address": [
            {
                "use": "home",
                "line": [f"{rng.randint(1, 220)} {rng.choice(STREETS)}"],
                "city": town,
                "postalCode": postcode,
                "country": "GB",
            }
        ],
    }


def people(count: int, seed: int = 1) -> Iterator[dict[str, Any]]:
    """``count`` reproducible Patients."""
    rng = random.Random(seed)
    for _ in range(count):
        yield person(rng)
