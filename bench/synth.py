"""Benchmark: DP synthesis (MST, AIM) cost and fidelity, and DP training accuracy.

    .venv/bin/python -m bench.synth [--quick]

Synthesis, on the RAND Health Insurance Experiment (statsmodels' `randhie`: 20,190 people x
10 columns), at ε 0.5, 1 and 4 (δ 1e-6), each fit sampling as many rows as it was fitted on:

- Veil: `veil.synthesis.synthesize.synthesize`, what the Job runs, on a CSV in a temporary
  directory, with no held-out share (so it fits on the same rows as the others). Its seconds
  are its own `fit` + `sample` stages: encoder, synthesizer fit, privacy checks, sampling with
  its two library-bug workarounds, dtypes; not reading, writing or the quality report.
- direct: smartnoise-synth on the same table, `Synthesizer.create(method, epsilon, delta)`,
  `fit(table, transformer=..., preprocessor_eps=0)` with a TableTransformer of the same label
  and bin encoders (same public bounds, same bins), then `sample(rows)`; fit + sample seconds.
  Veil's two sampling workarounds (`_sample_private` in its synthesize.py) are not applied:
  the library's default randomized rounding, which correlates columns that the model keeps
  independent, is what costs the direct runs most of their fidelity; MST's decoding in mbi's
  column order can decode a column with another's decoder, which would show as values
  outside a column's domain (`direct_invalid_row_share`, each scored as one extra cell).
- fidelity: the mean 2-way TVD over every pair of columns, from `veil.synthesis.quality`, on
  Veil's discrete domain (Veil's own report figure for Veil's runs).
- non-private baseline: MST through Veil's path at ε = 10^4 (ρ ≈ 9,300: the noise on each
  count has σ ≈ 0.013 and the tree selection is all but deterministic). That is MST's model
  error without noise; AIM may beat it. smartnoise-synth cannot derive ρ at ε = 10^5 or above.

Public bounds and categories come from the variables' definitions, not from the rows: doctor
visits capped at 20 (larger counts clipped), chronic diseases below 60, `lpi` below ln(3000),
`fmde` below ln(1000 / 0.25) (deductible at most $1,000, coinsurance at least 25%), `physlm` an
index in [0, 1]; coinsurance level, plan type and the three health dummies categorical.

AIM runs `--aim-rounds` rounds (default 20; Veil's default of 16 x columns = 160 takes 15-20
minutes per fit at ε 4 on this machine) at Veil's default model size limit; the direct AIM gets
the same settings.

Every timed fit starts cold, as in the Job's fresh process: JAX's in-memory compilation caches
are cleared first (else whichever side ran first would compile the shapes that the other then
reuses: with the same seed both fit the same cliques) and the persistent cache
(VEIL_JAX_CACHE_DIR) is switched off for the run. One small untimed fit first pays the one-off
backend setup; Veil and direct alternate who goes first. Seconds are wall-clock, one fit each,
on whatever else the machine is doing: `overhead_ratio_total` (every Veil second over every
direct second) is steadier than any one entry's `overhead_ratio`, and a ratio near 1 means
"no measurable overhead", not more.

Training, on scikit-learn's breast-cancer set (569 rows; the five features of the unit tests,
bounds from the set's published min/max table): `veil.training.train.train` (what the Job runs,
ONNX export and sealing included) for each diffprivlib family at ε 0.5, 1 and 4, against the
same scikit-learn estimator without DP (same hyperparameters, same clipping and scaling, same
train/test split), accuracy on the held-out 20%, median over `--seeds` seeds.

`--quick` (smoke, ~30 s): 300 rows x 3 columns, ε 1, MST only, logistic regression, two
seeds, no warm-up.
Prints and writes bench/results/synth.json (`--output` elsewhere, `--no-write` not at all).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bench.report import publish
from veil.synthesis import domain, quality
from veil.synthesis.synthesize import SynthesisConfig, synthesize
from veil.training.train import FAMILIES, TrainingConfig, train

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]

    from veil.runtime.keywrap import KeyWrapper

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"

DELTA = 1e-6
BINS = 10
EPSILONS = (0.5, 1.0, 4.0)
NONPRIVATE_EPSILON = 1e4
COLUMNS = ("mdvis", "lncoins", "idp", "lpi", "fmde", "physlm", "disea", "hlthg", "hlthf", "hlthp")
QUICK_COLUMNS = ("mdvis", "lncoins", "idp")
CATEGORICAL = ("lncoins", "idp", "hlthg", "hlthf", "hlthp")
BOUNDS = {
    "mdvis": (0.0, 20.0),
    "lpi": (0.0, 8.0),
    "fmde": (0.0, 9.0),
    "physlm": (0.0, 1.0),
    "disea": (0.0, 60.0),
}
# Breast cancer: the published min/max of each feature (the DESCR table), as in the unit tests.
TRAINING_BOUNDS = {
    "mean_radius": (6.981, 28.11),
    "mean_concave_points": (0.0, 0.201),
    "worst_radius": (7.93, 36.04),
    "worst_concave_points": (0.0, 0.291),
    "worst_texture": (12.02, 49.54),
}


@dataclass(frozen=True)
class Settings:
    rows: int | None  # None: every row
    aim_rows: int | None
    columns: tuple[str, ...]
    epsilons: tuple[float, ...]
    methods: tuple[str, ...]
    aim_rounds: int | None  # None: Veil's default (16 x columns)
    max_model_size: float
    families: tuple[str, ...]
    training_epsilons: tuple[float, ...]
    seeds: int
    warm_up: bool
    seed: int


FULL = Settings(
    rows=None,
    aim_rows=None,
    columns=COLUMNS,
    epsilons=EPSILONS,
    methods=("mst", "aim"),
    aim_rounds=20,
    max_model_size=80.0,
    families=FAMILIES,
    training_epsilons=EPSILONS,
    seeds=5,
    warm_up=True,
    seed=1,
)
QUICK = replace(
    FULL,
    rows=300,
    columns=QUICK_COLUMNS,
    epsilons=(1.0,),
    methods=("mst",),
    families=("logisticRegression",),
    training_epsilons=(1.0,),
    seeds=2,
    warm_up=False,
)


def _log(message: str) -> None:
    print(f"[bench.synth] {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """smartnoise prints progress to stdout: keep stdout for the result."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
        yield


def _cold(seed: int) -> None:
    """Before a timed fit: no compiled program left from earlier fits, numpy's global
    generator (which smartnoise-synth and mbi draw from) seeded."""
    import jax

    clear: Any = jax.clear_caches
    clear()
    np.random.seed(seed)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- synthesis -------------------------------------------------------------------------------


def load_randhie(columns: Sequence[str], rows: int | None, seed: int) -> pd.DataFrame:
    from statsmodels.datasets import randhie  # type: ignore[import-untyped,unused-ignore]

    data = randhie.load_pandas().data[list(columns)]
    if rows is not None and rows < len(data):
        data = data.sample(rows, random_state=seed)
    return data.reset_index(drop=True)


def _scoring_plan(plan: Sequence[domain.ColumnPlan]) -> list[domain.ColumnPlan]:
    """The plan with one extra cell per column for values outside its domain (None/NaN).

    The source puts no mass there, so a row decoded outside the domain counts fully as error;
    output that stays in the domain scores exactly as on the plan itself.
    """
    out = []
    for column in plan:
        if column.kind == "categorical" and None not in column.categories:
            out.append(replace(column, categories=(*column.categories, None)))
        elif column.kind == "binned":
            out.append(replace(column, nullable=True))
        else:
            out.append(column)
    return out


def _to_domain(
    frame: pd.DataFrame, plan: Sequence[domain.ColumnPlan]
) -> tuple[pd.DataFrame, float]:
    """Values outside each column's domain as missing; returns the share of rows with any."""
    import pandas as pd

    out = pd.DataFrame(index=frame.index)
    invalid = np.zeros(len(frame), dtype=bool)
    for column in plan:
        values = frame[column.name]
        if column.kind == "categorical":
            known = set(column.categories)
            inside = np.array([v in known for v in values.astype(object)], dtype=bool)
            out[column.name] = values.astype(object).where(inside, None)
        else:
            numeric = pd.to_numeric(values, errors="coerce")
            inside = numeric.notna().to_numpy()
            out[column.name] = numeric
        invalid |= ~inside
    return out, float(invalid.mean()) if len(frame) else 0.0


def mean_two_way_tvd(
    source: pd.DataFrame, synthetic: pd.DataFrame, plan: Sequence[domain.ColumnPlan]
) -> tuple[float, float]:
    """Mean 2-way TVD (Veil's quality.py) and the share of rows outside the domain."""
    scoring = _scoring_plan(plan)
    cleaned, invalid = _to_domain(synthetic, plan)
    figures = quality.marginal_figures(
        domain.encode(source, scoring), domain.encode(cleaned, scoring), scoring
    )
    return float(figures["twoWayTvd"]["mean"]), invalid


def _encoding(columns: Sequence[str]) -> tuple[list[str], dict[str, tuple[float, float]]]:
    """The public encoding choices that apply to these columns: categorical ones, bounds."""
    categorical = [c for c in CATEGORICAL if c in columns]
    return categorical, {c: b for c, b in BOUNDS.items() if c in columns}


def plan_for(table: pd.DataFrame) -> list[domain.ColumnPlan]:
    categorical, bounds = _encoding(list(table.columns))
    return domain.build_plan(table, categorical=categorical, bounds=bounds, bins=BINS)


def run_veil(
    source: Path, method: str, epsilon: float, rows: int, *, settings: Settings, seed: int
) -> dict[str, Any]:
    """One run of Veil's synthesis path: its fit + sample seconds, its own 2-way TVD."""
    import pandas as pd

    categorical, bounds = _encoding(list(pd.read_csv(source, nrows=0).columns))
    config = SynthesisConfig(
        source_uri=str(source),
        output_uri=str(source.with_name(f"{source.stem}-{method}-synthetic.csv")),
        method=method,
        rows=rows,
        epsilon=epsilon,
        delta=DELTA,
        categorical_columns=categorical,
        bounds=bounds,
        bins=BINS,
        holdout_fraction=0.0,
        seed=seed,
        max_model_size=settings.max_model_size,
        rounds=settings.aim_rounds,
    )
    _cold(seed)
    report = synthesize(config)
    seconds = report["seconds"]
    return {
        "seconds": float(seconds["fit"]) + float(seconds["sample"]),
        "mean_2way_tvd": float(report["quality"]["twoWayTvd"]["mean"]),
        "uniform_mean_2way_tvd": float(report["quality"]["uniformBaseline"]["twoWayTvdMean"]),
    }


def run_direct(
    table: pd.DataFrame,
    plan: Sequence[domain.ColumnPlan],
    method: str,
    epsilon: float,
    *,
    settings: Settings,
    seed: int,
) -> dict[str, Any]:
    """smartnoise-synth called directly with the same encoders; fit + sample seconds, TVD."""
    import pandas as pd
    from snsynth import Synthesizer  # type: ignore[import-untyped,unused-ignore]
    from snsynth.transform.bin import BinTransformer  # type: ignore[import-untyped,unused-ignore]
    from snsynth.transform.label import (  # type: ignore[import-untyped,unused-ignore]
        LabelTransformer,
    )
    from snsynth.transform.table import (  # type: ignore[import-untyped,unused-ignore]
        TableTransformer,
    )

    transformer = TableTransformer(
        [
            LabelTransformer(nullable=None in column.categories)
            if column.kind == "categorical"
            else BinTransformer(
                bins=column.bins,
                lower=column.lower,
                upper=column.upper,
                nullable=column.nullable,
            )
            for column in plan
        ]
    )
    options: dict[str, Any] = {}
    if method == "aim":
        options = {"max_model_size": settings.max_model_size, "rounds": settings.aim_rounds}
    _cold(seed)
    with _quiet():
        started = time.monotonic()
        synthesizer = Synthesizer.create(method, epsilon=epsilon, delta=DELTA, **options)
        synthesizer.fit(table, transformer=transformer, preprocessor_eps=0.0)
        sample = synthesizer.sample(len(table))
        seconds = time.monotonic() - started
    if not isinstance(sample, pd.DataFrame):
        sample = pd.DataFrame(list(sample), columns=list(table.columns))
    tvd, invalid = mean_two_way_tvd(table, sample, plan)
    return {"seconds": seconds, "mean_2way_tvd": tvd, "invalid_row_share": invalid}


def synthesis_figures(settings: Settings, scratch: Path) -> dict[str, Any]:
    tables: dict[str, tuple[pd.DataFrame, Path]] = {}

    def source_for(method: str) -> tuple[pd.DataFrame, Path]:
        rows = settings.aim_rows if method == "aim" and settings.aim_rows else settings.rows
        key = str(rows)
        if key not in tables:
            table = load_randhie(settings.columns, rows, settings.seed)
            path = scratch / f"randhie-{len(table)}.csv"
            table.to_csv(path, index=False)
            tables[key] = (table, path)
        return tables[key]

    full, full_path = source_for("mst")
    plan = plan_for(full)
    if settings.warm_up:
        _log("warm-up: MST through Veil on 500 rows (untimed)")
        warm, rows = scratch / "warm-up.csv", min(500, len(full))
        full.sample(rows, random_state=0).to_csv(warm, index=False)
        run_veil(warm, "mst", 1.0, rows, settings=settings, seed=settings.seed)

    entries: list[dict[str, Any]] = []
    runs = [(m, e) for m in settings.methods for e in settings.epsilons]
    for index, (method, epsilon) in enumerate(runs):
        table, path = source_for(method)
        table_plan = plan_for(table)  # what Veil builds from this table itself
        seed = settings.seed + index
        figures: dict[str, dict[str, Any]] = {}
        order = ("veil", "direct") if index % 2 == 0 else ("direct", "veil")
        for side in order:
            _log(f"{method} ε {epsilon:g} on {len(table)} rows: {side}")
            if side == "veil":
                figures[side] = run_veil(
                    path, method, epsilon, len(table), settings=settings, seed=seed
                )
            else:
                figures[side] = run_direct(
                    table, table_plan, method, epsilon, settings=settings, seed=seed
                )
        veil, direct = figures["veil"], figures["direct"]
        entry: dict[str, Any] = {
            "method": method,
            "epsilon": epsilon,
            "rows": len(table),
            "seconds": round(veil["seconds"], 2),
            "mean_2way_tvd": round(veil["mean_2way_tvd"], 4),
            "direct_seconds": round(direct["seconds"], 2),
            "direct_mean_2way_tvd": round(direct["mean_2way_tvd"], 4),
            "overhead_ratio": round(veil["seconds"] / direct["seconds"], 3),
            "direct_invalid_row_share": round(direct["invalid_row_share"], 4),
        }
        if method == "aim":
            entry["rounds"] = settings.aim_rounds or 16 * len(plan)
            entry["max_model_size_mb"] = settings.max_model_size
        entries.append(entry)
        _log(json.dumps(entry))

    _log(f"non-private baseline: MST through Veil at ε {NONPRIVATE_EPSILON:g}")
    baseline = run_veil(
        full_path,
        "mst",
        NONPRIVATE_EPSILON,
        len(full),
        settings=settings,
        seed=settings.seed + len(runs),
    )
    return {
        "dataset": "RAND Health Insurance Experiment (statsmodels.datasets.randhie)",
        "rows": len(full),
        "columns": len(plan),
        "column_plan": [c.describe() for c in plan],
        "delta": DELTA,
        "synth": entries,
        # Less noisy than any one entry's ratio: every Veil second over every direct second.
        "overhead_ratio_total": round(
            sum(e["seconds"] for e in entries) / sum(e["direct_seconds"] for e in entries), 3
        ),
        "nonprivate_baseline": (
            f"MST through Veil's synthesis path at epsilon {NONPRIVATE_EPSILON:g} (rho ~9,300: "
            "count noise sigma ~0.013, selection all but deterministic): MST's model error "
            "without meaningful noise"
        ),
        "nonprivate_mean_2way_tvd": round(baseline["mean_2way_tvd"], 4),
        "nonprivate_seconds": round(baseline["seconds"], 2),
        "uniform_mean_2way_tvd": round(baseline["uniform_mean_2way_tvd"], 4),
    }


# --- training --------------------------------------------------------------------------------


def _sklearn_model(config: TrainingConfig) -> Any:
    """The scikit-learn estimator a diffprivlib family extends, with Veil's hyperparameters."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.naive_bayes import GaussianNB

    if config.family == "logisticRegression":
        return LogisticRegression(max_iter=config.max_iter)
    if config.family == "gaussianNB":
        return GaussianNB()
    return RandomForestClassifier(
        n_estimators=config.n_estimators, max_depth=config.max_depth, random_state=config.seed
    )


def nonprivate_accuracy(config: TrainingConfig, frame: pd.DataFrame) -> tuple[float, int]:
    """Held-out accuracy without DP on `train`'s own split, clipping and scaling."""
    from veil.training import export
    from veil.training.train import _prepare, _split

    features, x, y, _ = _prepare(config, frame, [])
    train_x, train_y, test_x, test_y = _split(x, y, config.test_fraction, config.seed)
    lower = np.array([config.bounds[f][0] for f in features])
    upper = np.array([config.bounds[f][1] for f in features])
    scaler = export.bounds_scaler(lower, upper)
    model = _sklearn_model(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(scaler.transform(train_x), train_y)
    return float(np.mean(model.predict(scaler.transform(test_x)) == test_y)), len(test_y)


def _wrapper() -> KeyWrapper:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from veil.runtime.keywrap import RsaPublicKeyWrapper

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return RsaPublicKeyWrapper(key.public_key())


def training_figures(settings: Settings, scratch: Path) -> dict[str, Any]:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    frame = frame[[*TRAINING_BOUNDS, "target"]]
    data = scratch / "breast-cancer.csv"
    frame.to_csv(data, index=False)
    wrapper = _wrapper()
    seeds = range(1, settings.seeds + 1)

    def config(family: str, epsilon: float, seed: int) -> TrainingConfig:
        return TrainingConfig(
            dataset_uri=str(data),
            target_column="target",
            family=family,
            epsilon=epsilon,
            output_uri=str(scratch / "model.sealed"),
            features=list(TRAINING_BOUNDS),
            bounds=TRAINING_BOUNDS,
            classes=["0", "1"],
            seed=seed,
        )

    entries: list[dict[str, Any]] = []
    for family in settings.families:
        baseline = [nonprivate_accuracy(config(family, 1.0, s), frame) for s in seeds]
        for epsilon in settings.training_epsilons:
            _log(f"training {family} at ε {epsilon:g}, {settings.seeds} seeds")
            results = [train(config(family, epsilon, s), wrapper) for s in seeds]
            if [r["rows"]["test"] for r in results] != [n for _, n in baseline]:
                raise RuntimeError("the non-private split differs from train's")
            accuracies = [float(r["accuracy"]) for r in results]
            entries.append(
                {
                    "model": family,
                    "epsilon": epsilon,
                    "accuracy": round(statistics.median(accuracies), 4),
                    "nonprivate_accuracy": round(statistics.median(a for a, _ in baseline), 4),
                    "accuracy_range": [round(min(accuracies), 4), round(max(accuracies), 4)],
                    "constant_accuracy": round(
                        statistics.median(r["constantBaselineAccuracy"] for r in results), 4
                    ),
                    "seeds": settings.seeds,
                }
            )
            _log(json.dumps(entries[-1]))
    return {
        "training_dataset": (
            f"scikit-learn breast cancer (Wisconsin diagnostic): {len(frame)} rows, features "
            f"{', '.join(TRAINING_BOUNDS)}, 20% held out"
        ),
        "training": entries,
    }


# --- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 rows, ε 1, MST, one model")
    parser.add_argument("--rows", type=int, help="synthesis rows (default: all)")
    parser.add_argument("--aim-rows", type=int, help="AIM's rows (default: as --rows)")
    parser.add_argument("--aim-rounds", type=int, help="AIM rounds (default 20; 0: Veil's)")
    parser.add_argument("--seeds", type=int, help="training seeds (default 5)")
    parser.add_argument("--output", type=Path, default=RESULTS / "synth.json")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    settings = replace(
        base,
        rows=args.rows or base.rows,
        aim_rows=args.aim_rows or base.aim_rows,
        aim_rounds=base.aim_rounds if args.aim_rounds is None else (args.aim_rounds or None),
        seeds=args.seeds or base.seeds,
    )
    os.environ.pop("VEIL_JAX_CACHE_DIR", None)  # see the module docstring: every fit cold
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="veil-bench-synth-") as scratch:
        result = {
            **synthesis_figures(settings, Path(scratch)),
            **training_figures(settings, Path(scratch)),
        }
    result["quick"] = args.quick
    result["versions"] = {
        p: _version(p) for p in ("smartnoise-synth", "mbi", "jax", "diffprivlib", "scikit-learn")
    }
    result["benchmark_seconds"] = round(time.monotonic() - started, 1)
    return publish(result, None if args.no_write else args.output)


if __name__ == "__main__":
    main()
