"""audit.rows builds exactly the index rows the store's extractor would, for any record."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from sharedcare.audit import AuditRecord, to_audit_event
from sharedcare.audit.record import ACTIONS, OUTCOMES
from sharedcare.audit.rows import audit_rows
from sharedcare.store.db import Database
from sharedcare.store.indexing import IndexRows
from sharedcare.store.repository import Store

ID = st.text("abcXYZ019-.", min_size=1, max_size=12)
TEXT = st.text(
    st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=30
) | st.sampled_from([" ", "\x00", "Zoë  Ångström"])
OPTIONAL_TEXT = st.none() | TEXT


def _sorted(rows: IndexRows) -> tuple[list[Any], ...]:
    return tuple(
        sorted(getattr(rows, k), key=repr)
        for k in ("tokens", "strings", "references", "dates", "uris")
    )


@st.composite
def records(draw: st.DrawFn) -> AuditRecord:
    action = draw(st.sampled_from(sorted(ACTIONS)))
    return AuditRecord(
        action=action,
        request_id=draw(ID),
        client_id=draw(ID),
        query=draw(TEXT),
        outcome=draw(st.sampled_from(sorted(OUTCOMES))),
        outcome_desc=draw(OPTIONAL_TEXT),
        user_id=draw(st.none() | ID),
        user_name=draw(OPTIONAL_TEXT),
        user_role=draw(st.none() | ID),
        purpose_of_use=draw(st.none() | st.sampled_from(["TREAT", "ETREAT"])),
        organization=draw(st.none() | ID),
        organization_ref=draw(st.none() | ID.map(lambda i: f"Organization/{i}")),
        patient=draw(st.none() | ID.map(lambda i: f"Patient/{i}")),
        nhs_number=draw(st.none() | st.just("9434765919")),
        resource=draw(
            st.none()
            | ID.map(lambda i: f"DocumentReference/{i}")
            | ID.map(lambda i: f"http://hub.example.org/fhir/providers/gp-1/Observation/{i}")
            | ID.map(lambda i: f"Observation/{i}/_history/2")
        ),
        providers=tuple(draw(st.lists(ID, max_size=3))),
        released=draw(st.integers(0, 50)),
        withheld=draw(st.integers(0, 50)),
        client_address=draw(st.none() | st.just("10.0.0.1")),
        recorded=draw(
            st.datetimes(
                min_value=datetime(2000, 1, 1),
                max_value=datetime(2100, 1, 1),
                timezones=st.just(UTC),
            )
        ),
        other_patients=tuple(draw(st.lists(ID.map(lambda i: f"Patient/{i}"), max_size=3))),
        consents=tuple(draw(st.lists(ID.map(lambda i: f"Consent/{i}"), max_size=2))),
        policy=draw(st.none() | ID),
    )


STORE = Store(
    Database("sqlite+aiosqlite:////nonexistent/never-opened.db")
)  # its extractor only: no I/O


@given(record=records())
@settings(max_examples=150, deadline=None)
def test_rows_equal_the_store_extractors(record: AuditRecord) -> None:
    event = to_audit_event(record)
    rows = audit_rows(event)
    assert rows is not None
    assert _sorted(rows) == _sorted(STORE.indexer.extract(event))


def test_anything_else_goes_to_the_extractor() -> None:
    assert audit_rows({"resourceType": "AuditEvent", "agent": "x"}) is None
