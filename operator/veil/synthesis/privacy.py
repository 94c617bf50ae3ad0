"""What a synthesis run spends, stated as ledger mechanisms before the run starts.

One run spends, all out of the spec's (ε, δ) — `epsilon`/`delta` are the run's total:

- **preprocessor** (`ε_pre`): bounds of numeric columns declared without them, inferred by
  smartnoise's `approx_bounds` (a Laplace histogram, pure ε), ε_pre split evenly among those
  columns: one `epsilonDelta` mechanism (ε_pre, 0);
- **discovery** (`ε_disc`, `δ_disc`): the values of `discover: true` columns, each from a
  thresholded Laplace histogram at (ε_disc/m, δ_disc/m) for m such columns
  (`veil.synthesis.dp.discover_values`): one `epsilonDelta` mechanism (ε_disc, δ_disc);
- **synthesizer and report**, one zCDP budget ρ_z = ρ(ε_z, δ_z) with ε_z = ε − ε_pre − ε_disc
  and δ_z = δ − δ_disc: the synthesizer runs at (ε_z − ε_rep, δ_z), i.e. at
  ρ_syn = ρ(ε_z − ε_rep, δ_z), claimed as `zcdp`; the DP report gets what is left,
  ρ_rep = ρ_z − ρ_syn, as one Gaussian release of every 1-way marginal (L2 sensitivity √k for
  k columns) with noise multiplier 1/√(2ρ_rep), claimed as `gaussian`. zCDP composes by
  adding ρ, so the two together cost exactly (ε_z, δ_z).

By basic composition the whole run is (ε, δ)-DP under add/remove of one record.

ρ(ε, δ) is what smartnoise-synth's MST and AIM run at: `snsynth.utils.cdp_rho` searches,
through OpenDP, for the Gaussian noise scale whose zCDP guarantee converts to (ε, δ)-DP under
OpenDP's `make_zCDP_to_approxDP`. That conversion is Canonne, Kamath and Steinke (2020),
"The Discrete Gaussian for Differential Privacy", Proposition 12 / Corollary 13: ρ-zCDP
implies (ε, δ)-DP for every α > 1 with

    ε(ρ, δ; α) = αρ + (ln(1/δ) + (α − 1)·ln(1 − 1/α) − ln α) / (α − 1).

OpenDP evaluates it at one α found by a bisection on an approximate derivative; any α is a
valid bound, so its ε is never below the minimum over α computed here. With ε(ρ) the true
minimum, the ρ that solves ε(ρ, δ) = ε_target is therefore never below the ρ OpenDP's search
returns: `zcdp_rho` is an upper bound on what the synthesizer spends (the tests check it
against smartnoise-synth's own `cdp_rho` over a grid, where the two agree to ~1e-15).

MST spends exactly that ρ (three Gaussian/exponential-mechanism stages of ρ/3 each), given a
privately estimated total (see `synthesize._PrivateTotalMST`); AIM spends at most that ρ (its
last round takes whatever is left).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from veil.privacy.mechanisms import EpsilonDeltaMechanism, GaussianMechanism, ZcdpMechanism

SynthesisMethod = Literal["mst", "aim"]
PRIVATE_METHODS: tuple[str, ...] = ("mst", "aim")

# Relative headroom added to ρ: float rounding in two independent implementations of the same
# bound must never put the claim below the spend.
RHO_HEADROOM = 1e-9

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _cks_epsilon(alpha: float, rho: float, delta: float) -> float:
    """ε of ρ-zCDP at δ for one order α > 1 (CKS20 Prop. 12)."""
    am1 = alpha - 1.0
    return (
        alpha * rho
        + (math.log(1.0 / delta) + am1 * math.log1p(-1.0 / alpha) - math.log(alpha)) / am1
    )


def zcdp_epsilon(rho: float, delta: float) -> float:
    """The smallest ε (over α in (1, 1+1e8)) such that ρ-zCDP implies (ε, δ)-DP."""
    if rho < 0 or not 0 < delta < 1:
        raise ValueError("need rho >= 0 and 0 < delta < 1")
    if rho == 0:
        return 0.0
    # The bound is unimodal in α; search log(α − 1) with golden sections.
    lo, hi = math.log(1e-8), math.log(1e8)
    for _ in range(120):
        m1 = hi - _GOLDEN * (hi - lo)
        m2 = lo + _GOLDEN * (hi - lo)
        if _cks_epsilon(1.0 + math.exp(m1), rho, delta) < _cks_epsilon(
            1.0 + math.exp(m2), rho, delta
        ):
            hi = m2
        else:
            lo = m1
    return max(0.0, _cks_epsilon(1.0 + math.exp((lo + hi) / 2.0), rho, delta))


@lru_cache(maxsize=1024)
def zcdp_rho(epsilon: float, delta: float) -> float:
    """The largest ρ whose ρ-zCDP guarantee implies (ε, δ)-DP, rounded up by RHO_HEADROOM.

    This is the ρ smartnoise-synth's MST and AIM run at for (ε, δ) (never below it).
    """
    if epsilon <= 0 or not 0 < delta < 1:
        raise ValueError("need epsilon > 0 and 0 < delta < 1")
    lo, hi = 0.0, epsilon
    while zcdp_epsilon(hi, delta) <= epsilon:  # with a large δ, ε(ρ) can be below ρ
        lo, hi = hi, hi * 2.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if mid in (lo, hi):
            break
        if zcdp_epsilon(mid, delta) > epsilon:
            hi = mid
        else:
            lo = mid
    return hi * (1.0 + RHO_HEADROOM)


@dataclass(frozen=True)
class BudgetSplit:
    """How one run's (ε, δ) is shared among its parts (see the module docstring)."""

    epsilon: float
    delta: float
    preprocessor_epsilon: float = 0.0
    discovery_epsilon: float = 0.0
    discovery_delta: float = 0.0
    report_epsilon: float = 0.0

    def __post_init__(self) -> None:
        parts = (self.preprocessor_epsilon, self.discovery_epsilon, self.report_epsilon)
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError("epsilon must be a positive number")
        if not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")
        if any(not (p >= 0 and math.isfinite(p)) for p in parts):
            raise ValueError("the parts of epsilon must be >= 0")
        if not sum(parts) < self.epsilon:
            raise ValueError(
                "preprocessor epsilon must be smaller than epsilon, with the discovery and "
                "report epsilons added: all three are taken out of it"
            )
        if not 0 <= self.discovery_delta < self.delta:
            raise ValueError("discovery delta must be >= 0 and smaller than delta")
        if (self.discovery_epsilon > 0) != (self.discovery_delta > 0):
            raise ValueError("discovery needs both an epsilon and a delta above 0, or neither")

    @property
    def zcdp_epsilon(self) -> float:
        """ε of the zCDP part (synthesizer and report), at `zcdp_delta`."""
        return self.epsilon - self.preprocessor_epsilon - self.discovery_epsilon

    @property
    def zcdp_delta(self) -> float:
        return self.delta - self.discovery_delta

    @property
    def synthesizer_epsilon(self) -> float:
        """The ε the synthesizer is created with (at `zcdp_delta`)."""
        return self.zcdp_epsilon - self.report_epsilon

    @property
    def synthesizer_rho(self) -> float:
        return zcdp_rho(self.synthesizer_epsilon, self.zcdp_delta)

    @property
    def report_rho(self) -> float:
        """What the zCDP part has left for the report (0 without one)."""
        if self.report_epsilon == 0:
            return 0.0
        return zcdp_rho(self.zcdp_epsilon, self.zcdp_delta) - self.synthesizer_rho

    @property
    def report_noise_multiplier(self) -> float:
        """σ / L2 sensitivity of the report's Gaussian release: ρ_rep = 1 / (2 m²)."""
        return 1.0 / math.sqrt(2.0 * self.report_rho)


def _wire(mechanism: Any) -> dict[str, Any]:
    wire: dict[str, Any] = mechanism.model_dump(mode="json", by_alias=True)
    return wire


def split_mechanisms(method: str, split: BudgetSplit) -> list[dict[str, Any]]:
    """The mechanisms of one run with this split, in the privacy ledger's wire format.

    Always the synthesizer's `zcdp` first; then the report's `gaussian`, the preprocessor's
    and the discovery's `epsilonDelta`, each only when it has budget. Raises ValueError for a
    method that is not differentially private: nothing bounds it.
    """
    if method not in PRIVATE_METHODS:
        raise ValueError(
            f"method {method!r} is not differentially private: it cannot be charged to a budget"
        )
    mechanisms = [_wire(ZcdpMechanism(rho=split.synthesizer_rho))]
    if split.report_epsilon > 0:
        mechanisms.append(_wire(GaussianMechanism(noise_multiplier=split.report_noise_multiplier)))
    if split.preprocessor_epsilon > 0:
        mechanisms.append(
            _wire(EpsilonDeltaMechanism(epsilon=split.preprocessor_epsilon, delta=0.0))
        )
    if split.discovery_epsilon > 0:
        mechanisms.append(
            _wire(
                EpsilonDeltaMechanism(epsilon=split.discovery_epsilon, delta=split.discovery_delta)
            )
        )
    return mechanisms


def claim_mechanisms(
    method: str,
    epsilon: float,
    delta: float,
    preprocessor_epsilon: float = 0.0,
    *,
    discovery_epsilon: float = 0.0,
    discovery_delta: float = 0.0,
    report_epsilon: float = 0.0,
) -> list[dict[str, Any]]:
    """The mechanisms a SyntheticDataset's claim carries (`split_mechanisms` of the split).

    Together they upper-bound what `veil synthesize` spends with the same arguments.
    """
    split = BudgetSplit(
        epsilon=epsilon,
        delta=delta,
        preprocessor_epsilon=preprocessor_epsilon,
        discovery_epsilon=discovery_epsilon,
        discovery_delta=discovery_delta,
        report_epsilon=report_epsilon,
    )
    return split_mechanisms(method, split)
