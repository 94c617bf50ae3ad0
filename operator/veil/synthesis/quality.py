"""How close synthetic data is to its source: the DP report, and TVD helpers.

The report a run publishes (`dp_report`, only when `reportEpsilon` > 0) never looks at the
source except through Gaussian-noised 1-way marginals (`veil.synthesis.dp.noisy_marginals`,
paid from the claim). Its figures are post-processing of those noisy counts and of the
synthetic data, on the synthesizer's own discrete domain:

- `oneWayTvd`: per column, ½·Σ|p̂ − q| between the noisy source marginal p̂ (negative counts
  clipped to 0, then normalised) and the synthetic marginal q: mean, worst, and each column;
- `uniformOneWayTvd`: the same for a synthesizer that draws every column uniformly — the
  floor any working synthesizer must clear.

They are DP *estimates*: noisy (with σ = `sigma` per count), not exact, and a small source
makes them noisier. They measure the synthesizer on its own domain: a value that the domain
left out (undeclared, or too rare to be discovered) is not counted as an error here. No
figure computed from the raw data is published (no exact TVD, no distance to closest record,
no row counts).

The TVD and correlation helpers below compare two tables exactly: NOT private. The product
never applies them to a private source; the benchmark applies them to public data.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.synthesis.domain import Codes, ColumnPlan

_DENSE_CELLS = 1 << 20
Floats = npt.NDArray[np.float64]


def _round(value: float) -> float:
    return float(round(value, 4))


def _distribution(counts: Floats) -> Floats:
    """Noisy counts as a distribution: negatives clipped; all-zero gives uniform."""
    clipped = np.clip(counts, 0.0, None)
    total = clipped.sum()
    if not total > 0:
        return np.full(len(counts), 1.0 / len(counts))
    return np.asarray(clipped / total, dtype=np.float64)


def dp_report(
    plan: Sequence[ColumnPlan],
    noisy: Sequence[Floats],
    synthetic: Codes,
    *,
    report_epsilon: float,
    noise_multiplier: float,
) -> dict[str, Any]:
    """The report's `quality` object, from the noisy marginals and the synthetic codes."""
    tvds, uniform = [], []
    for j, column in enumerate(plan):
        estimate = _distribution(noisy[j])
        drawn = np.bincount(synthetic[:, j], minlength=column.cardinality) / max(1, len(synthetic))
        tvds.append(float(0.5 * np.abs(estimate - drawn).sum()))
        uniform.append(float(0.5 * np.abs(estimate - 1.0 / column.cardinality).sum()))
    worst = int(np.argmax(tvds))
    return {
        "kind": "dpEstimate",
        "about": "1-way TVD between the synthetic data and Gaussian-noised marginals of the "
        "source: a differentially private estimate paid from reportEpsilon, not an exact "
        "figure",
        "reportEpsilon": report_epsilon,
        "noiseMultiplier": noise_multiplier,
        "sigma": noise_multiplier * float(np.sqrt(len(plan))),
        "oneWayTvd": {
            "mean": _round(float(np.mean(tvds))),
            "worst": _round(tvds[worst]),
            "worstColumn": plan[worst].name,
            "columns": {c.name: _round(t) for c, t in zip(plan, tvds, strict=True)},
        },
        "uniformOneWayTvd": {"mean": _round(float(np.mean(uniform)))},
    }


# --- exact comparisons: NOT private (benchmarks on public data) --------------------------------


def one_way_tvd(a: Codes, b: Codes, cards: Sequence[int]) -> Floats:
    out = np.empty(len(cards))
    for j, card in enumerate(cards):
        out[j] = _tvd(a[:, j], b[:, j], card)
    return out


def _tvd(a: npt.NDArray[np.int64], b: npt.NDArray[np.int64], size: int) -> float:
    """TVD of two samples of codes in [0, size), dense or (for huge domains) sparse."""
    if size <= _DENSE_CELLS:
        p = np.bincount(a, minlength=size) / max(1, len(a))
        q = np.bincount(b, minlength=size) / max(1, len(b))
        return float(0.5 * np.abs(p - q).sum())
    cells, inverse = np.unique(np.concatenate([a, b]), return_inverse=True)
    p = np.bincount(inverse[: len(a)], minlength=len(cells)) / max(1, len(a))
    q = np.bincount(inverse[len(a) :], minlength=len(cells)) / max(1, len(b))
    return float(0.5 * np.abs(p - q).sum())


def two_way_tvd(a: Codes, b: Codes, cards: Sequence[int]) -> dict[tuple[int, int], float]:
    out: dict[tuple[int, int], float] = {}
    for i, j in combinations(range(len(cards)), 2):
        out[i, j] = _tvd(
            a[:, i] * cards[j] + a[:, j], b[:, i] * cards[j] + b[:, j], cards[i] * cards[j]
        )
    return out


def _correlation(codes: Codes) -> Floats:
    x = codes.astype(float)
    x = x - x.mean(axis=0)
    norms = np.sqrt((x * x).sum(axis=0))
    with np.errstate(divide="ignore", invalid="ignore"):
        corr = (x.T @ x) / np.outer(norms, norms)
    # A constant column correlates with nothing.
    corr = np.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)
    return np.asarray(corr, dtype=np.float64)


def correlation_difference(a: Codes, b: Codes) -> tuple[float, float]:
    """Mean and max |corr(a) − corr(b)| over the pairs of columns (0, 0 for one column)."""
    k = a.shape[1]
    if k < 2:
        return 0.0, 0.0
    upper = np.triu_indices(k, 1)
    diff = np.abs(_correlation(a) - _correlation(b))[upper]
    return float(diff.mean()), float(diff.max())


def marginal_figures(source: Codes, synthetic: Codes, plan: Sequence[ColumnPlan]) -> dict[str, Any]:
    """Exact 1-way and 2-way TVD and correlation difference of two tables: NOT private."""
    cards = [c.cardinality for c in plan]
    one = one_way_tvd(source, synthetic, cards)
    two = two_way_tvd(source, synthetic, cards)
    figures: dict[str, Any] = {"oneWayTvd": {"mean": float(one.mean()), "worst": float(one.max())}}
    figures["twoWayTvd"] = (
        {"mean": float(np.mean(list(two.values()))), "worst": float(max(two.values()))}
        if two
        else None
    )
    mean_corr, max_corr = correlation_difference(source, synthetic)
    figures["correlation"] = {"meanAbsDiff": mean_corr, "maxAbsDiff": max_corr}
    return figures


def uniform_codes(plan: Sequence[ColumnPlan], rows: int, rng: np.random.Generator) -> Codes:
    """Codes drawn uniformly over each column's domain: what a broken synthesizer produces."""
    return np.stack([rng.integers(0, c.cardinality, size=rows) for c in plan], axis=1).astype(
        np.int64
    )
