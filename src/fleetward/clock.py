"""The only source of "now". Inject a FrozenClock in tests."""

from __future__ import annotations

import datetime as dt
from typing import Protocol


class Clock(Protocol):
    def now(self) -> dt.datetime:
        """Current time, timezone-aware UTC, truncated to whole seconds."""
        ...


class SystemClock:
    def now(self) -> dt.datetime:
        # X.509 and OCSP times have second resolution (RFC 5280 §4.1.2.5); truncating
        # here keeps stored and signed times identical.
        return dt.datetime.now(dt.UTC).replace(microsecond=0)


class FrozenClock:
    """A clock that only moves when told to."""

    def __init__(self, at: dt.datetime) -> None:
        if at.tzinfo is None:
            raise ValueError("FrozenClock needs a timezone-aware datetime")
        self._now = at.astimezone(dt.UTC).replace(microsecond=0)

    def now(self) -> dt.datetime:
        return self._now

    def advance(self, delta: dt.timedelta) -> None:
        self._now = self._now + delta
