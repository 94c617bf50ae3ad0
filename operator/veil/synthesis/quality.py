"""How close synthetic data is to its source, and how close it sits to the training records.

Every figure is computed on the synthesizer's own discrete domain (`domain.encode`): the same
codes for the source and the synthetic rows, so a figure measures the synthesizer, not the
binning. The report is computed from the raw source and is itself NOT differentially private:
it is an operator-facing diagnostic (coarse aggregates), kept in the resource's status.

- marginal total-variation distance (TVD), ½·Σ|p − q|, over every column (1-way) and every
  pair of columns (2-way): mean and worst;
- correlation difference: mean and max absolute difference between the Pearson correlation
  matrices of the codes (bins are ordered; categories in sorted order);
- DCR, distance to closest record (Gower distance: |Δbin| / (bins − 1) for binned columns,
  0/1 mismatch for categorical ones, averaged over columns): synthetic → train versus
  synthetic → held-out rows that the synthesizer never saw, on equal-sized samples. If the
  synthetic rows sit closer to the training rows than to the held-out ones, the synthesizer
  is copying records. Low-cardinality data has many exact matches either way, even at small ε:
  the comparison, not the raw share, is the signal. Reported, never gated on.
- a uniform baseline: the same figures for codes drawn uniformly over each column's domain,
  the floor any working synthesizer must clear.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any

import numpy as np
import numpy.typing as npt

from veil.synthesis.domain import Codes, ColumnPlan

DCR_MAX_ROWS = 2000
_CHUNK = 256
_DENSE_CELLS = 1 << 20


def _round(value: float) -> float:
    return float(round(value, 6))


def one_way_tvd(a: Codes, b: Codes, cards: Sequence[int]) -> npt.NDArray[np.float64]:
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


def _correlation(codes: Codes) -> npt.NDArray[np.float64]:
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
    cards = [c.cardinality for c in plan]
    one = one_way_tvd(source, synthetic, cards)
    two = two_way_tvd(source, synthetic, cards)
    worst_one = int(np.argmax(one))
    figures: dict[str, Any] = {
        "oneWayTvd": {
            "mean": _round(float(one.mean())),
            "worst": _round(float(one[worst_one])),
            "worstColumn": plan[worst_one].name,
        },
    }
    if two:
        worst_pair = max(two, key=lambda pair: two[pair])
        figures["twoWayTvd"] = {
            "mean": _round(float(np.mean(list(two.values())))),
            "worst": _round(two[worst_pair]),
            "worstPair": [plan[worst_pair[0]].name, plan[worst_pair[1]].name],
        }
    else:
        figures["twoWayTvd"] = None
    mean_corr, max_corr = correlation_difference(source, synthetic)
    figures["correlation"] = {"meanAbsDiff": _round(mean_corr), "maxAbsDiff": _round(max_corr)}
    return figures


def uniform_codes(plan: Sequence[ColumnPlan], rows: int, rng: np.random.Generator) -> Codes:
    """Codes drawn uniformly over each column's domain: what a broken synthesizer produces."""
    return np.stack([rng.integers(0, c.cardinality, size=rows) for c in plan], axis=1).astype(
        np.int64
    )


def _closest(
    queries: Codes, records: Codes, weights: npt.NDArray[np.float64], mask: npt.NDArray[np.bool_]
) -> npt.NDArray[np.float64]:
    """For each query row, the Gower distance to its closest record."""
    out = np.empty(len(queries))
    for start in range(0, len(queries), _CHUNK):
        q = queries[start : start + _CHUNK]
        dist = np.zeros((len(q), len(records)))
        for j in range(queries.shape[1]):
            delta = q[:, j, None] - records[None, :, j]
            if mask[j]:
                dist += (delta != 0) * weights[j]
            else:
                dist += np.abs(delta) * weights[j]
        out[start : start + _CHUNK] = dist.min(axis=1)
    return out


def dcr(
    synthetic: Codes,
    train: Codes,
    holdout: Codes,
    plan: Sequence[ColumnPlan],
    *,
    rng: np.random.Generator,
    max_rows: int = DCR_MAX_ROWS,
) -> dict[str, Any]:
    """Distance to closest record, synthetic → train versus synthetic → holdout."""
    size = min(len(train), len(holdout), max_rows)
    train_sample = train[rng.choice(len(train), size, replace=False)]
    holdout_sample = holdout[rng.choice(len(holdout), size, replace=False)]
    queries = synthetic[rng.choice(len(synthetic), min(len(synthetic), max_rows), replace=False)]
    k = len(plan)
    categorical = np.array([c.kind == "categorical" for c in plan])
    weights = np.array(
        [
            1.0 / k
            if c.kind == "categorical" or c.cardinality < 2
            else 1.0 / k / (c.cardinality - 1)
            for c in plan
        ]
    )
    to_train = _closest(queries, train_sample, weights, categorical)
    to_holdout = _closest(queries, holdout_sample, weights, categorical)
    closer = np.mean(to_train < to_holdout) + 0.5 * np.mean(to_train == to_holdout)
    return {
        "rows": {"synthetic": len(queries), "train": size, "holdout": size},
        "syntheticToTrain": {
            "median": _round(float(np.median(to_train))),
            "p05": _round(float(np.quantile(to_train, 0.05))),
            "exactMatchShare": _round(float(np.mean(to_train == 0))),
        },
        "syntheticToHoldout": {
            "median": _round(float(np.median(to_holdout))),
            "p05": _round(float(np.quantile(to_holdout, 0.05))),
            "exactMatchShare": _round(float(np.mean(to_holdout == 0))),
        },
        # 0.5 when synthetic rows are no closer to the training rows than to unseen ones.
        "closerToTrainShare": _round(float(closer)),
    }


def quality_report(
    plan: Sequence[ColumnPlan],
    source: Codes,
    synthetic: Codes,
    *,
    train: Codes | None = None,
    holdout: Codes | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The report's `quality` object (shape in the module docstring and `veil synthesize`)."""
    rng = np.random.default_rng(seed)
    report = marginal_figures(source, synthetic, plan)
    baseline = marginal_figures(source, uniform_codes(plan, len(synthetic), rng), plan)
    report["uniformBaseline"] = {
        "oneWayTvdMean": baseline["oneWayTvd"]["mean"],
        "twoWayTvdMean": baseline["twoWayTvd"]["mean"] if baseline["twoWayTvd"] else None,
        "correlationMeanAbsDiff": baseline["correlation"]["meanAbsDiff"],
    }
    if train is not None and holdout is not None and len(train) and len(holdout):
        report["dcr"] = dcr(synthetic, train, holdout, plan, rng=rng)
    else:
        report["dcr"] = None
    report["domain"] = "synthesizer"
    return report
