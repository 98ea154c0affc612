"""NHS numbers: normalisation and Modulus 11 validation.

An NHS number is ten digits; the tenth is a check digit computed from the first nine by
Modulus 11 (NHS Data Dictionary, "NHS Number"): multiply digits one to nine by the weights
10, 9, ... 2, sum, take the remainder on division by 11 and subtract it from 11. A result
of 11 makes the check digit 0; a result of 10 means the nine digits are never issued as an
NHS number. Equivalently, with the check digit weighted 1, the weighted sum of all ten
digits is divisible by 11 — which is why every single mistyped digit and every swap of two
adjacent, different digits is caught: each changes the sum by ``w * d`` with ``1 <= w <= 10``
and ``1 <= |d| <= 9``, and 11 is prime (``tests/pix/test_nhs.py`` checks both).

Input format: NHS numbers are written for people as 3-3-4 groups separated by spaces
("943 476 5919"). :func:`normalise_nhs_number` removes ASCII spaces and surrounding
whitespace, and every function here accepts spaced input; nothing else (hyphens, dots,
non-ASCII digits) is accepted, so a value that is not plainly an NHS number is reported
rather than guessed at. Store and send the normalised ten-digit form.

Validation is Modulus 11 only: issued ranges and test-number ranges (999...) are not
checked, so numbers used by NHS test environments validate.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "NHS_NUMBER_SYSTEM",
    "explain_invalid",
    "is_valid_nhs_number",
    "nhs_check_digit",
    "normalise_nhs_number",
]

NHS_NUMBER_SYSTEM: Final = "https://fhir.nhs.uk/Id/nhs-number"
WEIGHTS: Final = (10, 9, 8, 7, 6, 5, 4, 3, 2)
_DIGITS: Final = frozenset("0123456789")


def nhs_check_digit(nine: str) -> int | None:
    """Modulus 11 check digit for nine digits, or None when the number cannot be issued."""
    if len(nine) != 9 or not set(nine) <= _DIGITS:
        raise ValueError("nhs_check_digit needs exactly nine ASCII digits")
    total = sum(int(d) * w for d, w in zip(nine, WEIGHTS, strict=True))
    check = 11 - total % 11
    if check == 11:
        return 0
    return None if check == 10 else check


def normalise_nhs_number(value: str) -> str:
    """``value`` without surrounding whitespace and inner spaces ("943 476 5919" → "9434765919").

    Only removes spaces; it does not validate (see :func:`explain_invalid`).
    """
    return value.strip().replace(" ", "")


def explain_invalid(value: object) -> str | None:
    """Why ``value`` is not a valid NHS number, in words a person can act on; None if valid."""
    if value is None:
        return "No NHS number was given."
    if not isinstance(value, str):
        return f"An NHS number must be a string of ten digits, not {type(value).__name__}."
    number = normalise_nhs_number(value)
    if not number:
        return "The NHS number is empty."
    others = sorted({c for c in number if c not in _DIGITS})
    if others:
        shown = ", ".join(repr(c) for c in others[:5])
        return (
            f"An NHS number contains only digits 0-9 (spaces between groups are allowed); "
            f"found {shown}."
        )
    if len(number) != 10:
        return f"An NHS number has 10 digits; this one has {len(number)}."
    check = nhs_check_digit(number[:9])
    if check is None:
        return (
            "The first nine digits give a Modulus 11 check value of 10, so this is not an "
            "issued NHS number; a digit was probably mistyped."
        )
    if check != int(number[9]):
        return (
            f"The check digit (the last digit) is {number[9]} but the first nine digits "
            f"require {check}; a digit was probably mistyped or two digits swapped."
        )
    return None


def is_valid_nhs_number(value: object) -> bool:
    """True for a ten-digit NHS number (spaces allowed) whose Modulus 11 check digit holds."""
    return explain_invalid(value) is None
