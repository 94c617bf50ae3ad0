"""A bounded, thread-safe memory of single-use values (attestation nonces) until they expire."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class ReplayCache:
    """Remembers each value until its expiry, holding at most `max_entries`.

    When full of unexpired values the oldest is forgotten first, so size the cache above the
    number of tokens accepted per token lifetime; the expected-nonce check is the first defence,
    this cache the second.
    """

    def __init__(self, max_entries: int = 10_000, clock: Callable[[], float] = time.time) -> None:
        if max_entries < 1:
            raise ValueError("a replay cache needs room for at least one entry")
        self._max = max_entries
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)

    def _evict(self, now: float) -> None:
        expired = [key for key, expiry in self._seen.items() if expiry <= now]
        for key in expired:
            del self._seen[key]
        while len(self._seen) >= self._max:
            self._seen.popitem(last=False)

    def first_use(self, value: str, expires_at: float) -> bool:
        """Record `value`; True the first time it is offered before its expiry, False after."""
        key = hashlib.sha256(value.encode("utf-8")).digest()
        now = self._clock()
        with self._lock:
            expiry = self._seen.get(key)
            if expiry is not None and expiry > now:
                return False
            self._evict(now)
            self._seen[key] = max(expires_at, now)
            return True
