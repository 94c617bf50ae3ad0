"""The discrete domain a synthesizer works on: one plan per column, and its encoding.

MST and AIM model discrete data only, so every column becomes a small set of codes. Every
domain is public — nothing about it is read off the data for free:

- **categorical**: one code per value: the values declared in the spec (`values`), plus, with
  `discover: true`, those a DP mechanism found (`veil.synthesis.dp.discover_values`);
- **binned** (numeric): `bins` equal-width bins between a lower and an upper bound, values
  clipped into them; the synthetic value is the bin's midpoint. The bounds are declared
  (`public`), or inferred privately with the preprocessor ε (`dp`);
- **nullable** is declared: a nullable column has one more code, for missing values.

A value outside its column's domain (an unknown category, a missing or non-numeric value)
becomes the null code when the column is nullable; otherwise its row is dropped. Both are
decided per record, so adding or removing one record changes the encoded rows by at most
that record (a stable transformation), and how many rows were dropped is never reported.

Which columns the source has is schema (its header), public: a source column that the spec
does not declare is refused before any row is read (`check_header`).
"""

from __future__ import annotations

import contextlib
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from veil.api.synthetic_dataset import DEFAULT_BINS, Column

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]

ColumnKind = Literal["categorical", "binned"]
DomainSource = Literal["public", "dp"]
Codes = npt.NDArray[np.int64]

COLUMNS_FIELD = "spec.synthesizer.columns"


class DomainError(ValueError):
    """The data cannot be put on a discrete domain under the requested privacy rules."""


@dataclass(frozen=True)
class ColumnPlan:
    name: str
    kind: ColumnKind
    categories: tuple[Any, ...] = ()  # categorical: the values, in code order
    lower: float | None = None
    upper: float | None = None
    bins: int = 0
    nullable: bool = False
    source: DomainSource = "public"  # dp: values discovered or bounds inferred privately

    @property
    def null_code(self) -> int:
        return len(self.categories) if self.kind == "categorical" else self.bins

    @property
    def span(self) -> tuple[float, float]:
        """A binned column's (lower, upper)."""
        if self.lower is None or self.upper is None:
            raise DomainError(f"column {self.name} has no bounds")
        return self.lower, self.upper

    @property
    def cardinality(self) -> int:
        return self.null_code + (1 if self.nullable else 0)

    def describe(self) -> dict[str, Any]:
        """Public facts, or outputs of paid mechanisms (discovered values, private bounds)."""
        out: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "nullable": self.nullable,
            "domain": self.source,
            "cardinality": self.cardinality,
        }
        if self.kind == "binned":
            out["bounds"] = [self.lower, self.upper]
            out["bins"] = self.bins
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


def _number(text: str) -> int | float | None:
    with contextlib.suppress(ValueError):
        return int(text)
    with contextlib.suppress(ValueError):
        return float(text)
    return None


def canonical(value: Any) -> str | int | float:
    """A category as plain Python: integral numbers as int, other numbers as float, text that
    reads as a number as that number (as a CSV reader would read it)."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        number = _number(value)
        return value if number is None else canonical(number)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        number = float(value)
        return int(number) if number.is_integer() else number
    return str(value)


def value_key(value: Any) -> str:
    """The key a category is matched by: data `3`, `3.0` and `"3"` all match a declared "3"."""
    plain = canonical(value)
    return repr(plain) if isinstance(plain, float) else str(plain)


def from_key(key: str) -> str | int | float:
    """A category's key back to a value, decided by the key's text alone (never by how the
    source stores it): integers and decimals as numbers, anything else as text. `value_key`
    of the result is the key again."""
    with contextlib.suppress(ValueError):
        if str(int(key)) == key:
            return int(key)
    with contextlib.suppress(ValueError):
        if repr(float(key)) == key:
            return float(key)
    return key


def check_header(header: Sequence[str], columns: Sequence[Column]) -> None:
    """Refuse a source whose columns are not exactly the declared ones (header only)."""
    declared = {c.name for c in columns}
    present = [str(name) for name in header]
    undeclared = [name for name in present if name not in declared]
    if undeclared:
        raise DomainError(
            f"source column(s) {', '.join(undeclared)} are not declared: every column needs "
            f"its public domain in {COLUMNS_FIELD} (CLI: --columns) — categorical values, "
            "numeric bounds, nullable — or must be removed from the source"
        )
    missing = sorted(declared - set(present))
    if missing:
        raise DomainError(
            f"column(s) {', '.join(missing)} of {COLUMNS_FIELD} are not in the source"
        )
    if len(set(present)) != len(present):
        raise DomainError("the source has duplicate column names")


def _categories(column: Column, discovered: Sequence[Any]) -> tuple[Any, ...]:
    """Declared values (in their order), then discovered ones; one per key."""
    seen: set[str] = set()
    out: list[Any] = []
    for value in [*(column.values or []), *discovered]:
        key = value_key(value)
        if key not in seen:
            seen.add(key)
            out.append(from_key(key))
    return tuple(out)


def build_plan(
    columns: Sequence[Column],
    *,
    bins: int = DEFAULT_BINS,
    discovered: Mapping[str, Sequence[Any]] | None = None,
    inferred: Mapping[str, tuple[float, float]] | None = None,
) -> list[ColumnPlan]:
    """Each column's encoding, from its declaration and the outputs of the DP mechanisms."""
    discovered = discovered or {}
    inferred = inferred or {}
    plan: list[ColumnPlan] = []
    for column in columns:
        if column.type == "categorical":
            categories = _categories(column, discovered.get(column.name, ()))
            if not categories and not column.nullable:
                raise DomainError(
                    f"column {column.name}: no value was declared or discovered, and it is not "
                    "nullable: declare values, or give discovery more budget"
                )
            source: DomainSource = "dp" if column.discover else "public"
            plan.append(
                ColumnPlan(
                    column.name, "categorical", categories, None, None, 0, column.nullable, source
                )
            )
            continue
        if column.lower is not None and column.upper is not None:
            lower, upper, source = column.lower, column.upper, "public"
        elif column.name in inferred:
            (lower, upper), source = inferred[column.name], "dp"
        else:
            raise DomainError(f"column {column.name}: no bounds declared or inferred")
        plan.append(
            ColumnPlan(
                column.name,
                "binned",
                (),
                float(lower),
                float(upper),
                column.bins or bins,
                column.nullable,
                source,
            )
        )
    return plan


def numeric_values(series: pd.Series) -> npt.NDArray[np.float64]:
    """A column as floats: missing and non-numeric values as NaN."""
    import pandas as pd

    return np.asarray(pd.to_numeric(series, errors="coerce"), dtype=np.float64)


def category_keys(series: pd.Series) -> list[str | None]:
    """A column as category keys (None for missing values)."""
    missing = series.isna().to_numpy()
    values = series.to_numpy(dtype=object)
    return [None if gone else value_key(v) for v, gone in zip(values, missing, strict=True)]


def _encode_column(series: pd.Series, column: ColumnPlan) -> tuple[Codes, npt.NDArray[np.bool_]]:
    """Codes of one column, and where its value is outside the domain (missing included)."""
    if column.kind == "categorical":
        index = {value_key(v): i for i, v in enumerate(column.categories)}
        found = [index.get(k, -1) if k is not None else -1 for k in category_keys(series)]
        codes = np.asarray(found, dtype=np.int64)
        return codes, codes < 0
    lower, upper = column.span
    values = numeric_values(series)
    outside = np.isnan(values)
    clipped = np.clip(np.nan_to_num(values, nan=lower), lower, upper)
    scaled = column.bins * (clipped - lower) / (upper - lower)
    return np.minimum(column.bins - 1, np.floor(scaled)).astype(np.int64), outside


def encode(data: pd.DataFrame, plan: Sequence[ColumnPlan]) -> Codes:
    """The rows as codes, one per column; out-of-domain values as null, or their row dropped."""
    codes = np.empty((len(data), len(plan)), dtype=np.int64)
    keep = np.ones(len(data), dtype=bool)
    for j, column in enumerate(plan):
        col, outside = _encode_column(data[column.name], column)
        if column.nullable:
            col[outside] = column.null_code
        else:
            keep &= ~outside
        codes[:, j] = col
    return codes[keep]


def _categorical_series(codes: Codes, column: ColumnPlan) -> pd.Series:
    """Decoded values with a dtype that follows from the plan alone, never from the data."""
    import pandas as pd

    values = [column.categories[c] if c < column.null_code else None for c in codes]
    kinds = {type(v) for v in column.categories}
    if kinds == {int}:
        return pd.Series(values, dtype="Int64" if column.nullable else "int64")
    if kinds <= {int, float}:
        return pd.Series(values, dtype="float64")
    return pd.Series(values, dtype="object")


def decode(codes: Codes, plan: Sequence[ColumnPlan]) -> pd.DataFrame:
    """Codes back to values: the category, or the bin's midpoint (null for the null code)."""
    import pandas as pd

    columns: dict[str, Any] = {}
    for j, column in enumerate(plan):
        col = codes[:, j]
        if column.kind == "categorical":
            columns[column.name] = _categorical_series(col, column)
        else:
            lower, upper = column.span
            width = (upper - lower) / column.bins
            mid = lower + (np.minimum(col, column.bins - 1) + 0.5) * width
            columns[column.name] = np.where(col >= column.bins, np.nan, mid)
    return pd.DataFrame(columns)
