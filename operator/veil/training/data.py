"""The rows a training run reads: the public schema first, then per-record functions only.

The privacy unit is one record, added or removed. So:

- the header (column names; for Parquet also the column types) is checked against the spec
  before any row is read, and every refusal is decided there;
- after that, everything that touches rows is a function of one row alone: a feature value
  that is not a finite number, or a label that is not one of the declared classes, drops its
  row (never an error, which would name a value or reveal that it exists);
- a row's side of the train/test split and its tree in a forest come from a keyed hash of
  the row's own content (blake2b, keyed by a per-run random salt), never from its position,
  so adding a record never moves another one.
"""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from veil.training.errors import TrainingError, TrainingRefusedError

LabelKind = Literal["int", "float", "str"]
SALT_BYTES = 16
_ROW_PERSON = b"veil-train-row"


@dataclass(frozen=True)
class Schema:
    """What the table's header says: column names, and for Parquet their Arrow types."""

    columns: tuple[str, ...]
    types: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ClassSet:
    """The declared label set, typed, sorted; rows are matched to it one by one."""

    kind: LabelKind
    labels: tuple[Any, ...]

    def _key(self, value: Any) -> Any:
        if self.kind == "str":
            return value if isinstance(value, str) else None
        return number(value)

    def index(self, values: npt.NDArray[Any]) -> npt.NDArray[np.int64]:
        """Each value's position among the classes, -1 where it is none of them."""
        lookup = {self._key(label): i for i, label in enumerate(self.labels)}
        return np.fromiter(
            (lookup.get(self._key(v), -1) for v in values), dtype=np.int64, count=len(values)
        )

    def array(self) -> npt.NDArray[Any]:
        return np.array(self.labels)


@dataclass(frozen=True)
class ColumnPlan:
    """What will be read and how, all decided from the spec and the header."""

    features: tuple[str, ...]
    target: str
    lower: npt.NDArray[np.float64]
    upper: npt.NDArray[np.float64]
    classes: ClassSet

    @property
    def columns(self) -> list[str]:
        return [*self.features, self.target]


@dataclass(frozen=True)
class Rows:
    """The usable rows: features (n × d), class indices, and each row's keyed digest."""

    x: npt.NDArray[np.float64]
    y: npt.NDArray[np.int64]
    digests: tuple[bytes, ...]


def number(value: Any) -> float:
    """A finite float from one cell, or NaN: booleans and non-numbers are not numbers."""
    if isinstance(value, bool | np.bool_):
        return math.nan
    if isinstance(value, str):
        try:
            parsed = float(value)
        except ValueError:
            return math.nan
    elif isinstance(value, int | float | np.integer | np.floating | Decimal):
        parsed = float(value)
    else:
        return math.nan
    return parsed if math.isfinite(parsed) else math.nan


def read_schema(local: Path, fmt: str) -> Schema:
    """The header alone: CSV's first line (pandas, nrows=0), or Parquet's schema."""
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]

    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq  # type: ignore[import-untyped,unused-ignore]

            schema = pq.read_schema(local)
            return Schema(tuple(schema.names), {n: schema.field(n).type for n in schema.names})
        return Schema(tuple(str(c) for c in pd.read_csv(local, nrows=0).columns))
    except (ValueError, OSError, UnicodeError, ImportError):
        # The parser's own message could quote the file: say only what failed.
        raise TrainingError(f"the table's header could not be read as {fmt}") from None


def read_columns(local: Path, fmt: str, columns: Sequence[str]) -> dict[str, npt.NDArray[Any]]:
    """The planned columns, cell by cell: CSV as raw strings (no type inferred from the data;
    a malformed line is skipped), Parquet as its schema types them."""
    import pandas as pd

    try:
        if fmt == "parquet":
            frame = pd.read_parquet(local, columns=list(columns), engine="pyarrow")
        else:
            frame = pd.read_csv(
                local,
                usecols=list(columns),
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                on_bad_lines="skip",
            )
    except (ValueError, OSError, UnicodeError):
        raise TrainingError(f"the table's rows could not be read as {fmt}") from None
    return {c: frame[c].to_numpy(dtype=object) for c in columns}


def numbers(values: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
    return np.fromiter((number(v) for v in values), dtype=np.float64, count=len(values))


def usable_rows(raw: Mapping[str, npt.NDArray[Any]], plan: ColumnPlan, salt: bytes) -> Rows:
    """Rows whose features are all finite numbers and whose label is a declared class."""
    n = len(raw[plan.target])
    columns = [numbers(raw[f]) for f in plan.features]
    x = np.column_stack(columns) if n else np.empty((0, len(plan.features)))
    y = plan.classes.index(raw[plan.target])
    keep = np.isfinite(x).all(axis=1) & (y >= 0)
    x, y = np.ascontiguousarray(x[keep]), y[keep]
    return Rows(x, y, record_digests(x, y, salt))


# --- the plan: refusals decided on the header alone -------------------------------------


def _is_numeric_type(arrow_type: Any) -> bool:
    import pyarrow as pa  # type: ignore[import-untyped,unused-ignore]

    return bool(
        pa.types.is_integer(arrow_type)
        or pa.types.is_floating(arrow_type)
        or pa.types.is_decimal(arrow_type)
    )


def _is_string_type(arrow_type: Any) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(arrow_type):
        arrow_type = arrow_type.value_type
    return bool(pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type))


def _as_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        value = number(text)
        return int(value) if math.isfinite(value) and value.is_integer() else None


def _label_kind(target: str, schema: Schema, declared: Sequence[str]) -> LabelKind:
    """Parquet: the target column's type. CSV (untyped): numbers if every class is one."""
    all_int = all(_as_int(c) is not None for c in declared)
    all_numbers = all(math.isfinite(number(c)) for c in declared)
    if schema.types is None:
        return "int" if all_int else "float" if all_numbers else "str"
    import pyarrow as pa

    arrow_type = schema.types[target]
    if _is_string_type(arrow_type):
        return "str"
    if pa.types.is_integer(arrow_type) and all_int:
        return "int"
    if _is_numeric_type(arrow_type) and all_numbers:
        return "float"
    raise TrainingRefusedError(
        f"target column {target!r} is of type {arrow_type} and the declared classes are not "
        "all values of that type: fix spec.training.classes (--classes)"
    )


def class_set(target: str, schema: Schema, declared: Sequence[str]) -> ClassSet:
    """The declared classes, typed like the target column, refused if fewer than two or if
    two of them are the same value."""
    kind = _label_kind(target, schema, declared)
    labels: list[Any] = [
        _as_int(c) if kind == "int" else number(c) if kind == "float" else c for c in declared
    ]
    if len(set(labels)) != len(labels):
        raise TrainingRefusedError("two of the declared classes are the same value")
    if len(labels) < 2:
        raise TrainingRefusedError("declare at least two classes (spec.training.classes)")
    return ClassSet(kind, tuple(sorted(labels)))


def _features(target: str, schema: Schema, requested: Sequence[str] | None) -> tuple[str, ...]:
    if target not in schema.columns:
        raise TrainingRefusedError(f"no target column {target!r} in the dataset's header")
    features = tuple(requested or (c for c in schema.columns if c != target))
    absent = [c for c in features if c not in schema.columns]
    if absent:
        raise TrainingRefusedError(f"no such feature column(s) in the header: {', '.join(absent)}")
    if target in features:
        raise TrainingRefusedError(f"the target {target!r} cannot also be a feature")
    if not features:
        raise TrainingRefusedError("no feature columns")
    if schema.types is not None:
        typed = [c for c in features if not _is_numeric_type(schema.types[c])]
        if typed:
            raise TrainingRefusedError(
                f"feature(s) {', '.join(typed)} are not numeric in the Parquet schema: "
                "encode them before training"
            )
    return features


def _bounds(
    features: Sequence[str],
    columns: Sequence[str],
    bounds: Mapping[str, tuple[float, float]],
    default: tuple[float, float] | None,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    unknown = sorted(set(bounds) - set(columns))
    if unknown:
        raise TrainingRefusedError(f"bounds given for unknown column(s): {', '.join(unknown)}")
    missing = [f for f in features if bounds.get(f, default) is None]
    if missing:
        raise TrainingRefusedError(
            f"no public bounds for feature(s) {', '.join(missing)}: give them in "
            "spec.training.bounds (--bounds COL=LOW:HIGH, --bounds-file or --default-bounds); "
            "they are never read off the data"
        )
    spans = [bounds.get(f, default) for f in features]
    lower = np.array([s[0] for s in spans if s is not None], dtype=np.float64)
    upper = np.array([s[1] for s in spans if s is not None], dtype=np.float64)
    if not (np.isfinite(lower).all() and np.isfinite(upper).all() and (upper > lower).all()):
        raise TrainingRefusedError("every feature's bounds must be finite, with lower < upper")
    return lower, upper


def plan_columns(
    schema: Schema,
    target: str,
    *,
    features: Sequence[str] | None,
    bounds: Mapping[str, tuple[float, float]],
    default_bounds: tuple[float, float] | None,
    classes: Sequence[str],
) -> ColumnPlan:
    """Check the spec against the header; every refusal of a run happens here."""
    chosen = _features(target, schema, features)
    lower, upper = _bounds(chosen, schema.columns, bounds, default_bounds)
    return ColumnPlan(chosen, target, lower, upper, class_set(target, schema, classes))


# --- per-record sampling ----------------------------------------------------------------


def run_salt(seed: int | None) -> bytes:
    """The hash key of a run: random, unless a seed fixes it (tests)."""
    if seed is None:
        return secrets.token_bytes(SALT_BYTES)
    return hashlib.blake2b(
        str(seed).encode(), digest_size=SALT_BYTES, person=b"veil-train-salt"
    ).digest()


def record_digest(features: npt.NDArray[np.float64], label: int, salt: bytes) -> bytes:
    """A keyed hash of one record's canonical content: its float64 features and its class."""
    content = np.ascontiguousarray(features, dtype="<f8").tobytes() + label.to_bytes(8, "little")
    return hashlib.blake2b(content, key=salt, digest_size=16, person=_ROW_PERSON).digest()


def record_digests(
    x: npt.NDArray[np.float64], y: npt.NDArray[np.int64], salt: bytes
) -> tuple[bytes, ...]:
    return tuple(record_digest(row, int(label), salt) for row, label in zip(x, y, strict=True))


def in_test(digests: Sequence[bytes], fraction: float) -> npt.NDArray[np.bool_]:
    """Whether each row is held out: its digest's first 64 bits, as a uniform in [0, 1),
    fall below `fraction`. Each row's side depends on that row alone."""
    cut = int(fraction * 2**64)
    return np.fromiter(
        (int.from_bytes(d[:8], "big") < cut for d in digests), dtype=np.bool_, count=len(digests)
    )


def tree_of(digests: Sequence[bytes], n_trees: int) -> npt.NDArray[np.int64]:
    """Each row's tree in a forest: its digest's last 64 bits modulo the number of trees."""
    return np.fromiter(
        (int.from_bytes(d[8:], "big") % n_trees for d in digests),
        dtype=np.int64,
        count=len(digests),
    )
