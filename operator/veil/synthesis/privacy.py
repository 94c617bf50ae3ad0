"""What a synthesis run spends, stated as ledger mechanisms before the run starts.

smartnoise-synth's MST and AIM turn their (ε, δ) into a zCDP budget ρ with
`snsynth.utils.cdp_rho`: a binary search, through OpenDP, for the Gaussian noise scale whose
zCDP guarantee converts to (ε, δ)-DP under OpenDP's `make_zCDP_to_approxDP`. That conversion
is Canonne, Kamath and Steinke (2020), "The Discrete Gaussian for Differential Privacy",
Proposition 12 / Corollary 13: ρ-zCDP implies (ε, δ)-DP for every α > 1 with

    ε(ρ, δ; α) = αρ + (ln(1/δ) + (α − 1)·ln(1 − 1/α) − ln α) / (α − 1).

OpenDP evaluates it at one α found by a bisection on an approximate derivative; any α is a
valid bound, so its ε is never below the minimum over α computed here. With ε(ρ) the true
minimum, the ρ that solves ε(ρ, δ) = ε_target is therefore never below the ρ OpenDP's search
returns: `zcdp_rho` is an upper bound on what the synthesizer spends (the tests check it
against smartnoise-synth's own `cdp_rho` over a grid, where the two agree to ~1e-15).

MST spends exactly that ρ (three Gaussian/exponential-mechanism stages of ρ/3 each); AIM
spends at most that ρ (its last round takes whatever is left). Both count neighbours by adding
or removing one record. Bounds inferred by the preprocessor (`approx_bounds`, a Laplace
histogram per column, the preprocessor ε split evenly among the columns that need it) are pure
ε-DP, claimed as one `epsilonDelta` mechanism with δ = 0. Veil creates the synthesizer with
ε − ε_pre and fits the preprocessor itself, so the split is exactly the claimed one even when
no column needs bounds (smartnoise would otherwise hand unspent preprocessing budget back to
the synthesizer, above the claim).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any, Literal

from veil.privacy.mechanisms import EpsilonDeltaMechanism, ZcdpMechanism

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


def claim_mechanisms(
    method: str, epsilon: float, delta: float, preprocessor_epsilon: float = 0.0
) -> list[dict[str, Any]]:
    """The mechanisms a SyntheticDataset's claim carries, in the privacy ledger's wire format.

    `[{"type": "zcdp", "rho": ρ, "count": 1}]` for the synthesizer, at ρ = zcdp_rho(ε − ε_pre, δ),
    plus `{"type": "epsilonDelta", "epsilon": ε_pre, "delta": 0.0, "count": 1}` when the
    preprocessor has budget. Together they upper-bound what `veil synthesize` spends with the
    same arguments. Raises ValueError for a non-private method: nothing bounds it.
    """
    if method not in PRIVATE_METHODS:
        raise ValueError(
            f"method {method!r} is not differentially private: it cannot be charged to a budget"
        )
    if not 0 <= preprocessor_epsilon < epsilon:
        raise ValueError("preprocessor epsilon must be >= 0 and smaller than epsilon")
    mechanisms: list[dict[str, Any]] = [
        ZcdpMechanism(rho=zcdp_rho(epsilon - preprocessor_epsilon, delta)).model_dump(
            mode="json", by_alias=True
        )
    ]
    if preprocessor_epsilon > 0:
        mechanisms.append(
            EpsilonDeltaMechanism(epsilon=preprocessor_epsilon, delta=0.0).model_dump(
                mode="json", by_alias=True
            )
        )
    return mechanisms
