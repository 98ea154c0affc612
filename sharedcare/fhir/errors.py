"""The one exception type of the platform, and the OperationOutcome it becomes.

Domain code raises :class:`FHIRError` with an HTTP status and one or more issues; a single
handler (``sharedcare.fhir.responses``) renders it as ``application/fhir+json``.
Issue codes are from http://hl7.org/fhir/R4/valueset-issue-type.html.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Severity = Literal["fatal", "error", "warning", "information"]


@dataclass(frozen=True, slots=True)
class Issue:
    """One OperationOutcome.issue: what went wrong, where, and what to do about it."""

    code: str
    diagnostics: str
    severity: Severity = "error"
    expression: tuple[str, ...] = ()
    details_code: str | None = None

    def to_fhir(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "severity": self.severity,
            "code": self.code,
            "diagnostics": self.diagnostics,
        }
        if self.details_code:
            out["details"] = {
                "coding": [
                    {
                        "system": "https://sharedcare.example.org/fhir/CodeSystem/issue",
                        "code": self.details_code,
                    }
                ]
            }
        if self.expression:
            out["expression"] = list(self.expression)
        return out


def operation_outcome(*issues: Issue, id: str | None = None) -> dict[str, Any]:
    """An OperationOutcome resource holding ``issues``."""
    oo: dict[str, Any] = {"resourceType": "OperationOutcome"}
    if id:
        oo["id"] = id
    oo["issue"] = [i.to_fhir() for i in issues]
    return oo


@dataclass(eq=False)
class FHIRError(Exception):
    """An error a client can act on: an HTTP status plus OperationOutcome issues."""

    status: int
    issues: list[Issue] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.issues[0].diagnostics if self.issues else str(self.status))

    @classmethod
    def of(
        cls,
        status: int,
        code: str,
        diagnostics: str,
        *,
        expression: str | None = None,
        headers: dict[str, str] | None = None,
        details_code: str | None = None,
    ) -> FHIRError:
        issue = Issue(
            code=code,
            diagnostics=diagnostics,
            expression=(expression,) if expression else (),
            details_code=details_code,
        )
        return cls(status, [issue], dict(headers or {}))

    def outcome(self) -> dict[str, Any]:
        return operation_outcome(*self.issues)


# Shorthands for the errors every capability raises; named by what the client did wrong.
def bad_request(diagnostics: str, *, code: str = "invalid", expression: str | None = None) -> FHIRError:
    return FHIRError.of(400, code, diagnostics, expression=expression)


def not_found(diagnostics: str) -> FHIRError:
    return FHIRError.of(404, "not-found", diagnostics)


def gone(diagnostics: str) -> FHIRError:
    return FHIRError.of(410, "deleted", diagnostics)


def conflict(diagnostics: str) -> FHIRError:
    return FHIRError.of(409, "conflict", diagnostics)


def precondition_failed(diagnostics: str) -> FHIRError:
    return FHIRError.of(412, "conflict", diagnostics)


def unprocessable(diagnostics: str, *, expression: str | None = None) -> FHIRError:
    return FHIRError.of(422, "processing", diagnostics, expression=expression)
