"""Benchmark: DP synthesis (MST, AIM) cost and fidelity, and DP training accuracy.

    .venv/bin/python -m bench.synth [--quick]

Synthesis, on the RAND Health Insurance Experiment (statsmodels' `randhie`: 20,190 people x
10 columns), at ε 0.5, 1 and 4 (δ 1e-6), each fit sampling as many rows as it was fitted on:

- Veil: `veil.synthesis.synthesize.synthesize`, what the Job runs, on a CSV in a temporary
  directory, every column declared with its public domain. Its seconds are the whole call
  (reading, encoding, fit, sampling with its two library-bug workarounds, writing): a run no
  longer reports stage timings, which grow with the row count and are not published.
- direct: smartnoise-synth on the same table, `Synthesizer.create(method, epsilon, delta)`,
  `fit(table, transformer=..., preprocessor_eps=0)` with a TableTransformer of the same label
  and bin encoders (same public bounds, same bins), then `sample(rows)`; fit + sample seconds.
  Veil's two sampling workarounds (`_sample_codes` in its synthesize.py) are not applied:
  the library's default randomized rounding, which correlates columns that the model keeps
  independent, is what costs the direct runs most of their fidelity; MST's decoding in mbi's
  column order can decode a column with another's decoder, which would show as values
  outside a column's domain (`direct_invalid_row_share`, each scored as one extra cell).
  smartnoise's own MST also hands mbi the exact row count; Veil's gives it a total estimated
  from the noisy measurements.
- fidelity: the mean 2-way TVD over every pair of columns, from `veil.synthesis.quality`, on
  the declared discrete domain, computed here exactly — on public data. A Veil run publishes
  no exact figure: its report holds DP estimates only, when paid for.
- private domains and report (`private_domains_and_report`, MST at each ε): the same total ε,
  with parts carved out of it for (a) a DP report (10%: Gaussian 1-way marginals) and (b) that
  report plus every categorical column's values discovered (10%, δ 1e-7: thresholded Laplace
  histograms) and the bounds of `mdvis` and `disea` inferred (5%: Laplace histograms) instead
  of declared. Each gives the ε spent on those parts, the exact mean 2-way TVD before (all
  declared, the synthesizer has all of ε) and after, the report's own DP estimate of the mean
  1-way TVD next to the exact one, and how many values discovery found per column.
- non-private baseline: MST through Veil's path at ε = 10^4 (ρ ≈ 9,300: the noise on each
  count has σ ≈ 0.013 and the tree selection is all but deterministic), on this public data
  only. That is MST's model error without noise; AIM may beat it. smartnoise-synth cannot
  derive ρ at ε = 10^5 or above.

Public bounds and categories come from the variables' definitions, not from the rows: doctor
visits capped at 20 (larger counts clipped), chronic diseases below 60, `lpi` below ln(3000),
`fmde` below ln(1000 / 0.25) (deductible at most $1,000, coinsurance at least 25%), `physlm` an
index in [0, 1]; coinsurance level (ln(1 + 0, 25, 50, 95 or 100 %)), plan type and the three
health dummies categorical (0/1).

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
train/test split: each row held out by a keyed hash, ~20%), accuracy of the sealed model on the
held-out rows (measured here, on public data; a run itself releases only a noisy estimate),
median over `--seeds` seeds.

DP-SGD (`bench/dpsgd.py`, which says how each figure is made): rows for the MLP on
breast cancer and the MLP and CNN on digits at ε 0.5, 1 and 4 (δ 1e-5), three seeds, each
against the same network trained without privacy; and `dpsgd_speed`, samples per second of
Veil's trainer in each of Opacus's per-sample-gradient modes, without privacy, and of plain
Opacus and plain PyTorch, at the issue's anchor shapes (`dpsgd_vs_nonprivate_ratio`,
`veil_vs_opacus_ratio`).

`--quick` (smoke, ~1.5 min): 2,000 rows x 3 columns, ε 1, MST only (declared, then private
domains and report), logistic regression, two seeds, no warm-up; the DP-SGD MLP on breast
cancer at ε 1, one seed, and a short speed run (MLP only; hooks and ghost).
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
from veil.training.train import (
    DPSGD_FAMILIES,
    FAMILIES,
    Prepared,
    TrainingConfig,
    prepare,
    train,
)

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
# The declared domains: from what the variables are, not from the rows (module docstring).
DOMAINS: dict[str, dict[str, Any]] = {
    "mdvis": {"type": "numeric", "lower": 0.0, "upper": 20.0},
    "lncoins": {
        "type": "categorical",
        "values": [0.0, 3.258096, 3.931826, 4.564348, 4.61512],  # ln(1 + 0, 25, 50, 95, 100 %)
    },
    "idp": {"type": "categorical", "values": [0, 1]},
    "lpi": {"type": "numeric", "lower": 0.0, "upper": 8.0},
    "fmde": {"type": "numeric", "lower": 0.0, "upper": 9.0},
    "physlm": {"type": "numeric", "lower": 0.0, "upper": 1.0},
    "disea": {"type": "numeric", "lower": 0.0, "upper": 60.0},
    "hlthg": {"type": "categorical", "values": [0, 1]},
    "hlthf": {"type": "categorical", "values": [0, 1]},
    "hlthp": {"type": "categorical", "values": [0, 1]},
}
# The private-domains variant: these bounds are inferred (preprocessor), every categorical
# column's values discovered; shares of the run's total ε.
PRIVATE_BOUNDS = ("mdvis", "disea")
REPORT_SHARE = 0.1
DISCOVERY_SHARE = 0.1
PREPROCESSOR_SHARE = 0.05
DISCOVERY_DELTA = 1e-7
# Breast cancer: the published min/max of each feature (the DESCR table), as in the unit tests.
TRAINING_BOUNDS = {
    "mean_radius": (6.981, 28.11),
    "mean_concave_points": (0.0, 0.201),
    "worst_radius": (7.93, 36.04),
    "worst_concave_points": (0.0, 0.291),
    "worst_texture": (12.02, 49.54),
}
# The diffprivlib families; the DP-SGD ones (mlp, cnn) have rows of their own (bench.dpsgd).
DIFFPRIVLIB_FAMILIES = tuple(f for f in FAMILIES if f not in DPSGD_FAMILIES)


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
    private_methods: tuple[str, ...] = ("mst",)  # also run with private domains and report
    dpsgd_epsilons: tuple[float, ...] = EPSILONS
    dpsgd_seeds: int = 3
    speed_repeats: int = 2
    quick: bool = False


FULL = Settings(
    rows=None,
    aim_rows=None,
    columns=COLUMNS,
    epsilons=EPSILONS,
    methods=("mst", "aim"),
    aim_rounds=20,
    max_model_size=80.0,
    families=DIFFPRIVLIB_FAMILIES,
    training_epsilons=EPSILONS,
    seeds=5,
    warm_up=True,
    seed=1,
)
QUICK = replace(
    FULL,
    rows=2000,  # discovery at ε 0.05 per column needs a few hundred records per value
    columns=QUICK_COLUMNS,
    epsilons=(1.0,),
    methods=("mst",),
    families=("logisticRegression",),
    training_epsilons=(1.0,),
    seeds=2,
    warm_up=False,
    dpsgd_epsilons=(1.0,),
    dpsgd_seeds=1,
    speed_repeats=1,
    quick=True,
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


def declared(names: Sequence[str]) -> list[dict[str, Any]]:
    """The declared (public) domains of these columns, in the spec's wire format."""
    return [{"name": name, **DOMAINS[name]} for name in names]


def privately_found(names: Sequence[str]) -> list[dict[str, Any]]:
    """The same columns with the domains that can be found privately left undeclared: the
    categorical ones discovered, the numeric ones in PRIVATE_BOUNDS inferred."""
    return [_privately(column) for column in declared(names)]


def _privately(column: dict[str, Any]) -> dict[str, Any]:
    if column["type"] == "categorical":
        # Nullable: a value too rare to be discovered becomes null rather than dropping a row.
        return {"name": column["name"], "type": "categorical", "discover": True, "nullable": True}
    if column["name"] in PRIVATE_BOUNDS:
        return {"name": column["name"], "type": "numeric", "bins": BINS}
    return column


def _columns(wire: Sequence[dict[str, Any]]) -> list[Any]:
    from pydantic import TypeAdapter

    from veil.api.synthetic_dataset import Column

    return TypeAdapter(list[Column]).validate_python(list(wire))


def plan_for(names: Sequence[str]) -> list[domain.ColumnPlan]:
    """The declared plan: public domains only, nothing read off the rows."""
    return domain.build_plan(_columns(declared(names)), bins=BINS)


def _scoring_plan(plan: Sequence[domain.ColumnPlan]) -> list[domain.ColumnPlan]:
    """The plan with one extra cell per column for values outside its domain (as null).

    The source puts no mass there, so a row decoded outside the domain counts fully as error;
    output that stays in the domain scores exactly as on the plan itself.
    """
    return [replace(column, nullable=True) for column in plan]


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
            known = {domain.value_key(v) for v in column.categories}
            keys = domain.category_keys(values)
            inside = np.array([k in known for k in keys], dtype=bool)
            out[column.name] = values.astype(object).where(inside, None)
        else:
            numeric = pd.to_numeric(values, errors="coerce")
            inside = numeric.notna().to_numpy()
            out[column.name] = numeric
        invalid |= ~inside
    return out, float(invalid.mean()) if len(frame) else 0.0


def exact_figures(
    source: pd.DataFrame, synthetic: pd.DataFrame, plan: Sequence[domain.ColumnPlan]
) -> dict[str, float]:
    """Mean 1-way and 2-way TVD on the declared plan (exact: public data only) and the share
    of synthetic rows outside the domain."""
    scoring = _scoring_plan(plan)
    cleaned, invalid = _to_domain(synthetic, plan)
    figures = quality.marginal_figures(
        domain.encode(source, scoring), domain.encode(cleaned, scoring), scoring
    )
    return {
        "one_way": float(figures["oneWayTvd"]["mean"]),
        "two_way": float(figures["twoWayTvd"]["mean"]),
        "invalid": invalid,
    }


@dataclass(frozen=True)
class Variant:
    """What a Veil run is asked to do besides synthesizing: shares of its total ε."""

    name: str
    columns: str = "declared"  # or "private": domains found with DP
    report_share: float = 0.0
    discovery_share: float = 0.0
    preprocessor_share: float = 0.0


DECLARED = Variant("declared")
VARIANTS = (
    DECLARED,
    Variant("declared+report", report_share=REPORT_SHARE),
    Variant(
        "private_domains+report",
        columns="private",
        report_share=REPORT_SHARE,
        discovery_share=DISCOVERY_SHARE,
        preprocessor_share=PREPROCESSOR_SHARE,
    ),
)


def _config(
    source: Path, method: str, epsilon: float, rows: int, variant: Variant, **run: Any
) -> SynthesisConfig:
    import pandas as pd

    names = list(pd.read_csv(source, nrows=0).columns)
    wire = privately_found(names) if variant.columns == "private" else declared(names)
    discovers = any(c.get("discover") for c in wire)
    infers = any(c["type"] == "numeric" and "lower" not in c for c in wire)
    return SynthesisConfig(
        source_uri=str(source),
        output_uri=str(source.with_name(f"{source.stem}-{method}-synthetic.csv")),
        method=method,
        rows=rows,
        epsilon=epsilon,
        delta=DELTA,
        columns=_columns(wire),
        bins=BINS,
        report_epsilon=variant.report_share * epsilon,
        discovery_epsilon=variant.discovery_share * epsilon if discovers else 0.0,
        discovery_delta=DISCOVERY_DELTA if discovers else 0.0,
        preprocessor_epsilon=variant.preprocessor_share * epsilon if infers else 0.0,
        **run,
    )


def run_veil(
    source: Path,
    method: str,
    epsilon: float,
    rows: int,
    *,
    settings: Settings,
    seed: int,
    variant: Variant = DECLARED,
) -> dict[str, Any]:
    """One run of Veil's synthesis path: its seconds, exact TVDs of its output (public data)
    and what its report says."""
    import pandas as pd

    config = _config(
        source,
        method,
        epsilon,
        rows,
        variant,
        seed=seed,
        max_model_size=settings.max_model_size,
        rounds=settings.aim_rounds,
    )
    _cold(seed)
    started = time.monotonic()
    report = synthesize(config)
    seconds = time.monotonic() - started
    table = pd.read_csv(source)
    synthetic = pd.read_csv(config.output_uri)
    return {
        "seconds": seconds,
        **exact_figures(table, synthetic, plan_for(list(table.columns))),
        "report": report,
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
            LabelTransformer(nullable=column.nullable)
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
    return {"seconds": seconds, **exact_figures(table, sample, plan)}


def _private_entry(
    method: str, epsilon: float, before: dict[str, Any], runs: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    """What private domains and a private report cost, against the declared run."""
    entry: dict[str, Any] = {
        "method": method,
        "epsilon": epsilon,
        "mean_2way_tvd_declared": round(before["two_way"], 4),
    }
    for name, run in runs.items():
        budget = run["report"]["budget"]
        estimate = run["report"]["quality"] or {}
        found = {  # the values found; the null code is not one
            c["name"]: c["cardinality"] - int(c["nullable"])
            for c in run["report"]["columns"]
            if c["domain"] == "dp" and c["kind"] == "categorical"
        }
        entry[name] = {
            "report_epsilon": round(budget["reportEpsilon"], 6),
            "discovery_epsilon": round(budget["discoveryEpsilon"], 6),
            "discovery_delta": budget["discoveryDelta"],
            "preprocessor_epsilon": round(budget["preprocessorEpsilon"], 6),
            "synthesizer_epsilon": round(budget["synthesizerEpsilon"], 6),
            "mean_2way_tvd": round(run["two_way"], 4),
            "mean_1way_tvd": round(run["one_way"], 4),
            "dp_report_mean_1way_tvd": (estimate.get("oneWayTvd") or {}).get("mean"),
            "values_discovered": found,
            "invalid_row_share": round(run["invalid"], 4),
        }
    return entry


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
    plan = plan_for(list(full.columns))
    if settings.warm_up:
        _log("warm-up: MST through Veil on 500 rows (untimed)")
        warm, rows = scratch / "warm-up.csv", min(500, len(full))
        full.sample(rows, random_state=0).to_csv(warm, index=False)
        run_veil(warm, "mst", 1.0, rows, settings=settings, seed=settings.seed)

    entries: list[dict[str, Any]] = []
    private: list[dict[str, Any]] = []
    runs = [(m, e) for m in settings.methods for e in settings.epsilons]
    for index, (method, epsilon) in enumerate(runs):
        table, path = source_for(method)
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
                    table, plan, method, epsilon, settings=settings, seed=seed
                )
        veil, direct = figures["veil"], figures["direct"]
        entry: dict[str, Any] = {
            "method": method,
            "epsilon": epsilon,
            "rows": len(table),
            "seconds": round(veil["seconds"], 2),
            "mean_2way_tvd": round(veil["two_way"], 4),
            "direct_seconds": round(direct["seconds"], 2),
            "direct_mean_2way_tvd": round(direct["two_way"], 4),
            "overhead_ratio": round(veil["seconds"] / direct["seconds"], 3),
            "direct_invalid_row_share": round(direct["invalid"], 4),
        }
        if method == "aim":
            entry["rounds"] = settings.aim_rounds or 16 * len(plan)
            entry["max_model_size_mb"] = settings.max_model_size
        entries.append(entry)
        _log(json.dumps(entry))
        if method in settings.private_methods:
            variants = {}
            for variant in VARIANTS[1:]:
                _log(f"{method} ε {epsilon:g}: {variant.name}")
                variants[variant.name] = run_veil(
                    path,
                    method,
                    epsilon,
                    len(table),
                    settings=settings,
                    seed=seed,
                    variant=variant,
                )
            private.append(_private_entry(method, epsilon, veil, variants))
            _log(json.dumps(private[-1]))

    _log(f"non-private baseline: MST through Veil at ε {NONPRIVATE_EPSILON:g}")
    baseline = run_veil(
        full_path,
        "mst",
        NONPRIVATE_EPSILON,
        len(full),
        settings=settings,
        seed=settings.seed + len(runs),
    )
    rng = np.random.default_rng(settings.seed)
    codes = domain.encode(full, plan)
    uniform = quality.marginal_figures(codes, quality.uniform_codes(plan, len(codes), rng), plan)
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
        "private_domains_and_report": private,
        "private_domains_and_report_setup": (
            f"same total ε; report {REPORT_SHARE:.0%} of it (Gaussian 1-way marginals), "
            f"discovery {DISCOVERY_SHARE:.0%} (δ {DISCOVERY_DELTA:g}: every categorical column "
            f"discovered instead of declared), preprocessor {PREPROCESSOR_SHARE:.0%} (bounds of "
            f"{', '.join(c for c in PRIVATE_BOUNDS if c in full.columns) or 'no column'} "
            "inferred instead of declared); TVDs exact, on the declared domains (a value that "
            "was not discovered counts as an error there); the report's own DP estimate is on "
            "the run's domain, so it does not see such values"
        ),
        "nonprivate_baseline": (
            f"MST through Veil's synthesis path at epsilon {NONPRIVATE_EPSILON:g} (rho ~9,300: "
            "count noise sigma ~0.013, selection all but deterministic) on public data: MST's "
            "model error without meaningful noise"
        ),
        "nonprivate_mean_2way_tvd": round(baseline["two_way"], 4),
        "nonprivate_seconds": round(baseline["seconds"], 2),
        "uniform_mean_2way_tvd": round(float(uniform["twoWayTvd"]["mean"]), 4),
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


def nonprivate_accuracy(config: TrainingConfig, prepared: Prepared) -> float:
    """Held-out accuracy without DP on `train`'s own split (the same keyed hash and seed),
    clipping and scaling."""
    model = _sklearn_model(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(prepared.features(~prepared.test), prepared.labels(~prepared.test))
    predicted = model.predict(prepared.features(prepared.test))
    return float(np.mean(predicted == prepared.labels(prepared.test)))


def sealed_accuracy(config: TrainingConfig, prepared: Prepared, key: Any) -> float:
    """Held-out accuracy of the sealed ONNX model `train` wrote (public data: the benchmark
    may measure what a run only releases as a noisy estimate)."""
    from veil.runtime.sealing import unseal_file
    from veil.training import export

    onnx_bytes = unseal_file(Path(config.output_uri), key)
    labels, _ = export.onnx_predict(onnx_bytes, prepared.rows.x[prepared.test])
    return float(np.mean(np.asarray(labels) == prepared.labels(prepared.test)))


def _sealing_key() -> tuple[KeyWrapper, Any]:
    from cryptography.hazmat.primitives.asymmetric import rsa

    from veil.runtime.keywrap import RsaPublicKeyWrapper

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return RsaPublicKeyWrapper(key.public_key()), key


def training_figures(settings: Settings, scratch: Path) -> dict[str, Any]:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    frame = frame[[*TRAINING_BOUNDS, "target"]]
    data = scratch / "breast-cancer.csv"
    frame.to_csv(data, index=False)
    wrapper, key = _sealing_key()
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
            # A paid evaluation gives the run its held-out rows; its estimate is not used here.
            evaluation_epsilon=1.0,
            seed=seed,
        )

    entries: list[dict[str, Any]] = []
    for family in settings.families:
        # The split depends on the seed alone (its hash key), not on the family or ε.
        prepared = {s: prepare(config(family, 1.0, s)) for s in seeds}
        baseline = [nonprivate_accuracy(config(family, 1.0, s), prepared[s]) for s in seeds]
        constant = [
            float(np.max(np.unique(p.labels(p.test), return_counts=True)[1]) / p.test.sum())
            for p in prepared.values()
        ]
        for epsilon in settings.training_epsilons:
            _log(f"training {family} at ε {epsilon:g}, {settings.seeds} seeds")
            accuracies = []
            for s in seeds:
                train(config(family, epsilon, s), wrapper)
                accuracies.append(sealed_accuracy(config(family, epsilon, s), prepared[s], key))
            entries.append(
                {
                    "model": family,
                    "epsilon": epsilon,
                    "accuracy": round(statistics.median(accuracies), 4),
                    "nonprivate_accuracy": round(statistics.median(baseline), 4),
                    "accuracy_range": [round(min(accuracies), 4), round(max(accuracies), 4)],
                    "constant_accuracy": round(statistics.median(constant), 4),
                    "seeds": settings.seeds,
                }
            )
            _log(json.dumps(entries[-1]))
    from bench import dpsgd

    entries += dpsgd.training_rows(
        scratch,
        cancer_frame=frame,
        cancer_bounds=TRAINING_BOUNDS,
        epsilons=settings.dpsgd_epsilons,
        seeds=settings.dpsgd_seeds,
        quick=settings.quick,
        wrapper=wrapper,
        key=key,
    )
    speed = dpsgd.speed_figures(quick=settings.quick, repeats=settings.speed_repeats)
    return {
        "training_dataset": (
            f"scikit-learn breast cancer (Wisconsin diagnostic): {len(frame)} rows, features "
            f"{', '.join(TRAINING_BOUNDS)}, ~20% held out by a keyed hash; DP-SGD rows also on "
            "scikit-learn digits (1,797 8x8 images, 10 classes; `dataset` names each row's)"
        ),
        "training": entries,
        "dpsgd_speed": speed,
        "dpsgd_vs_nonprivate_ratio": speed["dpsgd_vs_nonprivate_ratio"],
    }


# --- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 rows, ε 1, MST, one model")
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
        p: _version(p)
        for p in (
            "smartnoise-synth",
            "mbi",
            "jax",
            "diffprivlib",
            "scikit-learn",
            "torch",
            "opacus",
        )
    }
    result["benchmark_seconds"] = round(time.monotonic() - started, 1)
    return publish(result, None if args.no_write else args.output)


if __name__ == "__main__":
    main()
