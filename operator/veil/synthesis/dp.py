"""The DP mechanisms a synthesis run applies itself, besides the synthesizer.

Noise comes from OpenDP's samplers (as smartnoise-synth's own does), never from a seeded
numpy generator: a known seed would make the noise, and so the mechanism, deterministic.

- `discover_values`: the values of a categorical column, by a thresholded Laplace histogram
  (Korolova et al. 2009; Wilson et al. 2020, "Differentially private SQL with bounded user
  contribution"). Each record contributes one value per column, so under add/remove one
  count changes by 1; Laplace noise of scale 1/ε on the counts of the values present, and a
  threshold τ = 1 + ln(1/(2δ))/ε, give (ε, δ)-DP: a value only one record has passes with
  probability P[1 + Lap(1/ε) > τ] = ½·exp(−(τ − 1)ε) = δ. Only the set of values passing is
  released (sorted, never the counts); keeping the `max_values` largest noisy counts is
  post-processing.
- `infer_bounds`: smartnoise's `approx_bounds` (a Laplace histogram over power-of-two bins,
  scale 1/ε, each record in one bin): ε-DP.
- `noisy_marginals`: every 1-way marginal of the encoded rows at once, Gaussian noise of
  σ = m·√k for k columns (one record moves one count per column: L2 sensitivity √k), which
  is ρ-zCDP with ρ = 1/(2m²).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]

Noise = Callable[[npt.NDArray[np.float64]], npt.NDArray[np.float64]]
Floats = npt.NDArray[np.float64]


class MechanismError(RuntimeError):
    """A mechanism could not produce its output (its message holds no data)."""


def _opendp() -> Any:
    import opendp.prelude as dp  # type: ignore[import-untyped,unused-ignore]

    dp.enable_features("floating-point", "contrib")
    return dp


def laplace_noise(scale: float) -> Noise:
    """Adds Laplace(scale) to each value (OpenDP's sampler)."""
    dp = _opendp()
    measurement = dp.m.make_laplace(
        dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l1_distance(T=float), scale
    )
    return lambda values: np.asarray(measurement([float(v) for v in values]), dtype=np.float64)


def gaussian_noise(sigma: float, sensitivity: float) -> tuple[Noise, float]:
    """Adds N(0, σ²) to each value (OpenDP's sampler); also returns the ρ OpenDP states for
    a release of L2 sensitivity `sensitivity`."""
    dp = _opendp()
    measurement = dp.m.make_gaussian(
        dp.vector_domain(dp.atom_domain(T=float, nan=False)), dp.l2_distance(T=float), sigma
    )

    def add(values: Floats) -> Floats:
        return np.asarray(measurement([float(v) for v in values]), dtype=np.float64)

    return add, float(measurement.map(sensitivity))


def discovery_threshold(epsilon: float, delta: float) -> float:
    """τ such that a count of 1 passes with probability δ under Laplace(1/ε) noise."""
    if not (epsilon > 0 and 0 < delta < 0.5):
        raise ValueError("discovery needs epsilon > 0 and 0 < delta < 0.5")
    return 1.0 + math.log(1.0 / (2.0 * delta)) / epsilon


def discover_values(
    keys: Sequence[Any],
    epsilon: float,
    delta: float,
    max_values: int,
    noise: Noise | None = None,
) -> list[Any]:
    """The (ε, δ)-DP set of values among `keys` (one key per record, missing ones left out).

    Returns at most `max_values` keys, sorted (by their string form); counts never leave.
    """
    counted: dict[Any, int] = {}
    for key in keys:
        counted[key] = counted.get(key, 0) + 1
    if not counted:
        return []
    found = list(counted)
    add = noise or laplace_noise(1.0 / epsilon)
    noisy = add(np.array([counted[k] for k in found], dtype=np.float64))
    passing = np.flatnonzero(noisy > discovery_threshold(epsilon, delta))
    # Largest noisy counts first (post-processing), then a canonical order: no ranks leave.
    kept = passing[np.argsort(-noisy[passing], kind="stable")][:max_values]
    return sorted((found[i] for i in kept), key=str)


def infer_bounds(values: pd.Series, epsilon: float) -> tuple[float, float]:
    """ε-DP bounds of a numeric column (missing values ignored), by `approx_bounds`."""
    from snsql.sql._mechanisms.approx_bounds import (  # type: ignore[import-untyped,unused-ignore]
        approx_bounds,
    )

    numeric = np.asarray(values, dtype=np.float64)
    lower, upper = approx_bounds(numeric[~np.isnan(numeric)], epsilon)
    if lower is None or upper is None:
        raise MechanismError(
            "the private bounds search found no range above its noise threshold: declare "
            "lower/upper, or give it more preprocessorEpsilon"
        )
    return float(lower), float(upper)


def noisy_marginals(
    codes: npt.NDArray[np.int64], cards: Sequence[int], noise_multiplier: float
) -> tuple[list[Floats], float]:
    """Every column's histogram of codes with Gaussian noise σ = m·√k (L2 sensitivity √k).

    Returns the noisy counts per column and the ρ OpenDP states for the release.
    """
    sensitivity = math.sqrt(len(cards))
    add, rho = gaussian_noise(noise_multiplier * sensitivity, sensitivity)
    exact = [
        np.bincount(codes[:, j], minlength=card).astype(np.float64) for j, card in enumerate(cards)
    ]
    noisy = add(np.concatenate(exact))
    split = np.cumsum(list(cards))[:-1]
    return list(np.split(noisy, split)), rho
