"""Seeded fault injection for the LOCAL STAND-INS of Azure services (Key Vault, ARM).

A test switches a `FaultPlan` on (`double.faults.inject(plan)`) and off (`.clear()`); while on,
each matching request is, with probability `rate`, answered with one of the plan's faults
instead of the real answer. What each fault looks like on the wire is the double's own business
(`Answers`): Key Vault and ARM word their throttling differently. The kinds:

    throttle     429 with a `Retry-After` header (seconds), as both services throttle.
    unavailable  503, the service's own transient failure (no Retry-After).
    busy         409, "another operation is in progress" (ARM only: AKS refuses a pool write
                 while an operation runs on the pool or the cluster).
    hang         the request IS carried out, and its answer is held back `hang_seconds`, past
                 the client's read timeout: the caller cannot know whether its write happened.

Draws come from one `random.Random(seed)`, so a run's sequence of faults is reproducible for a
given order of requests. NOT a security boundary.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from aiohttp import web

FaultKind = Literal["throttle", "unavailable", "busy", "hang"]
# How a double words a fault (other than a hang, which is its real answer, late); None where
# the service never answers so (ARM's 409 to a read): the request then goes through.
Answers = Callable[[FaultKind, "FaultPlan", web.Request], web.Response | None]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class FaultPlan:
    """Which requests fail, how often and how. Empty `methods`: every method."""

    rate: float
    kinds: tuple[FaultKind, ...] = ("throttle", "unavailable", "hang")
    seed: int = 0
    retry_after: int = 1
    hang_seconds: float = 10.0
    methods: frozenset[str] = frozenset()
    path_contains: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate {self.rate} is not a probability")
        if not self.kinds:
            raise ValueError("a fault plan needs at least one kind of fault")

    def matches(self, method: str, path: str) -> bool:
        if self.methods and method not in self.methods:
            return False
        return self.path_contains in path


@dataclass
class Faults:
    """The plan in force and what it injected. Tests switch plans from their own thread while
    the double's event loop draws: everything goes through one lock."""

    _plan: FaultPlan | None = None
    _random: random.Random = field(default_factory=random.Random)
    _injected: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def inject(self, plan: FaultPlan) -> None:
        with self._lock:
            self._plan = plan
            self._random = random.Random(plan.seed)

    def clear(self) -> None:
        with self._lock:
            self._plan = None

    def injected(self) -> dict[str, int]:
        """How many of each kind were injected since the double started."""
        with self._lock:
            return dict(self._injected)

    def draw(self, method: str, path: str) -> tuple[FaultKind, FaultPlan] | None:
        """The fault this request may get, if any."""
        with self._lock:
            plan = self._plan
            if plan is None or not plan.matches(method, path):
                return None
            if self._random.random() >= plan.rate:
                return None
            return self._random.choice(plan.kinds), plan

    def _count(self, kind: FaultKind) -> None:
        with self._lock:
            self._injected[kind] += 1

    def middleware(self, answers: Answers) -> Callable[..., Awaitable[web.StreamResponse]]:
        """An aiohttp middleware that injects this plan's faults, worded by `answers`."""

        @web.middleware
        async def inject_faults(request: web.Request, handler: Handler) -> web.StreamResponse:
            drawn = self.draw(request.method, request.path)
            if drawn is None:
                return await handler(request)
            kind, plan = drawn
            if kind == "hang":
                self._count(kind)
                # Done, but answered too late: the lost answer, not the lost request.
                response = await handler(request)
                await asyncio.sleep(plan.hang_seconds)
                return response
            refusal = answers(kind, plan, request)
            if refusal is None:
                return await handler(request)
            self._count(kind)
            await request.read()  # a refusal still consumes the body, as a server does
            return refusal

        return inject_faults
