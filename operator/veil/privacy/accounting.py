"""ε spent by a composition of mechanisms at a budget's δ: always an upper bound.

Two accountants, chosen per budget, and they promise different things:

- `rdp` budgets are a **Rényi privacy filter** (Feldman & Zrnic 2021; Lécuyer 2021, as in
  PrivateKube): a fixed set of orders α, each with its own budget B_α (the largest RDP
  whose conversion at δ_conv / |orders| stays within ε); a claim is admitted only if some
  order still holds Σ ε_α(claims) ≤ B_α after it. The guarantee holds even when each claim
  is chosen after seeing the results of the earlier ones (adaptive composition): on the
  outcomes where order α is the first still within budget, every decision was the α-filter's
  own, and the α-filter's output is α-RDP within B_α whatever the choices; those outcome sets
  are disjoint, so the per-order δ_conv / |orders| add up to at most δ_conv. (ε, δ)
  mechanisms enter with their pure part (ε-DP is RDP min(ε, αε²/2) at every α, and ε at
  the order ∞, where the filter is basic composition and needs no δ) and their δ adds up
  within a fixed tenth of the budget's δ (δ_conv is the rest), as in approximate-RDP
  filters (Whitehouse et al. 2023).
- `pld` budgets: ε = min(RDP bound, PLD bound), the tightest (ε, δ) for a **fixed sequence**
  of claims. Composition theorems for PLD (and "minimum over orders" RDP) assume the
  sequence is fixed in advance; they are not privacy filters, so under adaptively chosen
  claims the promise is weaker than the figure. Admission first asks RDP (cheap; per-unit
  RDP curves are cached and composition is a weighted sum of curves); when RDP says a
  claim fits, it fits, and PLD is never run. Only when RDP says no does PLD decide.

What each accountant cannot compose is accounted separately, never under-counted:

- (ε, δ) mechanisms (neither accountant supports them): basic composition, i.e. the
  parts add up: (ε₁, δ₁) ∘ (ε₂, δ₂) is (ε₁ + ε₂, δ₁ + δ₂). The accountant answers at
  the budget's δ minus the (ε, δ) mechanisms' δ.
- zCDP under PLD (dp_accounting's PLD accountant does not support `ZCDpEvent`): the ρ's add
  up, total ρ converts to (ε, δ_z) with ε = ρ + 2√(ρ ln(1/δ_z)) (Bun & Steinke 2016), and
  that part composes basically with the rest; δ_z is the best of a few fixed splits of δ.
  Under RDP zCDP is native: ρ-zCDP is RDP ρα at every order α.
- anything else an accountant does not `supports()` raises `UnsupportedMechanismError`.

Neighbouring relation: add-or-remove one record (dp_accounting's default). Results are
memoised on the canonical composition, so they are deterministic: a decision replayed
from the same ledger gives the same answer.

`GUARANTEES` says the same in one line per accountant; the budget's status carries it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from veil.privacy.mechanisms import (
    Composition,
    EpsilonDeltaMechanism,
    LaplaceMechanism,
    Mechanism,
    ZcdpMechanism,
    merge,
)

Accountant = Literal["pld", "rdp"]

GUARANTEES: dict[str, str] = {
    "pld": "tight (ε, δ) for a fixed sequence of claims (PLD); not a privacy filter: "
    "claims chosen after seeing earlier results are not covered",
    "rdp": "Rényi privacy filter: (ε, δ) holds even when each claim is chosen after seeing "
    "the results of the earlier ones",
}

# The Rényi filter's orders: few enough that the union bound over them (ln |orders|) costs
# little, spread enough to serve both small and large noise.
FILTER_ORDERS: tuple[float, ...] = (
    1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 16.0, 20.0, 32.0, 64.0,
    128.0, 256.0,
)  # fmt: skip
# Share of the budget's δ that (ε, δ) mechanisms may use under the filter; the rest converts
# the Rényi guarantee to (ε, δ). Fixed up front, as an adaptive filter needs.
FILTER_APPROX_DELTA_SHARE = 0.1

# Shares of the available δ tried for a zCDP part under PLD; each is sound, the min wins.
ZCDP_DELTA_SPLITS = (0.05, 0.1, 0.25, 0.5, 0.75, 0.9)


class UnsupportedMechanismError(ValueError):
    """An accountant cannot compose a mechanism and no sound fallback is known."""


@dataclass(frozen=True)
class BudgetTerms:
    """What admission needs from a PrivacyBudget spec."""

    epsilon: float
    delta: float
    accountant: Accountant = "pld"
    max_epsilon_per_claim: float | None = None

    def __post_init__(self) -> None:
        if not (self.epsilon > 0 and 0 < self.delta < 1):
            raise ValueError("a budget needs ε > 0 and 0 < δ < 1")

    @classmethod
    def from_spec(cls, spec: Any) -> BudgetTerms:
        """From a `veil.api.privacy_budget.PrivacyBudgetSpec` (or anything shaped like one)."""
        return cls(
            epsilon=spec.epsilon,
            delta=spec.delta,
            accountant=spec.accountant,
            max_epsilon_per_claim=spec.max_epsilon_per_claim,
        )


@dataclass(frozen=True)
class Fit:
    """Whether a composition stays within a limit, and the ε bound that decided it."""

    fits: bool
    epsilon: float


def zcdp_epsilon(rho: float, delta: float) -> float:
    """ε of ρ-zCDP at δ (Bun & Steinke 2016, Prop. 1.3)."""
    if rho <= 0:
        return 0.0
    return rho + 2 * math.sqrt(rho * math.log(1 / delta))


def epsilon_spent(
    mechanisms: Iterable[Mechanism], delta: float, accountant: Accountant = "pld"
) -> float:
    """ε of the sequential composition of `mechanisms` at `delta`: an upper bound."""
    return _epsilon(merge(mechanisms), delta, accountant)


def rdp_epsilon(mechanisms: Iterable[Mechanism], delta: float) -> float:
    """The RDP bound alone (with the basic-composition fallback)."""
    return _rdp_bound(merge(mechanisms), delta)


def pld_epsilon(mechanisms: Iterable[Mechanism], delta: float) -> float:
    """The PLD bound alone (with the basic-composition and zCDP fallbacks)."""
    return _pld_bound(merge(mechanisms), delta)


def check_fit(
    mechanisms: Iterable[Mechanism], epsilon_limit: float, delta: float, accountant: Accountant
) -> Fit:
    """Does the composition stay within (epsilon_limit, delta)? RDP first, PLD only if needed."""
    composition = merge(mechanisms)
    if accountant == "rdp":
        bound = _filter_bound(composition, delta)
        return Fit(bound <= epsilon_limit, bound)
    rdp = _rdp_bound(composition, delta)
    if rdp <= epsilon_limit:
        return Fit(True, rdp)
    epsilon = min(rdp, _pld_bound(composition, delta))
    return Fit(epsilon <= epsilon_limit, epsilon)


@lru_cache(maxsize=4096)
def _epsilon(composition: Composition, delta: float, accountant: Accountant) -> float:
    if accountant == "rdp":
        return _filter_bound(composition, delta)
    return min(_rdp_bound(composition, delta), _pld_bound(composition, delta))


def filter_epsilon(mechanisms: Iterable[Mechanism], delta: float) -> float:
    """The Rényi filter's ε for these claims at δ (inf when their δ is over the filter's share).

    The filter admits a claim exactly when this stays within the budget's ε, which is the
    same as "some order α still has Σ ε_α ≤ B_α".
    """
    return _filter_bound(merge(mechanisms), delta)


@lru_cache(maxsize=1024)
def _filter_curve(unit: Mechanism) -> npt.NDArray[np.float64]:
    """ε_α of one unit mechanism at each filter order."""
    orders = np.array(FILTER_ORDERS)
    if isinstance(unit, EpsilonDeltaMechanism):
        # Pure ε-DP is RDP ε at every order, and ½ε²-zCDP (Bun & Steinke 2016, Prop. 3.3).
        curve = np.minimum(unit.epsilon, orders * unit.epsilon**2 / 2)
    else:
        accountant = rdp_privacy_accountant.RdpAccountant(orders=list(FILTER_ORDERS))
        event = unit.unit_event()
        if not accountant.supports(event):
            raise _unsupported("rdp", unit)
        curve = np.asarray(accountant.compose(event).rdp, dtype=np.float64)
    curve.flags.writeable = False
    return curve


@lru_cache(maxsize=4096)
def _filter_bound(composition: Composition, delta: float) -> float:
    approx_delta = _basic_part(composition)[1]
    if approx_delta > delta * FILTER_APPROX_DELTA_SHARE:
        return math.inf
    if not composition:
        return 0.0
    total = np.zeros(len(FILTER_ORDERS))
    for mechanism in composition:
        total += mechanism.multiplicity * _filter_curve(mechanism.unit())
    per_order_delta = delta * (1 - FILTER_APPROX_DELTA_SHARE) / len(FILTER_ORDERS)
    finite, _order = rdp_privacy_accountant.compute_epsilon(FILTER_ORDERS, total, per_order_delta)
    # Order ∞ is the basic-composition filter for pure ε (Rogers et al. 2016): Σ ε ≤ budget,
    # valid adaptively and with no δ of its own, so it takes no share of the union bound.
    pure = sum(
        mechanism.multiplicity * _max_divergence(mechanism.unit()) for mechanism in composition
    )
    return min(float(finite), pure)


@lru_cache(maxsize=1024)
def _max_divergence(unit: Mechanism) -> float:
    """ε of a unit as pure DP (the Rényi order ∞); inf for mechanisms that are not pure."""
    if isinstance(unit, EpsilonDeltaMechanism):
        return unit.epsilon
    if isinstance(unit, LaplaceMechanism):
        return 1.0 / unit.scale
    return math.inf


def _basic_part(composition: Composition) -> tuple[float, float]:
    """(ε, δ) of the (ε, δ) mechanisms, composed by adding up."""
    parts = [m for m in composition if isinstance(m, EpsilonDeltaMechanism)]
    return (sum(m.epsilon * m.count for m in parts), sum(m.delta * m.count for m in parts))


def _unsupported(accountant: str, mechanism: Mechanism) -> UnsupportedMechanismError:
    return UnsupportedMechanismError(
        f"the {accountant} accountant cannot compose a {mechanism.type} mechanism "
        f"({mechanism.unit_event()!r}) and Veil knows no sound fallback for it"
    )


@lru_cache(maxsize=1024)
def _rdp_curve(unit: Mechanism) -> npt.NDArray[np.float64]:
    accountant = rdp_privacy_accountant.RdpAccountant()
    event = unit.unit_event()
    if not accountant.supports(event):
        raise _unsupported("rdp", unit)
    curve: npt.NDArray[np.float64] = accountant.compose(event).rdp
    curve.flags.writeable = False  # shared by every caller of the cache
    return curve


@lru_cache(maxsize=4096)
def _rdp_bound(composition: Composition, delta: float) -> float:
    basic_epsilon, basic_delta = _basic_part(composition)
    native = [m for m in composition if not isinstance(m, EpsilonDeltaMechanism)]
    if not native:
        return basic_epsilon if basic_delta <= delta else math.inf
    if basic_delta >= delta:
        return math.inf
    total = np.zeros(len(rdp_privacy_accountant.DEFAULT_RDP_ORDERS))
    for mechanism in native:
        total += mechanism.multiplicity * _rdp_curve(mechanism.unit())
    orders = rdp_privacy_accountant.DEFAULT_RDP_ORDERS
    epsilon, _order = rdp_privacy_accountant.compute_epsilon(orders, total, delta - basic_delta)
    return float(epsilon) + basic_epsilon


@lru_cache(maxsize=256)
def _pld_native(unit: Mechanism) -> bool:
    """Does PLD compose this unit itself? False for the parts with a fallback; else raise."""
    if isinstance(unit, EpsilonDeltaMechanism):
        return False
    if pld_privacy_accountant.PLDAccountant().supports(unit.unit_event()):
        return True
    if isinstance(unit, ZcdpMechanism):
        return False
    raise _unsupported("pld", unit)


@lru_cache(maxsize=4096)
def _pld_bound(composition: Composition, delta: float) -> float:
    basic_epsilon, basic_delta = _basic_part(composition)
    native = tuple(m for m in composition if _pld_native(m.unit()))
    rho = sum(
        m.rho * m.count
        for m in composition
        if isinstance(m, ZcdpMechanism) and not _pld_native(m.unit())
    )
    if not native and rho == 0:
        return basic_epsilon if basic_delta <= delta else math.inf
    available = delta - basic_delta
    if available <= 0:
        return math.inf
    if rho == 0:
        return _pld_epsilons(native, (available,))[0] + basic_epsilon
    if not native:
        return zcdp_epsilon(rho, available) + basic_epsilon
    native_deltas = tuple(available * (1 - share) for share in ZCDP_DELTA_SPLITS)
    native_epsilons = _pld_epsilons(native, native_deltas)
    return basic_epsilon + min(
        eps + zcdp_epsilon(rho, available * share)
        for eps, share in zip(native_epsilons, ZCDP_DELTA_SPLITS, strict=True)
    )


@lru_cache(maxsize=512)
def _pld_epsilons(native: Composition, deltas: tuple[float, ...]) -> tuple[float, ...]:
    if not native:
        return tuple(0.0 for _ in deltas)
    accountant = pld_privacy_accountant.PLDAccountant()
    for mechanism in native:
        accountant.compose(mechanism.unit_event(), mechanism.multiplicity)
    return tuple(float(accountant.get_epsilon(d)) for d in deltas)
