"""`veil synthesize`: fit a DP synthesizer on a table, sample it, write the output and a report.

The run, in order:

1. refuse a non-private generator unless `allow_non_private` is set — before any data is read;
2. read the source (CSV or Parquet; file://, https:// or az://);
3. plan each column's discrete encoding (`veil.synthesis.domain`);
4. split off a held-out share of the rows (for the DCR check; the synthesizer never sees it);
5. fit the encoder on the source — inferring bounds with the preprocessor ε when a column
   needs them — then the synthesizer, created with ε − ε_pre, on the training rows;
6. check what was spent against the claim (`veil.synthesis.privacy`) and stop without writing
   anything if it is above;
7. sample, write the output, compute the quality report (`veil.synthesis.quality`).

smartnoise-synth prints to stdout; it is redirected to stderr so that stdout carries only the
report. JAX compiles each new shape on first use (most of a small fit's time): set
`VEIL_JAX_CACHE_DIR` to keep compiled programs across runs.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from veil.synthesis import domain, quality, tables
from veil.synthesis.privacy import PRIVATE_METHODS, claim_mechanisms, zcdp_rho
from veil.synthesis.progress import Stages

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]

NON_PRIVATE_METHODS: tuple[str, ...] = ("marginals",)
METHODS: tuple[str, ...] = (*PRIVATE_METHODS, *NON_PRIVATE_METHODS)
MIN_HOLDOUT_ROWS = 10


class SynthesisError(Exception):
    """The run failed; nothing (or nothing further) was written."""


class RefusedError(SynthesisError):
    """The request is not allowed as given (a non-private generator without the flag, a
    column that cannot be encoded privately, inconsistent privacy parameters)."""


@dataclass
class SynthesisConfig:
    source_uri: str
    output_uri: str
    method: str
    rows: int
    epsilon: float | None = None
    delta: float = 1e-6
    source_format: str | None = None  # default: from the source's suffix, else csv
    output_format: str | None = None
    preprocessor_epsilon: float = 0.0
    categorical_columns: Sequence[str] = ()
    bounds: dict[str, tuple[float, float]] = field(default_factory=dict)
    bins: int = domain.DEFAULT_BINS
    allow_non_private: bool = False
    holdout_fraction: float = 0.2
    seed: int | None = None
    max_model_size: float = 80.0
    rounds: int | None = None
    report_uri: str | None = None
    progress: bool = False


def check_request(config: SynthesisConfig) -> None:
    """Refuse what must never run; called before any data is touched."""
    if config.method not in METHODS:
        raise RefusedError(f"unknown method {config.method!r}: use one of {', '.join(METHODS)}")
    if config.method in NON_PRIVATE_METHODS and not config.allow_non_private:
        raise RefusedError(
            f"method {config.method!r} is not differentially private: refused without "
            "--allow-non-private (allowNonPrivate in the spec, which then names no budget)"
        )
    if config.method in PRIVATE_METHODS:
        if config.epsilon is None or not config.epsilon > 0:
            raise RefusedError(f"{config.method} needs epsilon > 0")
        if not 0 < config.delta < 1:
            raise RefusedError("delta must be in (0, 1)")
        if not 0 <= config.preprocessor_epsilon < config.epsilon:
            raise RefusedError(
                "preprocessor epsilon must be >= 0 and smaller than epsilon (it is taken out of it)"
            )
    if config.rows < 1:
        raise RefusedError("rows must be at least 1")
    if not 0 <= config.holdout_fraction < 1:
        raise RefusedError("holdout fraction must be in [0, 1)")
    if tables.as_uri(config.source_uri) == tables.as_uri(config.output_uri):
        raise RefusedError(
            "the output must differ from the source: the source is never overwritten"
        )


@contextlib.contextmanager
def _quiet_library() -> Iterator[None]:
    """smartnoise prints progress to stdout and mbi warns about pandas inputs: keep stdout ours."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.filterwarnings("ignore", category=UserWarning, module=r"mbi(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


def _configure_jax() -> None:
    cache = os.environ.get("VEIL_JAX_CACHE_DIR")
    if not cache:
        return
    import jax

    settings: Any = jax.config
    settings.update("jax_compilation_cache_dir", cache)
    settings.update("jax_persistent_cache_min_compile_time_secs", 0)
    settings.update("jax_persistent_cache_min_entry_size_bytes", -1)


def _split(rows: int, fraction: float, rng: np.random.Generator) -> tuple[Any, Any]:
    order = rng.permutation(rows)
    n_holdout = round(rows * fraction)
    if fraction == 0 or n_holdout < MIN_HOLDOUT_ROWS or rows - n_holdout < MIN_HOLDOUT_ROWS:
        return np.sort(order), np.array([], dtype=np.int64)
    return np.sort(order[n_holdout:]), np.sort(order[:n_holdout])


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _fit_private(
    config: SynthesisConfig,
    plan: list[domain.ColumnPlan],
    source: pd.DataFrame,
    train: pd.DataFrame,
    warnings_out: list[str],
) -> tuple[Any, list[domain.ColumnPlan], float, float]:
    """Fit encoder and synthesizer; returns (synthesizer, final plan, ε_pre spent, ρ spent)."""
    from snsynth import Synthesizer  # type: ignore[import-untyped,unused-ignore]
    from snsynth.utils import cdp_rho  # type: ignore[import-untyped,unused-ignore]

    assert config.epsilon is not None
    transformer = domain.make_transformer(plan)
    needs = bool(transformer.needs_epsilon)
    transformer.fit(source, epsilon=config.preprocessor_epsilon if needs else None)
    steps = list(getattr(transformer.odometer, "steps", []))
    pre_spent = float(sum(eps for eps, _ in steps))
    if any(d != 0 for _, d in steps) or pre_spent > config.preprocessor_epsilon * (1 + 1e-9):
        raise SynthesisError(
            f"the preprocessor spent (ε {pre_spent}, δ {[d for _, d in steps]}), "
            f"above its pure ε {config.preprocessor_epsilon}: refusing to go on"
        )
    if config.preprocessor_epsilon > 0 and not needs:
        warnings_out.append(
            "no column needed bounds: the preprocessor epsilon was claimed but not spent"
        )
    final_plan = domain.finalize_plan(plan, transformer)

    epsilon = config.epsilon - config.preprocessor_epsilon
    options: dict[str, Any] = {}
    if config.method == "aim":
        options = {"max_model_size": config.max_model_size, "rounds": config.rounds}
    synthesizer = Synthesizer.create(config.method, epsilon=epsilon, delta=config.delta, **options)
    synthesizer.fit(train, transformer=transformer)
    if float(synthesizer.epsilon) != epsilon:
        raise SynthesisError("the synthesizer changed its own epsilon: refusing to go on")
    # What the synthesizer ran at: AIM keeps ρ; MST derives it from (ε, δ) the same way.
    spent_rho = float(getattr(synthesizer, "rho", None) or cdp_rho(epsilon, config.delta))
    claimed_rho = zcdp_rho(epsilon, config.delta)
    if spent_rho > claimed_rho:
        raise SynthesisError(
            f"the synthesizer ran at rho {spent_rho}, above the claimed {claimed_rho}: "
            "refusing to release its output"
        )
    return synthesizer, final_plan, pre_spent, spent_rho


def _sample_private(synthesizer: Any, method: str, rows: int) -> pd.DataFrame:
    """What `synthesizer.sample(rows)` does, without two bugs of the pinned versions.

    1. mbi 1.1.0's `synthetic_data` returns its columns in sampling order, not the domain's.
       smartnoise-synth 1.0.8 reorders them for AIM but not for MST, whose `sample` then
       decodes each column with another column's decoder. Here both are reordered by name.
    2. Its default `method="round"` (randomized rounding) assigns values within each group
       of parent values in row order, column after column, which correlates columns that the
       model says are independent (measured: 2-way TVD 0.36 on a pair the model fits to
       0.01). `method="sample"` draws each row i.i.d. from the model, as MST and AIM intend.
    """
    transformer = synthesizer._transformer
    names = ["col" + str(i) for i in range(transformer.output_width)]
    data = synthesizer.synthesizer.synthetic_data(rows=rows, method="sample")
    if method == "mst":
        data = synthesizer.undo_compress_fn(data)
    frame = data.df[names]
    return transformer.inverse_transform([tuple(row) for row in frame.itertuples(index=False)])


def _sample_marginals(
    plan: Sequence[domain.ColumnPlan], train: pd.DataFrame, rows: int, rng: np.random.Generator
) -> pd.DataFrame:
    """The non-private generator: each column drawn independently from its exact 1-way marginal."""
    codes = domain.encode(train, plan)
    columns = []
    for j, column in enumerate(plan):
        counts = np.bincount(codes[:, j], minlength=column.cardinality).astype(float)
        columns.append(rng.choice(column.cardinality, size=rows, p=counts / counts.sum()))
    return domain.decode(np.stack(columns, axis=1).astype(np.int64), plan)


def _restore_dtypes(
    synthetic: pd.DataFrame, source: pd.DataFrame, plan: Sequence[domain.ColumnPlan]
) -> pd.DataFrame:
    import pandas as pd

    out = synthetic[[c.name for c in plan]].copy()
    for column in plan:
        values = out[column.name]
        if column.kind == "binned":
            out[column.name] = pd.to_numeric(values, errors="coerce").astype(float)
        elif None not in column.categories:
            with contextlib.suppress(TypeError, ValueError):
                out[column.name] = values.astype(source[column.name].dtype)
    return out


def synthesize(config: SynthesisConfig) -> dict[str, Any]:
    """Run one synthesis; returns the report (and writes it to `config.report_uri`, if set)."""
    check_request(config)
    private = config.method in PRIVATE_METHODS
    source_format = config.source_format or tables.infer_format(config.source_uri, "csv")
    output_format = config.output_format or tables.infer_format(config.output_uri, source_format)
    rng = np.random.default_rng(config.seed)
    notes: list[str] = []
    stages = Stages(
        ["read", "fit", "sample", "write", "report"],
        show=config.progress,
        title=f"veil synthesize ({config.method})",
    )
    try:
        with stages.stage("read"):
            source = tables.read_table(config.source_uri, source_format)
            if source.empty or len(source.columns) == 0:
                raise RefusedError(f"{config.source_uri} has no rows or no columns")
            try:
                plan = domain.build_plan(
                    source,
                    categorical=config.categorical_columns,
                    bounds=config.bounds,
                    bins=config.bins,
                    preprocessor_epsilon=config.preprocessor_epsilon if private else 0.0,
                    allow_non_private=config.allow_non_private or not private,
                )
            except domain.DomainError as refused:
                raise RefusedError(str(refused)) from refused
            train_idx, holdout_idx = _split(len(source), config.holdout_fraction, rng)
            train = source.iloc[train_idx].reset_index(drop=True)
            holdout = source.iloc[holdout_idx].reset_index(drop=True)

        pre_spent, rho_spent = 0.0, None
        with stages.stage("fit"), _quiet_library():
            if private:
                _configure_jax()
                synthesizer, plan, pre_spent, rho_spent = _fit_private(
                    config, plan, source, train, notes
                )
        with stages.stage("sample"), _quiet_library():
            if private:
                synthetic = _sample_private(synthesizer, config.method, config.rows)
            else:
                synthetic = _sample_marginals(plan, train, config.rows, rng)
            synthetic = _restore_dtypes(synthetic, source, plan)

        with stages.stage("write"):
            payload = tables.table_bytes(synthetic, output_format)
            digest = tables.write_bytes(tables.as_uri(config.output_uri), payload)

        with stages.stage("report"):
            figures = quality.quality_report(
                plan,
                domain.encode(source, plan),
                domain.encode(synthetic, plan),
                train=domain.encode(train, plan) if len(holdout) else None,
                holdout=domain.encode(holdout, plan) if len(holdout) else None,
                seed=None if config.seed is None else config.seed + 1,
            )
    finally:
        stages.close()

    data_bounds = [c.name for c in plan if c.bounds_source == "data"]
    if data_bounds:
        notes.append(
            "bounds of " + ", ".join(data_bounds) + " were read off the data (not private)"
        )
    report: dict[str, Any] = {
        "method": config.method,
        "private": private and not data_bounds,
        "epsilon": config.epsilon if private else None,
        "delta": config.delta if private else None,
        "preprocessorEpsilon": config.preprocessor_epsilon if private else None,
        "preprocessorEpsilonSpent": round(pre_spent, 12) if private else None,
        "rhoSpent": rho_spent,
        "mechanisms": (
            claim_mechanisms(
                config.method,
                config.epsilon or 0.0,
                config.delta,
                config.preprocessor_epsilon,
            )
            if private
            else []
        ),
        "rows": {
            "source": len(source),
            "train": len(train),
            "holdout": len(holdout),
            "synthetic": len(synthetic),
        },
        "columns": {
            "count": len(plan),
            "categorical": [c.name for c in plan if c.kind == "categorical"],
            "binned": [c.name for c in plan if c.kind == "binned"],
            "dpBounds": [c.name for c in plan if c.bounds_source == "dp"],
            "dataBounds": data_bounds,
            "bins": config.bins,
        },
        "output": {
            "uri": config.output_uri,
            "format": output_format,
            "sha256": digest,
            "bytes": len(payload),
        },
        "quality": figures,
        "seconds": {**stages.seconds, "total": stages.total()},
        "notes": notes,
        "versions": {"smartnoiseSynth": _version("smartnoise-synth")},
    }
    if config.report_uri:
        import json

        tables.write_bytes(
            config.report_uri, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
        )
    return report
