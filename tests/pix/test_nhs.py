"""NHS numbers: Modulus 11 catches every single-digit error and every adjacent transposition."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sharedcare.pix.nhs import (
    explain_invalid,
    is_valid_nhs_number,
    nhs_check_digit,
    normalise_nhs_number,
)
from sharedcare.simulators import people

WEIGHTS_WITH_CHECK = (10, 9, 8, 7, 6, 5, 4, 3, 2, 1)


@st.composite
def valid_numbers(draw: st.DrawFn) -> str:
    """Any nine digits whose check digit exists, plus that check digit."""
    nine = draw(st.text("0123456789", min_size=9, max_size=9))
    check = nhs_check_digit(nine)
    if check is None:
        # Nine digits with no check digit are never issued; nudge the last one to get an issuable
        # number (at most one of the ten values of a position gives remainder 10).
        nine = nine[:8] + str((int(nine[8]) + 1) % 10)
        check = nhs_check_digit(nine)
    assert check is not None
    return nine + str(check)


def test_the_data_dictionary_example_is_valid() -> None:
    # 9*10+4*9+3*8+4*7+7*6+6*5+5*4+9*3+1*2 = 299; 299 mod 11 = 2; 11 - 2 = 9.
    assert nhs_check_digit("943476591") == 9
    assert is_valid_nhs_number("9434765919")


@given(valid_numbers())
def test_every_number_built_with_its_check_digit_is_valid(number: str) -> None:
    assert is_valid_nhs_number(number)
    assert explain_invalid(number) is None
    # With the check digit weighted 1 the weighted sum is a multiple of 11: the fact the proofs
    # below rest on.
    assert sum(int(d) * w for d, w in zip(number, WEIGHTS_WITH_CHECK, strict=True)) % 11 == 0


@given(valid_numbers(), st.integers(0, 9), st.integers(1, 9))
def test_changing_any_single_digit_is_caught(number: str, position: int, shift: int) -> None:
    wrong = str((int(number[position]) + shift) % 10)
    mistyped = number[:position] + wrong + number[position + 1 :]
    assert not is_valid_nhs_number(mistyped)
    assert explain_invalid(mistyped) is not None


@given(valid_numbers(), st.integers(0, 8))
def test_swapping_two_adjacent_different_digits_is_caught(number: str, position: int) -> None:
    a, b = number[position], number[position + 1]
    swapped = number[:position] + b + a + number[position + 2 :]
    assert is_valid_nhs_number(swapped) == (a == b)


def test_the_proof_holds_for_every_weight_and_difference() -> None:
    """Exhaustive lemma: a digit change alters the weighted sum by w*d, never a multiple of 11.

    For one digit at weight w (1..10) changing by d (±1..±9), and for two adjacent digits at
    weights w, w-1 swapping (change (d2-d1)*(w-(w-1)) = d2-d1), 11 being prime and w, |d| < 11
    means the sum stays off a multiple of 11, so the number stops validating.
    """
    assert all((w * d) % 11 for w in range(1, 11) for d in range(-9, 10) if d)
    for w in range(2, 11):
        for d1 in range(10):
            for d2 in range(10):
                if d1 != d2:
                    assert (w * d2 + (w - 1) * d1 - w * d1 - (w - 1) * d2) % 11


@pytest.mark.parametrize(
    ("value", "valid", "explanation"),
    [
        ("9434765919", True, None),
        ("943 476 5919", True, None),
        ("  9434765919 ", True, None),
        (
            "9434765918",
            False,
            "The check digit (the last digit) is 8 but the first nine digits require 9",
        ),
        ("9434765191", False, "check digit"),
        ("1234567890", False, "Modulus 11 check value of 10"),
        ("943476591", False, "has 10 digits; this one has 9"),
        ("94347659190", False, "this one has 11"),
        ("943-476-5919", False, "found '-'"),
        ("94347659I9", False, "found 'I'"),
        ("943476591\u0669", False, "found '\u0669'"),  # Arabic-Indic nine: isdigit() but not 0-9
        ("", False, "empty"),
        ("   ", False, "empty"),
        (None, False, "No NHS number"),
        (9434765919, False, "not int"),
    ],
)
def test_validation_explains_what_to_fix(
    value: object, valid: bool, explanation: str | None
) -> None:
    assert is_valid_nhs_number(value) is valid
    reason = explain_invalid(value)
    if explanation is None:
        assert reason is None
    else:
        assert reason is not None and explanation in reason


def test_normalising_removes_only_spaces() -> None:
    assert normalise_nhs_number(" 943 476 5919\n") == "9434765919"
    assert normalise_nhs_number("943-476-5919") == "943-476-5919"


def test_check_digit_refuses_anything_but_nine_digits() -> None:
    with pytest.raises(ValueError):
        nhs_check_digit("94347659")


def test_people_keeps_its_names_and_generates_valid_numbers() -> None:
    assert people.is_valid_nhs_number is is_valid_nhs_number
    assert people.nhs_check_digit is nhs_check_digit
    numbers = [p["identifier"][0]["value"] for p in people.people(300, seed=7)]
    assert all(is_valid_nhs_number(n) for n in numbers)
