"""`veil train`: fit a diffprivlib model at ε, export it to ONNX, check it, seal it, write it.

**Bounds.** Every DP learner needs the range of its inputs, and reading it off the data leaks
it (diffprivlib then only warns). Here each feature's [low, high] must be given — `--bounds`,
a bounds file (JSON `{"column": [low, high]}`, by path or URI), or a default span for every
feature — and only the explicit `--bounds-from-data` reads the min and max of the training
rows instead, which the result then records (`bounds.source: "data"`, `private: false`).
Features are clipped to their bounds and scaled onto [-0.5, 0.5]; logistic regression's
`data_norm` is then √d / 2 and naive Bayes' and the forest's bounds are [-0.5, 0.5], all
independent of the data. The exported ONNX model clips and scales the same way.

**Classes.** The label set is read from the training rows unless `--classes` gives it (the
label set is schema; reading it from the data is recorded in the notes).

**What is spent.** diffprivlib's logistic regression, Gaussian naive Bayes and random forest
are pure ε-DP (δ = 0) on the training rows (add/remove one row; the forest trains each tree on
a disjoint share, so ε holds for the whole forest). The claim records one
`{"type": "epsilonDelta", "epsilon": ε, "delta": 0.0, "count": 1}`; a diffprivlib
`BudgetAccountant` capped at that ε checks the models spend no more. A δ in the request is
accepted and unused.

**Not private:** the accuracy figures, computed on held-out test rows (which the model never
saw and the DP guarantee does not cover) — an operator diagnostic. diffprivlib draws noise
from numpy's generator, not a cryptographic one (`--seed` makes runs reproducible for tests).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from veil.privacy.mechanisms import EpsilonDeltaMechanism
from veil.synthesis import tables
from veil.training import export

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]

    from veil.runtime.keywrap import KeyWrapper

FAMILIES: tuple[str, ...] = ("logisticRegression", "gaussianNB", "randomForest")
PROBABILITY_TOLERANCE = 1e-4


class TrainingError(Exception):
    """The run failed; nothing was written."""


class TrainingRefusedError(TrainingError):
    """The request is not allowed as given (no bounds, bad parameters, non-numeric features)."""


@dataclass
class TrainingConfig:
    dataset_uri: str
    target_column: str
    family: str
    epsilon: float
    output_uri: str
    delta: float = 0.0
    dataset_format: str | None = None
    features: Sequence[str] | None = None
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    default_bounds: tuple[float, float] | None = None
    bounds_from_data: bool = False
    classes: Sequence[str] | None = None
    test_fraction: float = 0.2
    seed: int | None = None
    max_iter: int = 100
    n_estimators: int = 10
    max_depth: int = 5
    result_uri: str | None = None


def claim_mechanisms(epsilon: float) -> list[dict[str, Any]]:
    """What a training run spends, in the privacy ledger's wire format: pure ε."""
    if not epsilon > 0:
        raise ValueError("epsilon must be positive")
    return [
        EpsilonDeltaMechanism(epsilon=epsilon, delta=0.0).model_dump(mode="json", by_alias=True)
    ]


def load_bounds_file(location: str) -> dict[str, tuple[float, float]]:
    """`{"column": [low, high], ...}` from a path or URI."""
    from veil.artifacts import ArtifactError, read_bytes

    try:
        document = json.loads(read_bytes(tables.as_uri(location)))
    except (ArtifactError, ValueError) as bad:
        raise TrainingRefusedError(f"cannot read bounds from {location}: {bad}") from bad
    if not isinstance(document, dict):
        raise TrainingRefusedError(f"{location} must hold an object of column: [low, high]")
    bounds: dict[str, tuple[float, float]] = {}
    for name, span in document.items():
        if (
            not isinstance(span, list | tuple)
            or len(span) != 2
            or not all(isinstance(v, int | float) and math.isfinite(v) for v in span)
            or not span[1] > span[0]
        ):
            raise TrainingRefusedError(f"{location}: bounds of {name!r} must be [low, high]")
        bounds[str(name)] = (float(span[0]), float(span[1]))
    return bounds


def _check(config: TrainingConfig) -> None:
    if config.family not in FAMILIES:
        raise TrainingRefusedError(f"unknown family {config.family!r}: use {', '.join(FAMILIES)}")
    if not config.epsilon > 0 or not math.isfinite(config.epsilon):
        raise TrainingRefusedError("epsilon must be a positive number")
    if not 0 <= config.delta < 1:
        raise TrainingRefusedError("delta must be in [0, 1)")
    if not 0 < config.test_fraction < 1:
        raise TrainingRefusedError("test fraction must be in (0, 1)")


def _feature_bounds(
    config: TrainingConfig,
    features: Sequence[str],
    columns: Sequence[str],
    train_x: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], str]:
    unknown = sorted(set(config.bounds) - {str(c) for c in columns})
    if unknown:
        raise TrainingRefusedError(f"bounds given for unknown column(s): {', '.join(unknown)}")
    if config.bounds_from_data:
        lower = train_x.min(axis=0)
        upper = train_x.max(axis=0)
        upper = np.where(upper > lower, upper, lower + 1.0)
        return lower, upper, "data"
    lower = np.empty(len(features))
    upper = np.empty(len(features))
    missing: list[str] = []
    for j, name in enumerate(features):
        span = config.bounds.get(name, config.default_bounds)
        if span is None:
            missing.append(name)
            continue
        lower[j], upper[j] = span
    if missing:
        raise TrainingRefusedError(
            f"no public bounds for feature(s) {', '.join(missing)}: give --bounds COL=LOW:HIGH, "
            "--bounds-file or --default-bounds (reading them off the data is not private and "
            "needs --bounds-from-data)"
        )
    return lower, upper, "public"


def _make_model(config: TrainingConfig, n_features: int, classes: Any, accountant: Any) -> Any:
    from diffprivlib.models import (  # type: ignore[import-untyped,unused-ignore]
        GaussianNB,
        LogisticRegression,
        RandomForestClassifier,
    )

    low, high = export.FEATURE_RANGE
    bounds = (np.full(n_features, low), np.full(n_features, high))
    if config.family == "logisticRegression":
        return LogisticRegression(
            epsilon=config.epsilon,
            data_norm=math.sqrt(n_features) * max(abs(low), abs(high)),
            max_iter=config.max_iter,
            random_state=config.seed,
            accountant=accountant,
        )
    if config.family == "gaussianNB":
        return GaussianNB(
            epsilon=config.epsilon, bounds=bounds, random_state=config.seed, accountant=accountant
        )
    return RandomForestClassifier(
        n_estimators=config.n_estimators,
        epsilon=config.epsilon,
        bounds=bounds,
        classes=classes,
        max_depth=config.max_depth,
        random_state=config.seed,
        accountant=accountant,
    )


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _prepare(
    config: TrainingConfig, data: pd.DataFrame, notes: list[str]
) -> tuple[list[str], npt.NDArray[np.float64], npt.NDArray[Any], int]:
    import pandas as pd

    if config.target_column not in data.columns:
        raise TrainingRefusedError(f"no target column {config.target_column!r} in the dataset")
    features = [str(c) for c in (config.features or data.columns) if c != config.target_column]
    absent = [c for c in features if c not in data.columns]
    if absent:
        raise TrainingRefusedError(f"no such feature column(s): {', '.join(absent)}")
    if not features:
        raise TrainingRefusedError("no feature columns")
    non_numeric = [
        c
        for c in features
        if not pd.api.types.is_numeric_dtype(data[c]) or pd.api.types.is_bool_dtype(data[c])
    ]
    if non_numeric:
        raise TrainingRefusedError(
            f"feature(s) {', '.join(non_numeric)} are not numeric: encode them before training"
        )
    frame = data[[*features, config.target_column]]
    complete = frame.dropna()
    dropped = len(frame) - len(complete)
    if dropped:
        notes.append(f"{dropped} row(s) with missing values were dropped")
    x = complete[features].to_numpy(dtype=np.float64)
    y = complete[config.target_column].to_numpy()
    return features, x, y, dropped


def _split(
    x: npt.NDArray[np.float64], y: npt.NDArray[Any], fraction: float, seed: int | None
) -> tuple[Any, Any, Any, Any]:
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = max(1, round(len(x) * fraction))
    if len(x) - n_test < 2:
        raise TrainingRefusedError(f"{len(x)} usable rows are too few to train and test")
    test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


def _classes(
    config: TrainingConfig, y: npt.NDArray[Any], train_y: npt.NDArray[Any], notes: list[str]
) -> npt.NDArray[Any]:
    if config.classes is not None:
        classes = np.array(sorted({_label(c, y) for c in config.classes}))
        unknown = sorted(_plain(v) for v in set(np.unique(y)) - set(classes))
        if unknown:
            raise TrainingRefusedError(f"labels {unknown} are not in the given classes")
    else:
        classes = np.unique(train_y)
        notes.append("the class labels were read off the training rows")
    if len(classes) < 2:
        raise TrainingRefusedError("the target needs at least two classes")
    return classes


def _fit(
    config: TrainingConfig,
    classes: npt.NDArray[Any],
    train_x: npt.NDArray[np.float64],
    train_y: npt.NDArray[Any],
) -> tuple[Any, float, float]:
    """Fit at ε; returns the model and what diffprivlib's accountant says it spent."""
    from diffprivlib.accountant import BudgetAccountant  # type: ignore[import-untyped,unused-ignore]
    from diffprivlib.utils import PrivacyLeakWarning  # type: ignore[import-untyped,unused-ignore]

    accountant = BudgetAccountant(epsilon=config.epsilon, delta=0.0)
    model = _make_model(config, train_x.shape[1], classes, accountant)
    with warnings.catch_warnings():
        # Bounds, data_norm and classes are all given: any PrivacyLeakWarning is a bug here.
        warnings.simplefilter("error", PrivacyLeakWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # scipy options diffprivlib passes
        try:
            model.fit(train_x, train_y)
        except PrivacyLeakWarning as leak:
            raise TrainingError(f"diffprivlib reported a privacy leak: {leak}") from leak
    spent_epsilon, spent_delta = (float(v) for v in accountant.total())
    if spent_epsilon > config.epsilon * (1 + 1e-12) or spent_delta > 0:
        raise TrainingError(
            f"the model spent (ε {spent_epsilon}, δ {spent_delta}), above the claimed pure ε"
        )
    return model, spent_epsilon, spent_delta


def _verified_onnx(
    model: Any,
    family: str,
    bounds: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]],
    test_x: npt.NDArray[np.float64],
    scaled_test: npt.NDArray[np.float64],
) -> tuple[bytes, float, float]:
    """The ONNX export, refused unless it predicts the test rows like the trained model."""
    onnx_bytes = export.export_onnx(model, family, *bounds)
    onnx_labels, onnx_proba = export.onnx_predict(onnx_bytes, test_x)
    agreement = float(np.mean(np.asarray(onnx_labels) == model.predict(scaled_test)))
    proba_diff = float(np.max(np.abs(np.asarray(onnx_proba) - model.predict_proba(scaled_test))))
    if agreement < 1.0 or proba_diff > PROBABILITY_TOLERANCE:
        raise TrainingError(
            f"the ONNX export does not predict like the trained model (label agreement "
            f"{agreement:.4f}, largest probability difference {proba_diff:.2e}): not written"
        )
    return onnx_bytes, agreement, proba_diff


def train(config: TrainingConfig, wrapper: KeyWrapper) -> dict[str, Any]:
    """Train, export, verify, seal and write; returns the result (see the module docstring)."""
    from veil.runtime.sealing import read_header, seal_bytes

    _check(config)
    started = time.monotonic()
    seconds: dict[str, float] = {}
    notes: list[str] = []
    fmt = config.dataset_format or tables.infer_format(config.dataset_uri, "csv")
    data = tables.read_table(config.dataset_uri, fmt)
    features, x, y, dropped = _prepare(config, data, notes)
    train_x, train_y, test_x, test_y = _split(x, y, config.test_fraction, config.seed)

    lower, upper, bounds_source = _feature_bounds(config, features, list(data.columns), train_x)
    if bounds_source == "data":
        notes.append("feature bounds were read off the training rows: NOT private")
    classes = _classes(config, y, train_y, notes)
    if config.delta > 0:
        notes.append("delta is not used: the diffprivlib models are pure epsilon-DP")

    scaler = export.bounds_scaler(lower, upper)
    fit_start = time.monotonic()
    model, spent_epsilon, spent_delta = _fit(config, classes, scaler.transform(train_x), train_y)
    seconds["fit"] = round(time.monotonic() - fit_start, 3)

    scaled_test = scaler.transform(test_x)
    accuracy = float(np.mean(model.predict(scaled_test) == test_y))
    _, counts = np.unique(test_y, return_counts=True)
    constant = float(counts.max() / counts.sum())

    export_start = time.monotonic()
    onnx_bytes, agreement, proba_diff = _verified_onnx(
        model, config.family, (lower, upper), test_x, scaled_test
    )
    seconds["export"] = round(time.monotonic() - export_start, 3)

    sealed = seal_bytes(onnx_bytes, wrapper)
    header, _ = read_header(io.BytesIO(sealed))
    sealed_digest = tables.write_bytes(tables.as_uri(config.output_uri), sealed)
    seconds["total"] = round(time.monotonic() - started, 3)

    result: dict[str, Any] = {
        "family": config.family,
        "epsilon": config.epsilon,
        "delta": config.delta,
        "private": bounds_source != "data",
        "mechanisms": claim_mechanisms(config.epsilon),
        "privacySpent": {"epsilon": spent_epsilon, "delta": spent_delta},
        "accuracy": round(accuracy, 6),
        "constantBaselineAccuracy": round(constant, 6),
        "rows": {"train": len(train_x), "test": len(test_x), "dropped": dropped},
        "target": config.target_column,
        "features": features,
        "classes": [_plain(c) for c in classes],
        "bounds": {
            "source": bounds_source,
            "lower": [float(v) for v in lower],
            "upper": [float(v) for v in upper],
        },
        "onnx": {
            "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
            "bytes": len(onnx_bytes),
            "opset": export.TARGET_OPSET,
            "input": "input",
            "labelAgreement": agreement,
            "maxProbabilityDiff": proba_diff,
        },
        "sealed": {
            "uri": config.output_uri,
            "sha256": sealed_digest,
            "bytes": len(sealed),
            "keyId": header.key_id,
            "keyThumbprint": header.key_thumbprint,
        },
        "notes": notes,
        "seconds": seconds,
        "versions": {
            "diffprivlib": _version("diffprivlib"),
            "scikitLearn": _version("scikit-learn"),
            "skl2onnx": _version("skl2onnx"),
        },
    }
    if config.result_uri:
        tables.write_bytes(
            config.result_uri, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode()
        )
    return result


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _label(text: str, y: npt.NDArray[Any]) -> Any:
    """A class given on the command line, typed like the target column's values."""
    if np.issubdtype(y.dtype, np.integer):
        return int(text)
    if np.issubdtype(y.dtype, np.floating):
        return float(text)
    return text
