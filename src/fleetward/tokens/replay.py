"""Single-use identifiers: DPoP proof and client assertion ``jti`` values (RFC 9449
§11.1, RFC 7523 §3 point 7) and MQTT CONNECT proofs.

Each entry is kept until the proof it came from could no longer be accepted anyway
(its iat window or exp has passed), so memory is bounded by the accepted rate times
the window; beyond ``max_entries`` a new proof is refused rather than an old entry
forgotten early (which would re-open it to replay): fail closed. Only proofs that
arrive with an otherwise valid credential are recorded, so filling it takes valid
device credentials.

One holder (a device, a key) may take at most ``max_per_owner`` of the entries at once,
so a single device making proofs in a loop cannot lock every other device out.

Per node: a proof replayed to another node of a cluster within its window is not seen
here (docs/threat-model.md lists it as open until shared state exists).
"""

from __future__ import annotations

import heapq
import threading


class ReplayCache:
    """Thread-safe: the token endpoint runs on worker threads, listeners on the loop."""

    def __init__(self, max_entries: int, max_per_owner: int | None = None) -> None:
        self._max = max_entries
        # A tenth of the cache per holder by default: far above what an honest device
        # needs (a proof per request for the proof's lifetime), far below "everyone".
        self._max_per_owner = max_per_owner or max(16, max_entries // 10)
        self._expiry: dict[str, tuple[float, str]] = {}
        self._owned: dict[str, int] = {}
        self._heap: list[tuple[float, str]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._expiry)

    def use(self, key: str, keep_until: float, now: float, owner: str = "") -> bool:
        """Record ``key`` as used until ``keep_until`` (epoch seconds); False if it was
        used before (a replay), the cache is full of live entries, or ``owner`` holds
        its share of them."""
        with self._lock:
            self._forget_expired(now)
            seen = self._expiry.get(key)
            if seen is not None and seen[0] > now:
                return False
            if len(self._expiry) >= self._max:
                return False
            if self._owned.get(owner, 0) >= self._max_per_owner:
                return False
            self._expiry[key] = (keep_until, owner)
            self._owned[owner] = self._owned.get(owner, 0) + 1
            heapq.heappush(self._heap, (keep_until, key))
            return True

    def _forget_expired(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0][0] <= now:
            until, key = heapq.heappop(heap)
            entry = self._expiry.get(key)
            if entry is not None and entry[0] == until:
                del self._expiry[key]
                owner = entry[1]
                left = self._owned[owner] - 1
                if left:
                    self._owned[owner] = left
                else:
                    del self._owned[owner]
