"""Single-use identifiers: DPoP proof and client assertion ``jti`` values (RFC 9449
§11.1, RFC 7523 §3 point 7) and MQTT CONNECT proofs.

Each entry is kept until the proof it came from could no longer be accepted anyway
(its iat window or exp has passed), so memory is bounded by the accepted rate times
the window; beyond ``max_entries`` a new proof is refused rather than an old entry
forgotten early (which would re-open it to replay): fail closed. Only proofs that
arrive with an otherwise valid credential are recorded, so filling it takes valid
device credentials.

Per node: a proof replayed to another node of a cluster within its window is not seen
here (docs/threat-model.md lists it as open until shared state exists).
"""

from __future__ import annotations

import heapq
import threading


class ReplayCache:
    """Thread-safe: the token endpoint runs on worker threads, listeners on the loop."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def use(self, key: str, keep_until: float, now: float) -> bool:
        """Record ``key`` as used until ``keep_until`` (epoch seconds); False if it was
        used before (a replay) or the cache is full of live entries."""
        with self._lock:
            self._forget_expired(now)
            seen = self._expiry.get(key)
            if seen is not None and seen > now:
                return False
            if len(self._expiry) >= self._max:
                return False
            self._expiry[key] = keep_until
            heapq.heappush(self._heap, (keep_until, key))
            return True

    def _forget_expired(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            until, key = heapq.heappop(heap)
            if self._expiry.get(key) == until:
                del self._expiry[key]
