"""Admission of request bodies: a budget of bytes that bodies in flight may hold together.

A request reserves its declared length (or the body limit when the length is unknown or the
body is compressed) before its body is read, and gives it back once answered, so N slow
clients cannot make the server hold N × the body limit. Reserving is synchronous while the
budget has room (the common case costs no await); otherwise requests wait in FIFO order.
"""

from __future__ import annotations

import asyncio
from collections import deque


class BodyBudget:
    """Bytes of request bodies that may be in flight at once."""

    def __init__(self, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError("the body budget must be positive")
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def try_reserve(self, size: int) -> bool:
        """Reserve at once if there is room and nobody waits ahead."""
        used = self.used + size
        if used > self.capacity or self._waiters:
            return False
        self.used = used
        self.peak = max(self.peak, used)
        return True

    async def reserve(self, size: int, timeout: float) -> bool:
        """Reserve, waiting up to `timeout` seconds for room; False if none came."""
        if size > self.capacity:
            return False
        if self.try_reserve(size):
            return True
        waiter = asyncio.get_running_loop().create_future()
        entry = (size, waiter)
        self._waiters.append(entry)
        try:
            async with asyncio.timeout(timeout):
                await waiter
        except TimeoutError:
            # Granted just as the timeout fired: the bytes are ours.
            return waiter.done() and not waiter.cancelled()
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(size)
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            if entry in self._waiters:
                self._waiters.remove(entry)
                self._grant()
        return True

    def release(self, size: int) -> None:
        self.used -= size
        if self._waiters:
            self._grant()

    def _take(self, size: int) -> None:
        self.used += size
        self.peak = max(self.peak, self.used)

    def _grant(self) -> None:
        while self._waiters:
            size, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if self.used + size > self.capacity:
                return
            self._waiters.popleft()
            self._take(size)
            waiter.set_result(None)
