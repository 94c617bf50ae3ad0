"""Writes whose answer never came, remembered so that they are not made twice.

A key creation that times out (the request went out; no answer came back in time) may still be
carried out by Key Vault seconds later. Creating again at once, because a read does not show
the key yet, would leave two versions for one policy. So the lost write is remembered for a
settling time during which Veil only reads; once the write shows up (or the time has passed
without it) Veil goes on. In memory: a restarted operator starts with none remembered.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Hashable
from dataclasses import dataclass, field

# Long past any single request Key Vault still carries out (its front end gives up on a request
# well within a minute).
SETTLE_SECONDS = 60.0


@dataclass
class Unanswered:
    """Writes (by any hashable key, e.g. vault, key name and policy digest) whose answer was
    lost, with when. Thread-safe: reconciles run in worker threads."""

    settle_seconds: float = SETTLE_SECONDS
    _since: dict[Hashable, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def lost(self, write: Hashable) -> None:
        with self._lock:
            self._since[write] = time.monotonic()

    def settled(self, write: Hashable) -> None:
        """The write's outcome was seen: nothing to wait for any more."""
        with self._lock:
            self._since.pop(write, None)

    def wait(self, write: Hashable) -> float:
        """Seconds still to wait before this write may be made again (0: go on)."""
        with self._lock:
            since = self._since.get(write)
            if since is None:
                return 0.0
            left = self.settle_seconds - (time.monotonic() - since)
            if left <= 0:
                del self._since[write]
                return 0.0
            return left
