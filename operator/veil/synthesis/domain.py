"""The discrete domain a synthesizer works on: one plan per column, and its encoding.

MST and AIM model discrete data only, so every column becomes a small set of codes:

- **categorical** (declared, or not numeric): one code per value. The set of values is read
  from the data, as smartnoise-synth's `LabelTransformer` does; it is treated as public schema
  (a category that only one person has is visible in the output's domain — declare such
  columns away or coarsen them before synthesis).
- **binned** (numeric): `bins` equal-width bins between a lower and an upper bound, values
  clipped into them; the synthetic value is the bin's midpoint. The bounds come from one of
    * `public`: given by the caller (`--bounds COL=LO:HI`), no budget spent;
    * `dp`: inferred by smartnoise-synth's `approx_bounds` (a Laplace histogram, pure ε) with
      the preprocessor ε, split evenly across such columns — counted in the claim;
    * `data`: the column's min and max, which is NOT private: only with `allowNonPrivate`.
- an undeclared integer-valued numeric column without bounds, when the preprocessor has no
  budget, counts as pre-binned: categorical, one code per value.

Anything else (a fractional column, no bounds, no preprocessor budget, private run) is refused
with a message that names the column and the three ways out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]

ColumnKind = Literal["categorical", "binned"]
BoundsSource = Literal["public", "dp", "data", "none"]
Codes = npt.NDArray[np.int64]

DEFAULT_BINS = 10


class DomainError(ValueError):
    """The data cannot be put on a discrete domain under the requested privacy rules."""


@dataclass(frozen=True)
class ColumnPlan:
    name: str
    kind: ColumnKind
    categories: tuple[Any, ...] = ()  # categorical: sorted values, then None when nullable
    lower: float | None = None
    upper: float | None = None
    bins: int = 0
    bounds_source: BoundsSource = "none"
    nullable: bool = False

    @property
    def cardinality(self) -> int:
        if self.kind == "categorical":
            return len(self.categories)
        return self.bins + (1 if self.nullable else 0)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "cardinality": self.cardinality,
        }
        if self.kind == "binned":
            out["bounds"] = [self.lower, self.upper]
            out["boundsSource"] = self.bounds_source
        return out


def parse_bounds(items: Iterable[str]) -> dict[str, tuple[float, float]]:
    """`COL=LO:HI` strings into {column: (lo, hi)}."""
    bounds: dict[str, tuple[float, float]] = {}
    for item in items:
        name, sep, span = item.rpartition("=")
        lo_text, colon, hi_text = span.partition(":")
        try:
            lo, hi = float(lo_text), float(hi_text)
        except ValueError:
            lo = hi = math.nan
        if not sep or not name or not colon or not (math.isfinite(lo) and math.isfinite(hi)):
            raise DomainError(f"bounds {item!r} are not COLUMN=LOW:HIGH with finite numbers")
        if hi <= lo:
            raise DomainError(f"bounds {item!r}: HIGH must be greater than LOW")
        bounds[name] = (lo, hi)
    return bounds


def _is_numeric(series: pd.Series) -> bool:
    import pandas as pd

    return bool(
        pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series)
    )


def _is_integer_valued(series: pd.Series) -> bool:
    values = series.dropna().to_numpy(dtype=float)
    return bool(np.all(np.isfinite(values)) and np.all(values == np.round(values)))


def _sorted_categories(series: pd.Series) -> tuple[Any, ...]:
    values = [_plain(v) for v in series.dropna().unique()]
    try:
        ordered = sorted(values)
    except TypeError:
        ordered = sorted(values, key=str)
    if series.isna().any():
        ordered.append(None)
    return tuple(ordered)


def _plain(value: Any) -> Any:
    """numpy scalars to Python ones (JSON, sorting, dict keys)."""
    return value.item() if isinstance(value, np.generic) else value


def build_plan(
    data: pd.DataFrame,
    *,
    categorical: Sequence[str] = (),
    bounds: Mapping[str, tuple[float, float]] | None = None,
    bins: int = DEFAULT_BINS,
    preprocessor_epsilon: float = 0.0,
    allow_non_private: bool = False,
) -> list[ColumnPlan]:
    """Decide each column's encoding (see the module docstring for the rules)."""
    bounds = dict(bounds or {})
    if bins < 2:
        raise DomainError("bins must be at least 2")
    unknown = [c for c in [*categorical, *bounds] if c not in data.columns]
    if unknown:
        raise DomainError(f"no such column(s) in the source: {', '.join(sorted(set(unknown)))}")
    both = sorted(set(categorical) & set(bounds))
    if both:
        raise DomainError(f"column(s) both categorical and bounded: {', '.join(both)}")

    plan: list[ColumnPlan] = []
    refused: list[str] = []
    for name in data.columns:
        series = data[name]
        nullable = bool(series.isna().any())
        column = str(name)
        if column in categorical or not _is_numeric(series):
            plan.append(ColumnPlan(column, "categorical", _sorted_categories(series)))
        elif column in bounds:
            lo, hi = bounds[column]
            plan.append(ColumnPlan(column, "binned", (), lo, hi, bins, "public", nullable))
        elif preprocessor_epsilon > 0:
            plan.append(ColumnPlan(column, "binned", (), None, None, bins, "dp", nullable))
        elif _is_integer_valued(series):
            plan.append(ColumnPlan(column, "categorical", _sorted_categories(series)))
        elif allow_non_private:
            finite = series.dropna().to_numpy(dtype=float)
            lo = float(finite.min()) if finite.size else 0.0
            hi = float(finite.max()) if finite.size else 1.0
            hi = hi if hi > lo else lo + 1.0
            plan.append(ColumnPlan(column, "binned", (), lo, hi, bins, "data", nullable))
        else:
            refused.append(column)
    if refused:
        raise DomainError(
            f"column(s) {', '.join(refused)} are continuous and have no public bounds: give "
            "them with --bounds COL=LOW:HIGH, declare them categorical, or give the "
            "preprocessor some epsilon to infer bounds privately (reading bounds off the data "
            "is not private and needs --allow-non-private)"
        )
    return plan


def make_transformer(plan: Sequence[ColumnPlan]) -> Any:
    """A smartnoise-synth TableTransformer ("cube" style) that encodes exactly as the plan says."""
    from snsynth.transform.bin import BinTransformer  # type: ignore[import-untyped,unused-ignore]
    from snsynth.transform.label import (  # type: ignore[import-untyped,unused-ignore]
        LabelTransformer,
    )
    from snsynth.transform.table import (  # type: ignore[import-untyped,unused-ignore]
        TableTransformer,
    )

    transformers: list[Any] = []
    for column in plan:
        if column.kind == "categorical":
            transformers.append(LabelTransformer(nullable=None in column.categories))
        else:
            transformers.append(
                BinTransformer(
                    bins=column.bins,
                    lower=column.lower,
                    upper=column.upper,
                    nullable=column.nullable,
                )
            )
    return TableTransformer(transformers)


def finalize_plan(plan: Sequence[ColumnPlan], transformer: Any) -> list[ColumnPlan]:
    """Read privately inferred bounds back from a fitted transformer into the plan.

    A degenerate inferred range (upper <= lower) is widened to one unit: post-processing.
    """
    out: list[ColumnPlan] = []
    for column, fitted in zip(plan, transformer.transformers, strict=True):
        if column.kind == "binned" and column.bounds_source == "dp":
            lo, hi = float(fitted.fit_lower), float(fitted.fit_upper)
            if not hi > lo:
                hi = lo + 1.0
                fitted.fit_upper = hi
            out.append(replace(column, lower=lo, upper=hi))
        else:
            out.append(column)
    return out


def encode(data: pd.DataFrame, plan: Sequence[ColumnPlan]) -> Codes:
    """Each row as one code per column, the way the synthesizer saw it."""
    codes = np.empty((len(data), len(plan)), dtype=np.int64)
    for j, column in enumerate(plan):
        series = data[column.name]
        if column.kind == "categorical":
            index = {value: i for i, value in enumerate(column.categories)}
            try:
                codes[:, j] = [
                    index[None if _is_missing(v) else _plain(v)] for v in series.to_numpy()
                ]
            except KeyError as missing:
                raise DomainError(
                    f"column {column.name}: value {missing} is not in its domain"
                ) from None
        else:
            assert column.lower is not None
            assert column.upper is not None
            values = series.to_numpy(dtype=float)
            clipped = np.clip(values, column.lower, column.upper)
            scaled = column.bins * (clipped - column.lower) / (column.upper - column.lower)
            binned = np.minimum(column.bins - 1, np.floor(np.nan_to_num(scaled)))
            codes[:, j] = np.where(np.isnan(values), column.bins, binned).astype(np.int64)
    return codes


def decode(codes: Codes, plan: Sequence[ColumnPlan]) -> pd.DataFrame:
    """Codes back to values: the category, or the bin's midpoint (NaN for the null code)."""
    import pandas as pd

    columns: dict[str, Any] = {}
    for j, column in enumerate(plan):
        col = codes[:, j]
        if column.kind == "categorical":
            columns[column.name] = [column.categories[c] for c in col]
        else:
            assert column.lower is not None
            assert column.upper is not None
            width = (column.upper - column.lower) / column.bins
            mid = column.lower + (np.minimum(col, column.bins - 1) + 0.5) * width
            columns[column.name] = np.where(col >= column.bins, np.nan, mid)
    return pd.DataFrame(columns)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))
