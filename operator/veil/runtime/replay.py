"""A bounded, thread-safe memory of single-use values (attestation nonces) until they expire."""

from __future__ import annotations

import hashlib
import heapq
import threading
import time
from collections.abc import Callable


class ReplayCacheFullError(Exception):
    """The cache holds `max_entries` unexpired values: a new one is refused, never an old one
    forgotten (forgetting it would let that nonce be replayed)."""


class ReplayCache:
    """Remembers each value until its expiry, holding at most `max_entries`.

    A value is never forgotten before it expires: when the cache is full of unexpired values a
    new value is refused (`ReplayCacheFullError`) until one expires. Size it above the number of
    tokens accepted per token lifetime. Inserts cost O(log n): expiries are kept in a heap, and
    each insert drops only the values that have expired (each value is dropped once).
    """

    def __init__(self, max_entries: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError("a replay cache needs room for at least one entry")
        self._max = max_entries
        self._clock = clock
        self._seen: dict[bytes, float] = {}
        self._expiries: list[tuple[float, bytes]] = []
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def _forget_expired(self, now: float) -> None:
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expiry, key = heapq.heappop(heap)
            if self._seen.get(key) == expiry:
                del self._seen[key]

    def first_use(self, value: str, expires_at: float) -> bool:
        """Record `value`; True the first time it is offered before its expiry, False after.
        Raises ReplayCacheFullError when it cannot be remembered."""
        key = hashlib.sha256(value.encode("utf-8")).digest()
        now = self._clock()
        with self._lock:
            self._forget_expired(now)
            if key in self._seen:
                return False
            if len(self._seen) >= self._max:
                raise ReplayCacheFullError(
                    f"the replay cache holds {self._max} unexpired nonces and forgets none "
                    "early: refusing the token until one expires"
                )
            expiry = max(expires_at, now)
            self._seen[key] = expiry
            heapq.heappush(self._expiries, (expiry, key))
            return True
