"""`veil synthesize`: fit a DP synthesizer on a table, sample it, write the output and a report.

The run, in order (each DP step paid from the claim, `veil.synthesis.privacy`):

1. refuse what must never run (an unknown method, an inconsistent budget split, columns
   whose domain is neither declared nor discoverable) — before any data is read;
2. fetch the source and read its header only: a column that the spec does not declare is
   refused before any row is parsed (`domain.check_header`);
3. read the rows; discover the values of `discover: true` columns (thresholded Laplace
   histograms) and infer the bounds of numeric columns declared without them (Laplace
   histograms), both on all rows;
4. encode every row on the now public plan: out-of-domain values become null, or their row
   is dropped (`domain.encode`);
5. with `reportEpsilon`, measure every 1-way marginal with Gaussian noise for the report;
6. fit the synthesizer (MST with a privately estimated total, or AIM) at its share of the
   budget, check what it ran at against the claim, sample codes and decode them;
7. write the output and the report (`veil.synthesis.quality`).

Every rows-sized quantity stays inside: the report and the logs hold public facts (the spec's
parameters, the plan, the output's digest) and outputs of paid mechanisms only — no row
count, no exact figure, no stage timing. A run has no held-out split: every record is used
the same way, so the neighbour relation stays add/remove of one record.

smartnoise-synth prints to stdout; it is redirected to stderr so that stdout carries only the
report. JAX compiles each new shape on first use (most of a small fit's time): set
`VEIL_JAX_CACHE_DIR` to keep compiled programs across runs. `seed` seeds numpy's global
generator, which MST's and AIM's selection steps draw from: for tests and benchmarks only (a
known seed makes those steps deterministic); the Job never sets it.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from veil.api.synthetic_dataset import (
    DEFAULT_BINS,
    DEFAULT_MAX_DISCOVERED_VALUES,
    Column,
    Synthesizer,
)
from veil.synthesis import domain, dp, quality, tables
from veil.synthesis.privacy import PRIVATE_METHODS, BudgetSplit, split_mechanisms
from veil.synthesis.progress import Stages

if TYPE_CHECKING:
    import pandas as pd  # type: ignore[import-untyped,unused-ignore]

METHODS: tuple[str, ...] = PRIVATE_METHODS
# Relative slack for float rounding when a library's stated spend is compared with the claim.
SPEND_TOLERANCE = 1e-9


class SynthesisError(Exception):
    """The run failed; nothing (or nothing further) was written."""


class RefusedError(SynthesisError):
    """The request is not allowed as given (an undeclared column, inconsistent privacy
    parameters, an unknown method)."""


@dataclass
class SynthesisConfig:
    source_uri: str
    output_uri: str
    method: str
    rows: int
    epsilon: float
    columns: Sequence[Column]
    delta: float = 1e-6
    source_format: str | None = None  # default: from the source's suffix, else csv
    output_format: str | None = None
    bins: int = DEFAULT_BINS
    preprocessor_epsilon: float = 0.0
    discovery_epsilon: float = 0.0
    discovery_delta: float = 0.0
    report_epsilon: float = 0.0
    seed: int | None = None
    max_model_size: float = 80.0
    rounds: int | None = None
    report_uri: str | None = None
    progress: bool = False

    def split(self) -> BudgetSplit:
        return BudgetSplit(
            epsilon=self.epsilon,
            delta=self.delta,
            preprocessor_epsilon=self.preprocessor_epsilon,
            discovery_epsilon=self.discovery_epsilon,
            discovery_delta=self.discovery_delta,
            report_epsilon=self.report_epsilon,
        )


def check_request(config: SynthesisConfig) -> None:
    """Refuse what must never run; called before any data is touched."""
    if config.method not in METHODS:
        raise RefusedError(
            f"unknown method {config.method!r}: use one of {', '.join(METHODS)} (both are "
            "differentially private; nothing else runs on a private source)"
        )
    if config.rows < 1:
        raise RefusedError("rows must be at least 1")
    if config.bins < 2:
        raise RefusedError("bins must be at least 2")
    if not config.columns:
        raise RefusedError(f"no columns declared: give each one in {domain.COLUMNS_FIELD}")
    try:
        config.split()
    except ValueError as bad:
        raise RefusedError(str(bad)) from bad
    names = [c.name for c in config.columns]
    if len(set(names)) != len(names):
        raise RefusedError("column names must be unique")
    if config.method == "aim" and config.rounds is not None and config.rounds < len(names):
        # AIM first measures every column at 1/rounds of its budget each: with fewer rounds
        # than columns that alone is more than its ρ (smartnoise-synth 1.0.8 then fails).
        raise RefusedError("AIM needs at least one round per column")
    # The spec's own cross-field rules, on the same attribute names.
    for rule in Synthesizer.cel_rules:
        if rule.check is not None and not rule.check(config):
            raise RefusedError(f"{rule.field_path or 'synthesizer'}: {rule.message}")
    if tables.as_uri(config.source_uri) == tables.as_uri(config.output_uri):
        raise RefusedError(
            "the output must differ from the source: the source is never overwritten"
        )


@contextlib.contextmanager
def _quiet_library() -> Iterator[None]:
    """smartnoise prints progress to stdout and mbi warns about pandas inputs: keep stdout ours."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
        warnings.simplefilter("ignore")
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


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- the DP steps before the synthesizer -------------------------------------------------------


def _read(config: SynthesisConfig, source_format: str) -> pd.DataFrame:
    """The source's declared columns, refused on its header before any row is parsed."""
    with tables.fetched(config.source_uri) as local:
        header = tables.read_header(local, source_format)
        try:
            domain.check_header(header, config.columns)
        except domain.DomainError as refused:
            raise RefusedError(str(refused)) from refused
        return tables.read_rows(local, source_format, header)


def _discover(config: SynthesisConfig, source: pd.DataFrame) -> dict[str, list[Any]]:
    """Values of the `discover: true` columns, (ε_disc, δ_disc) split evenly among them."""
    wanted = [c for c in config.columns if c.type == "categorical" and c.discover]
    if not wanted:
        return {}
    epsilon = config.discovery_epsilon / len(wanted)
    delta = config.discovery_delta / len(wanted)
    found: dict[str, list[Any]] = {}
    for column in wanted:
        keys = [k for k in domain.category_keys(source[column.name]) if k is not None]
        found[column.name] = dp.discover_values(
            keys, epsilon, delta, column.max_values or DEFAULT_MAX_DISCOVERED_VALUES
        )
    return found


def _infer_bounds(config: SynthesisConfig, source: pd.DataFrame) -> dict[str, tuple[float, float]]:
    """Bounds of numeric columns declared without them, ε_pre split evenly among them."""
    wanted = [c for c in config.columns if c.type == "numeric" and c.lower is None]
    if not wanted:
        return {}
    epsilon = config.preprocessor_epsilon / len(wanted)
    bounds = {}
    for column in wanted:
        try:
            bounds[column.name] = dp.infer_bounds(
                domain.numeric_values(source[column.name]), epsilon
            )
        except dp.MechanismError as failed:
            raise SynthesisError(f"column {column.name}: {failed}") from failed
    return bounds


# --- the synthesizer ----------------------------------------------------------------------------


def _identity_transformer(plan: Sequence[domain.ColumnPlan]) -> Any:
    """A fitted smartnoise TableTransformer that passes codes through (code i is label i).

    It is fitted on each column's public code range, never on the data: smartnoise's own
    transformers read their categories off the rows.
    """
    from snsynth.transform.label import (  # type: ignore[import-untyped,unused-ignore]
        LabelTransformer,
    )
    from snsynth.transform.table import (  # type: ignore[import-untyped,unused-ignore]
        TableTransformer,
    )

    transformers = []
    for column in plan:
        label = LabelTransformer(nullable=False)
        label.fit(list(range(column.cardinality)))
        transformers.append(label)
    return TableTransformer(transformers)


_CLASSES: dict[str, type] = {}


def synthesizer_class(method: str) -> type:
    """smartnoise-synth's MST or AIM, fed codes directly and (MST) a private total.

    - Both take the codes as they are (`_get_train_data`): the transformer, fitted on the
      public code ranges, only states the cardinalities, and an empty table stays an integer
      table (smartnoise would make it an object array and fail, which would tell that no row
      was left).
    - MST: the library hands mbi the exact row count (`known_total=len(data)`), so a model
      meant to depend on the data only through noisy marginals also depends on n exactly:
      one added record moves every estimated marginal, doubling the selection step's
      sensitivity under add/remove. Here the total is the minimum-variance estimate from the
      noisy 1-way measurements (post-processing: free), as AIM already does. The rest is the
      library's `MST`, unchanged.
    """
    if method in _CLASSES:
        return _CLASSES[method]
    from mbi import estimation, marginal_oracles  # type: ignore[import-untyped,unused-ignore]
    from snsynth import utils  # type: ignore[import-untyped,unused-ignore]
    from snsynth.aim.aim import AIMSynthesizer  # type: ignore[import-untyped,unused-ignore]
    from snsynth.mst.mst import MSTSynthesizer  # type: ignore[import-untyped,unused-ignore]

    def train_data(self: Any, data: Any, *_: Any, transformer: Any, **__: Any) -> Any:
        self._transformer = transformer
        return np.asarray(data, dtype=np.int64).reshape(-1, len(transformer.transformers))

    class PrivateTotalMST(MSTSynthesizer):  # type: ignore[misc]
        _get_train_data = train_data

        def MST(self, data: Any, epsilon: float, delta: float) -> None:  # noqa: N802
            rho = utils.cdp_rho(epsilon, delta)
            sigma = np.sqrt(3 / (2 * rho))
            log1 = self.measure(data, [(col,) for col in data.domain], sigma)
            total = float(estimation.minimum_variance_unbiased_total(log1))
            data, log1, self.undo_compress_fn = self.compress_domain(data, log1)
            cliques = self.select(data, rho / 3.0, log1, total)
            log2 = self.measure(data, cliques, sigma)
            self.synthesizer = estimation.mirror_descent(
                data.domain,
                log1 + log2,
                known_total=total,
                iters=5000,
                marginal_oracle=marginal_oracles.message_passing_stable,
            )

    class CodesAIM(AIMSynthesizer):  # type: ignore[misc]
        _get_train_data = train_data

    _CLASSES.update(mst=PrivateTotalMST, aim=CodesAIM)
    return _CLASSES[method]


def _fit(
    config: SynthesisConfig, split: BudgetSplit, plan: Sequence[domain.ColumnPlan], codes: Any
) -> tuple[Any, float]:
    """Fit the synthesizer on the codes; returns it and the ρ it ran at."""
    from snsynth.utils import cdp_rho  # type: ignore[import-untyped,unused-ignore]

    epsilon, delta = split.synthesizer_epsilon, split.zcdp_delta
    options: dict[str, Any] = {}
    if config.method == "aim":
        options = {"max_model_size": config.max_model_size, "rounds": config.rounds}
    synthesizer = synthesizer_class(config.method)(epsilon=epsilon, delta=delta, **options)
    synthesizer.fit(codes, transformer=_identity_transformer(plan), preprocessor_eps=0.0)
    synthesizer.num_rows = None  # the library keeps len(data) for a default sample size
    if float(synthesizer.epsilon) != epsilon:
        raise SynthesisError("the synthesizer changed its own epsilon: refusing to go on")
    # What it ran at: AIM keeps ρ; MST derives it from (ε, δ) the same way.
    spent_rho = float(getattr(synthesizer, "rho", None) or cdp_rho(epsilon, delta))
    if spent_rho > split.synthesizer_rho:
        raise SynthesisError(
            f"the synthesizer ran at rho {spent_rho}, above the claimed "
            f"{split.synthesizer_rho}: refusing to release its output"
        )
    return synthesizer, spent_rho


def _sample_codes(synthesizer: Any, method: str, rows: int, width: int) -> domain.Codes:
    """Codes drawn from the fitted model, without two bugs of the pinned versions.

    1. mbi 1.1.0's `synthetic_data` returns its columns in sampling order, not the domain's.
       smartnoise-synth 1.0.8 reorders them for AIM but not for MST, whose `sample` then
       decodes each column with another column's decoder. Here both are reordered by name.
    2. Its default `method="round"` (randomized rounding) assigns values within each group
       of parent values in row order, column after column, which correlates columns that the
       model says are independent (measured: 2-way TVD 0.36 on a pair the model fits to
       0.01). `method="sample"` draws each row i.i.d. from the model, as MST and AIM intend.
    """
    names = ["col" + str(i) for i in range(width)]
    data = synthesizer.synthesizer.synthetic_data(rows=rows, method="sample")
    if method == "mst":
        data = synthesizer.undo_compress_fn(data)
    return np.asarray(data.df[names].to_numpy(), dtype=np.int64)


def _report_marginals(
    split: BudgetSplit, plan: Sequence[domain.ColumnPlan], codes: domain.Codes
) -> list[Any] | None:
    """The report's noisy 1-way marginals (None without a report budget)."""
    if split.report_epsilon == 0:
        return None
    noisy, rho = dp.noisy_marginals(
        codes, [c.cardinality for c in plan], split.report_noise_multiplier
    )
    if rho > split.report_rho * (1 + SPEND_TOLERANCE):
        raise SynthesisError(
            f"the report's release costs rho {rho}, above the claimed {split.report_rho}"
        )
    return noisy


# --- the run ------------------------------------------------------------------------------------


def synthesize(config: SynthesisConfig) -> dict[str, Any]:
    """Run one synthesis; returns the report (and writes it to `config.report_uri`, if set)."""
    check_request(config)
    split = config.split()
    source_format = config.source_format or tables.infer_format(config.source_uri, "csv")
    output_format = config.output_format or tables.infer_format(config.output_uri, source_format)
    if config.seed is not None:
        np.random.seed(config.seed)
    stages = Stages(
        ["read", "discover", "fit", "sample", "write", "report"],
        show=config.progress,
        title=f"veil synthesize ({config.method})",
    )
    try:
        with _quiet_library():
            with stages.stage("read"):
                source = _read(config, source_format)
            with stages.stage("discover"):
                plan = domain.build_plan(
                    config.columns,
                    bins=config.bins,
                    discovered=_discover(config, source),
                    inferred=_infer_bounds(config, source),
                )
                codes = domain.encode(source, plan)
                del source
                noisy = _report_marginals(split, plan, codes)
            with stages.stage("fit"):
                _configure_jax()
                synthesizer, rho_spent = _fit(config, split, plan, codes)
                del codes
            with stages.stage("sample"):
                synthetic_codes = _sample_codes(synthesizer, config.method, config.rows, len(plan))
                synthetic = domain.decode(synthetic_codes, plan)
            with stages.stage("write"):
                payload = tables.table_bytes(synthetic, output_format)
                digest = tables.write_bytes(tables.as_uri(config.output_uri), payload)
            with stages.stage("report"):
                figures = (
                    None
                    if noisy is None
                    else quality.dp_report(
                        plan,
                        noisy,
                        synthetic_codes,
                        report_epsilon=split.report_epsilon,
                        noise_multiplier=split.report_noise_multiplier,
                    )
                )
    except domain.DomainError as refused:
        raise RefusedError(str(refused)) from refused
    finally:
        stages.close()

    report = _report(config, split, plan, rho_spent, figures)
    report["output"].update(format=output_format, sha256=digest, bytes=len(payload))
    if config.report_uri:
        tables.write_bytes(
            config.report_uri, (json.dumps(report, indent=2, sort_keys=True) + "\n").encode()
        )
    return report


def _report(
    config: SynthesisConfig,
    split: BudgetSplit,
    plan: Sequence[domain.ColumnPlan],
    rho_spent: float,
    figures: dict[str, Any] | None,
) -> dict[str, Any]:
    """Public facts (the spec's parameters, the plan) and outputs of paid mechanisms only."""
    notes = []
    if config.seed is not None:
        notes.append(
            "seeded: the synthesizer's selection steps were reproducible (tests and "
            "benchmarks only)"
        )
    return {
        "method": config.method,
        "private": True,
        "epsilon": config.epsilon,
        "delta": config.delta,
        "budget": {
            "preprocessorEpsilon": split.preprocessor_epsilon,
            "discoveryEpsilon": split.discovery_epsilon,
            "discoveryDelta": split.discovery_delta,
            "reportEpsilon": split.report_epsilon,
            "synthesizerEpsilon": split.synthesizer_epsilon,
            "synthesizerDelta": split.zcdp_delta,
        },
        "rhoSpent": rho_spent,
        "mechanisms": split_mechanisms(config.method, split),
        "rows": {"synthetic": config.rows},
        "columns": [c.describe() for c in plan],
        "output": {"uri": config.output_uri},
        "quality": figures,
        "notes": notes,
        "versions": {"smartnoiseSynth": _version("smartnoise-synth")},
    }
