"""What a claim spends: DP mechanisms as plain data, convertible to dp_accounting events.

A claim states each mechanism as one member of a discriminated union keyed by `type`
(camelCase on the wire). Noise is always relative to sensitivity, as dp_accounting
expects: `noiseMultiplier` is σ / L2-sensitivity, `scale` is b / L1-sensitivity.

Every mechanism is `multiplicity` copies of a *unit* mechanism (its `count`, or DP-SGD's
`steps`). A budget's running composition is a canonical tuple of mechanisms with equal
units merged (`merge`): 10,000 identical claims become one mechanism with a large
multiplicity, which an accountant composes in one `compose(event, count)` call.

dp_accounting 0.6 has no (ε, δ) event, so `EpsilonDeltaDpEvent` is defined here; no
accountant supports it, and `veil.privacy.accounting` composes it by basic composition.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache
from typing import Annotated, ClassVar, Literal, Self

import attr
from dp_accounting import dp_event
from pydantic import ConfigDict, Field, TypeAdapter

from veil.api.base import WireModel


@attr.s(frozen=True, slots=True, auto_attribs=True)
class EpsilonDeltaDpEvent(dp_event.DpEvent):  # type: ignore[misc]  # DpEvent is untyped
    """A mechanism known only to satisfy (ε, δ)-DP."""

    epsilon: float
    delta: float


class _Mechanism(WireModel):
    model_config = ConfigDict(frozen=True)

    # The field that says how many times the unit mechanism runs.
    multiplicity_field: ClassVar[str] = "count"

    @property
    def multiplicity(self) -> int:
        value: int = getattr(self, self.multiplicity_field)
        return value

    def with_multiplicity(self, n: int) -> Self:
        return self.model_copy(update={self.multiplicity_field: n})

    def unit(self) -> Self:
        """The same mechanism run once: the key under which compositions merge."""
        return self.with_multiplicity(1)

    def unit_event(self) -> dp_event.DpEvent:
        raise NotImplementedError

    def to_dp_event(self) -> dp_event.DpEvent:
        event = self.unit_event()
        if self.multiplicity == 1:
            return event
        return dp_event.SelfComposedDpEvent(event, self.multiplicity)


class GaussianMechanism(_Mechanism):
    """`count` releases with Gaussian noise of σ = noiseMultiplier × L2 sensitivity."""

    type: Literal["gaussian"] = "gaussian"
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    count: int = Field(default=1, ge=1)

    def unit_event(self) -> dp_event.DpEvent:
        return dp_event.GaussianDpEvent(self.noise_multiplier)


class LaplaceMechanism(_Mechanism):
    """`count` releases with Laplace noise of scale b = scale × L1 sensitivity."""

    type: Literal["laplace"] = "laplace"
    scale: float = Field(gt=0, allow_inf_nan=False)
    count: int = Field(default=1, ge=1)

    def unit_event(self) -> dp_event.DpEvent:
        return dp_event.LaplaceDpEvent(self.scale)


class DpSgdMechanism(_Mechanism):
    """DP-SGD: `steps` Poisson-sampled (rate q) Gaussian gradient releases."""

    multiplicity_field: ClassVar[str] = "steps"

    type: Literal["dpsgd"] = "dpsgd"
    sampling_rate: float = Field(gt=0, le=1)
    noise_multiplier: float = Field(gt=0, allow_inf_nan=False)
    steps: int = Field(default=1, ge=1)

    def unit_event(self) -> dp_event.DpEvent:
        return dp_event.PoissonSampledDpEvent(
            self.sampling_rate, dp_event.GaussianDpEvent(self.noise_multiplier)
        )


class ZcdpMechanism(_Mechanism):
    """A mechanism that satisfies ρ-zCDP, run `count` times (ρ adds up)."""

    type: Literal["zcdp"] = "zcdp"
    rho: float = Field(gt=0, allow_inf_nan=False)
    count: int = Field(default=1, ge=1)

    def unit_event(self) -> dp_event.DpEvent:
        return dp_event.ZCDpEvent(self.rho)


class EpsilonDeltaMechanism(_Mechanism):
    """A mechanism known only to be (ε, δ)-DP, run `count` times; δ = 0 is pure DP."""

    type: Literal["epsilonDelta"] = "epsilonDelta"
    epsilon: float = Field(ge=0, allow_inf_nan=False)
    delta: float = Field(default=0.0, ge=0, lt=1)
    count: int = Field(default=1, ge=1)

    def unit_event(self) -> dp_event.DpEvent:
        return EpsilonDeltaDpEvent(self.epsilon, self.delta)


Mechanism = Annotated[
    GaussianMechanism | LaplaceMechanism | DpSgdMechanism | ZcdpMechanism | EpsilonDeltaMechanism,
    Field(discriminator="type"),
]
MECHANISM: TypeAdapter[Mechanism] = TypeAdapter(Mechanism)

# A canonical composition: equal units merged, sorted by unit, multiplicities > 0.
Composition = tuple[Mechanism, ...]


@lru_cache(maxsize=4096)
def _unit(mechanism: Mechanism) -> Mechanism:
    return mechanism.unit()


@lru_cache(maxsize=4096)
def _sort_key(unit: Mechanism) -> str:
    return unit.model_dump_json(by_alias=True)


def _tally(mechanisms: Iterable[Mechanism], totals: dict[Mechanism, int], sign: int = 1) -> None:
    for mechanism in mechanisms:
        unit = _unit(mechanism)
        totals[unit] = totals.get(unit, 0) + sign * mechanism.multiplicity


def _canonical(totals: dict[Mechanism, int]) -> Composition:
    ordered = sorted(totals.items(), key=lambda kv: _sort_key(kv[0]))
    return tuple(unit.with_multiplicity(n) for unit, n in ordered if n > 0)


def merge(*groups: Iterable[Mechanism]) -> Composition:
    """Compose groups of mechanisms into one canonical composition."""
    totals: dict[Mechanism, int] = {}
    for group in groups:
        _tally(group, totals)
    return _canonical(totals)


def subtract(composition: Iterable[Mechanism], removed: Iterable[Mechanism]) -> Composition:
    """Take a claim's mechanisms back out of a composition (a refund)."""
    totals: dict[Mechanism, int] = {}
    _tally(composition, totals)
    _tally(removed, totals, sign=-1)
    if any(n < 0 for n in totals.values()):
        raise ValueError(f"cannot refund {list(removed)!r}: it is not in the composition")
    return _canonical(totals)


def to_dp_event(mechanisms: Iterable[Mechanism]) -> dp_event.DpEvent:
    """One dp_accounting event for a list of mechanisms (their sequential composition)."""
    events = [m.to_dp_event() for m in mechanisms]
    if not events:
        return dp_event.NoOpDpEvent()
    return events[0] if len(events) == 1 else dp_event.ComposedDpEvent(events)
