"""Telling a consumer that data was withheld, without saying what (REQUIREMENTS §4).

The issue carries issue-type ``suppressed`` ("some information was not or might not have
been returned due to business rules, consent or privacy rules, or access permission
constraints", hl7.org/fhir/R4/valueset-issue-type.html) and a hub code a consumer can act
on (e.g. show "some information is not shown" or ask the person). It never names, counts
by type, or otherwise describes the withheld resources.
"""

from __future__ import annotations

from typing import Any, Final

from sharedcare.fhir.errors import Issue, operation_outcome

WITHHELD_CODE: Final = "consent-withheld"  # in https://sharedcare.example.org/fhir/CodeSystem/issue


def withheld_issue(count: int) -> Issue:
    """The :class:`~sharedcare.fhir.errors.Issue` saying ``count`` resources were withheld."""
    if count < 1:
        raise ValueError("withheld_issue needs a count of at least 1")
    noun = "resource was" if count == 1 else "resources were"
    return Issue(
        code="suppressed",
        severity="warning",
        diagnostics=(
            f"{count} {noun} withheld under the person's consent or the region's information "
            "sharing policy. The record shown is incomplete."
        ),
        details_code=WITHHELD_CODE,
    )


def withheld_notice(count: int) -> dict[str, Any]:
    """One OperationOutcome.issue (as JSON) saying ``count`` resources were withheld."""
    return withheld_issue(count).to_fhir()


def withheld_outcome(count: int) -> dict[str, Any]:
    """A whole OperationOutcome holding :func:`withheld_notice`, e.g. for a searchset entry
    with ``search.mode = outcome``."""
    return operation_outcome(withheld_issue(count))
