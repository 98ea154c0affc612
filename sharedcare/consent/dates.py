"""FHIR date, dateTime and instant values as ranges of UTC instants.

A partial date covers its whole extent (datatypes.html#dateTime): ``2024`` is the year,
``2024-05`` the month. So a period ``end`` of ``2024-05-31`` lasts to the end of that day.
Values without a time zone (dates, and the rare dateTime without one) are read as UTC.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any

_DATE = re.compile(
    r"(?P<y>\d{4})(?:-(?P<m>\d{2})(?:-(?P<d>\d{2})"
    r"(?:T(?P<t>\d{2}:\d{2}(?::\d{2}(?:\.\d{1,9})?)?)(?P<z>Z|[+-]\d{2}:\d{2})?)?)?)?"
)
_TINY = timedelta(microseconds=1)
FAR_PAST = datetime.min.replace(tzinfo=UTC)
FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


class DateError(ValueError):
    """Not a FHIR date, dateTime or instant."""


def date_range(value: Any) -> tuple[datetime, datetime]:
    """``[low, high)`` covered by a FHIR date/dateTime/instant string."""
    if not isinstance(value, str):
        raise DateError(f"{value!r} is not a FHIR date or dateTime string")
    return _date_range(value)


@lru_cache(maxsize=4096)  # consent records are re-read on every request for their person
def _date_range(value: str) -> tuple[datetime, datetime]:
    m = _DATE.fullmatch(value)
    if m is None:
        raise DateError(f"{value!r} is not a FHIR date or dateTime (YYYY, YYYY-MM, YYYY-MM-DD or an instant)")
    try:
        year = int(m["y"])
        if m["m"] is None:
            low = datetime(year, 1, 1, tzinfo=UTC)
            return low, _add_months(low, 12)
        month = int(m["m"])
        if m["d"] is None:
            low = datetime(year, month, 1, tzinfo=UTC)
            return low, _add_months(low, 1)
        if m["t"] is None:
            low = datetime(year, month, int(m["d"]), tzinfo=UTC)
            return low, low + timedelta(days=1)
        text = f"{m['y']}-{m['m']}-{m['d']}T{m['t']}"
        if len(m["t"]) == 5:
            text += ":00"
        frac = text.partition(".")
        if frac[1]:  # Python takes at most 6 fractional digits
            text = frac[0] + "." + frac[2][:6]
        at = datetime.fromisoformat(text + (m["z"] or "+00:00").replace("Z", "+00:00"))
    except ValueError as exc:
        raise DateError(f"{value!r} is not a valid date: {exc}") from None
    at = at.astimezone(UTC)
    return at, at + _TINY


def _add_months(at: datetime, months: int) -> datetime:
    total = at.month - 1 + months
    if at.year + total // 12 > 9999:
        return FAR_FUTURE
    return at.replace(year=at.year + total // 12, month=total % 12 + 1)


@dataclass(frozen=True, slots=True)
class Span:
    """A FHIR Period as ``[start, end)``; a missing bound is open."""

    start: datetime = FAR_PAST
    end: datetime = FAR_FUTURE

    def __contains__(self, at: datetime) -> bool:
        return self.start <= at < self.end


def period_span(period: Any) -> Span:
    """The span of a FHIR Period object (start inclusive, end through its whole extent)."""
    if not isinstance(period, dict):
        raise DateError("a period must be an object with start and/or end")
    start = date_range(period["start"])[0] if period.get("start") is not None else FAR_PAST
    end = date_range(period["end"])[1] if period.get("end") is not None else FAR_FUTURE
    if end <= start:
        raise DateError(f"the period ends ({period.get('end')}) before it starts ({period.get('start')})")
    return Span(start, end)
