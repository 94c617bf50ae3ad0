"""`veil train`: fit a diffprivlib model at ε, or a DP-SGD network (Opacus) at (ε, δ), export
it to ONNX, check it, seal it, write it.

**Privacy unit.** One record, added or removed. Everything the run releases (the sealed
model and the result JSON, which `veil train` prints and the operator reads) is either
public — from the spec, the header or the libraries — or comes out of a mechanism the claim
pays for (`veil.training.claim`): the model (ε), and, when `evaluationEpsilon` > 0, a noisy
accuracy (`veil.training.evaluate`). No row count, timing or exact figure about the rows is
released; the result's `dpEstimates` names the figures that are DP estimates.

**Public domain.** The label set is declared (`--classes`, `spec.training.classes`) and so is
every feature's [low, high] (`--bounds`, a bounds file — JSON `{"column": [low, high]}`, by
path or URI — or a default span). Both are checked against the table's header before any row
is read (`veil.training.data`): a missing bound or an unknown column refuses the run there.
A row whose label is not a declared class, or whose feature is not a finite number, is
dropped — a per-record filter, so never an error that could name a value. Features are
clipped to their bounds and scaled onto [-0.5, 0.5]; the exported ONNX model clips and scales
the same way.

**Split.** With an evaluation, a row is held out iff a keyed hash of its own content (per-run
random salt; `--seed` fixes it) falls below the test fraction: adding a record never moves
another between training and test. Without one, every usable row trains.

**What is spent.** The learners (`veil.training.learners`) are pure ε-DP on the training rows
and know only the declared classes; the random forest gives each row to one tree by the same
kind of keyed hash. The claim records `{"type": "epsilonDelta", "epsilon": ε, "delta": δ}` (δ
as declared, though unused) and, for an evaluation, `{"type": "epsilonDelta", "epsilon":
ε_eval, "delta": 0}`: the costs add up. A DP-SGD network (`mlp`, `cnn`: `veil.training.dpsgd`)
records the DP-SGD event instead of the first: `{"type": "dpsgd", "samplingRate": q,
"noiseMultiplier": σ, "steps": T}`, decided from the spec alone (`claim.dpsgd_plan`: the
declared row count, batch size and epochs; σ calibrated to (ε, δ) or given), and exactly
what Opacus trains with; the result's `dpsgd` section adds Opacus's own accountants' ε.

**Replicas.** A PyTorchJob's replicas (WORLD_SIZE > 1; DP-SGD only) train one network
together (`train_replica`, `veil.training.distributed`): every replica reads the table and
splits it with rank 0's salt, trains on its own keyed-hash chunk of the training rows, and the
run is the same DP-SGD event as in one process; rank 0 alone evaluates, exports, seals and
writes.

**Export check.** The ONNX export must predict like the trained model on points drawn from
the public bounds box (never on data rows), or nothing is written.

**Not covered.** diffprivlib's objective perturbation assumes the optimiser converges
(`--max-iter` caps it); its tree structure draws from numpy's generator, not a cryptographic
one (`--seed` makes runs reproducible for tests). A run on data with too few usable rows for
its learner fails, and that failure is not itself private; its message names no value.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import math
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from veil.synthesis import tables
from veil.training import data, distributed, dpsgd, evaluate, export, learners
from veil.training.claim import DpSgdPlan, claim_mechanisms
from veil.training.distributed import SINGLE, World
from veil.training.dpsgd import DpSgdSettings
from veil.training.errors import TrainingError, TrainingRefusedError
from veil.training.options import plan_for

if TYPE_CHECKING:
    from veil.runtime.keywrap import KeyWrapper

__all__ = [
    "DPSGD_FAMILIES",
    "FAMILIES",
    "DpSgdSettings",
    "Prepared",
    "TrainingConfig",
    "TrainingError",
    "TrainingRefusedError",
    "claim_mechanisms",
    "fit_model",
    "load_bounds_file",
    "plan_of",
    "prepare",
    "train",
    "train_replica",
]

DPSGD_FAMILIES: tuple[str, ...] = dpsgd.FAMILIES
FAMILIES: tuple[str, ...] = ("logisticRegression", "gaussianNB", "randomForest", *DPSGD_FAMILIES)


@dataclass
class TrainingConfig:
    dataset_uri: str
    target_column: str
    family: str
    epsilon: float
    output_uri: str
    classes: Sequence[str]
    delta: float = 0.0
    evaluation_epsilon: float = 0.0
    dataset_format: str | None = None
    features: Sequence[str] | None = None
    bounds: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    default_bounds: tuple[float, float] | None = None
    test_fraction: float = 0.2
    seed: int | None = None
    max_iter: int = 100
    n_estimators: int = 10
    max_depth: int = 5
    result_uri: str | None = None
    # The DP-SGD families' settings (`mlp`, `cnn`); ignored by the others.
    dpsgd: DpSgdSettings = field(default_factory=DpSgdSettings)


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
    """Refusals that need nothing but the request."""
    if config.family not in FAMILIES:
        raise TrainingRefusedError(f"unknown family {config.family!r}: use {', '.join(FAMILIES)}")
    if not config.epsilon > 0 or not math.isfinite(config.epsilon):
        raise TrainingRefusedError("epsilon must be a positive number")
    if not (config.evaluation_epsilon >= 0 and math.isfinite(config.evaluation_epsilon)):
        raise TrainingRefusedError("evaluation epsilon must be a non-negative number")
    if not 0 <= config.delta < 1:
        raise TrainingRefusedError("delta must be in [0, 1)")
    if not 0 < config.test_fraction < 1:
        raise TrainingRefusedError("test fraction must be in (0, 1)")
    if min(config.max_iter, config.n_estimators, config.max_depth) < 1:
        raise TrainingRefusedError("max iterations, trees and depth must be at least 1")
    if config.dataset_format not in (None, *tables.FORMATS):
        raise TrainingRefusedError(f"unknown table format {config.dataset_format!r}")
    if config.family in DPSGD_FAMILIES:
        config.dpsgd.check(config.family, len(config.features) if config.features else None)
        plan_of(config)


def plan_of(config: TrainingConfig) -> DpSgdPlan | None:
    """A DP-SGD run's privacy parameters, from the request alone (None for the others)."""
    if config.family not in DPSGD_FAMILIES:
        return None
    try:
        return plan_for(config.epsilon, config.delta, config.dpsgd)
    except ValueError as bad:
        raise TrainingRefusedError(str(bad)) from None


def _read(config: TrainingConfig) -> tuple[data.ColumnPlan, dict[str, npt.NDArray[Any]]]:
    """The plan, decided on the header alone, then the planned columns' cells."""
    from veil.artifacts import fetch

    fmt = config.dataset_format or tables.infer_format(config.dataset_uri, "csv")
    with tempfile.TemporaryDirectory(prefix="veil-train-") as tmp:
        local = Path(tmp) / "table"
        fetch(tables.as_uri(config.dataset_uri), local)
        plan = data.plan_columns(
            data.read_schema(local, fmt),
            config.target_column,
            features=config.features,
            bounds=config.bounds,
            default_bounds=config.default_bounds,
            classes=config.classes,
        )
        return plan, data.read_columns(local, fmt, plan.columns)


@dataclass(frozen=True)
class Prepared:
    """A run's rows, in process only: `train` releases none of this, only the model and the
    paid estimate. Tests and benchmarks on public data use it to measure true accuracy."""

    plan: data.ColumnPlan
    rows: data.Rows
    test: npt.NDArray[np.bool_]  # held out (all False without an evaluation)
    scaler: Any

    def features(self, mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        """The selected rows' features, clipped and scaled as the learners see them."""
        x = self.rows.x[mask]
        scaled: npt.NDArray[np.float64] = self.scaler.transform(x) if len(x) else x
        return scaled

    def labels(self, mask: npt.NDArray[np.bool_]) -> npt.NDArray[Any]:
        """The selected rows' labels, typed as the declared classes."""
        return self.plan.classes.array()[self.rows.y[mask]]


def prepare(config: TrainingConfig, salt: bytes | None = None) -> Prepared:
    """Check the request and the header, read the usable rows, and split them by keyed hash
    when an evaluation is paid for (otherwise every usable row trains). `salt`: the hash key
    (replicas share rank 0's); default: the run's own (`data.run_salt`)."""
    _check(config)
    plan, raw = _read(config)
    if config.family in DPSGD_FAMILIES:  # the CNN's shape against the header's features
        config.dpsgd.check(config.family, len(plan.features))
    rows = data.usable_rows(raw, plan, data.run_salt(config.seed) if salt is None else salt)
    if config.evaluation_epsilon > 0:
        test = data.in_test(rows.digests, config.test_fraction)
    else:
        test = np.zeros(len(rows.y), dtype=np.bool_)
    return Prepared(plan, rows, test, export.bounds_scaler(plan.lower, plan.upper))


def shard(prepared: Prepared, world: World) -> npt.NDArray[np.bool_]:
    """This replica's training rows: those whose keyed hash names its rank (`data.tree_of`),
    so the replicas' chunks are disjoint and cover the training rows, row by row."""
    training = ~prepared.test
    if not world.distributed:
        return training
    mine: npt.NDArray[np.bool_] = training & (
        data.tree_of(prepared.rows.digests, world.size) == world.rank
    )
    return mine


def fit_model(config: TrainingConfig, prepared: Prepared, world: World = SINGLE) -> Any:
    """The DP model, fitted at ε on the training rows (a forest's trees by keyed hash), or
    the DP-SGD network under its plan (with replicas: trained on this replica's chunk)."""
    training = shard(prepared, world)
    plan = plan_of(config)
    if world.distributed and plan is None:
        raise TrainingRefusedError(
            f"only the DP-SGD families ({', '.join(DPSGD_FAMILIES)}) train across replicas"
        )
    if plan is not None:
        return dpsgd.fit(
            config.family,
            classes=prepared.plan.classes.array(),
            x=prepared.features(training),
            y=prepared.rows.y[training],
            plan=plan,
            settings=config.dpsgd,
            seed=config.seed,
            world=world,
        )
    digests = [d for d, keep in zip(prepared.rows.digests, training, strict=True) if keep]
    return learners.fit(
        config.family,
        config.epsilon,
        prepared.plan.classes,
        prepared.features(training),
        (prepared.rows.y[training], data.tree_of(digests, config.n_estimators)),
        max_iter=config.max_iter,
        n_estimators=config.n_estimators,
        max_depth=config.max_depth,
        seed=config.seed,
    )


def _evaluate(config: TrainingConfig, prepared: Prepared, model: Any) -> dict[str, Any]:
    """The paid accuracy estimate on the held-out rows."""
    test_x, truth = prepared.features(prepared.test), prepared.labels(prepared.test)
    with learners.quiet():
        correct = int(np.sum(model.predict(test_x) == truth)) if len(test_x) else 0
    return evaluate.dp_accuracy(correct, len(test_x), config.evaluation_epsilon, config.seed)


def _verified_onnx(
    model: Any, config: TrainingConfig, plan: data.ColumnPlan, scaler: Any
) -> tuple[bytes, dict[str, Any]]:
    """The ONNX export, refused unless it predicts like the model on public points."""
    points = export.probe_points(plan.lower, plan.upper, config.seed)
    try:
        if isinstance(model, dpsgd.DpSgdFit):
            onnx_bytes = dpsgd.export_onnx(model, plan.lower, plan.upper)
            agreement = dpsgd.check_export(onnx_bytes, model, scaler, points)
        else:
            onnx_bytes = export.export_onnx(model, config.family, plan.lower, plan.upper)
            agreement = export.check_export(onnx_bytes, model, scaler, points)
    except export.ExportMismatchError as mismatch:
        raise TrainingError(f"{mismatch}: not written") from None
    check = {"points": len(points), "drawnFrom": "publicBounds", **agreement}
    return onnx_bytes, check


def train(config: TrainingConfig, wrapper: KeyWrapper) -> dict[str, Any]:
    """Train, export, verify, seal and write; returns the result (see the module docstring)."""
    prepared = prepare(config)
    return _release(config, wrapper, prepared, fit_model(config, prepared))


def train_replica(
    config: TrainingConfig, wrapper: KeyWrapper | None, world: World
) -> dict[str, Any] | None:
    """One replica of a distributed DP-SGD run: join the others, read and split the table
    with rank 0's salt, train on this replica's chunk; rank 0 then releases as `train` does
    and returns the result (`wrapper` needed there only), the others return None."""
    if config.family not in DPSGD_FAMILIES:
        raise TrainingRefusedError(
            f"only the DP-SGD families ({', '.join(DPSGD_FAMILIES)}) train across replicas"
        )
    if world.rank == 0 and wrapper is None:
        raise TrainingError("rank 0 needs the model key to seal the model")
    _check(config)  # refused alike on every replica, before any of them waits on another
    distributed.join(world, dpsgd.resolve_device(config.dpsgd.device))
    try:
        salt = distributed.broadcast_bytes(data.run_salt(config.seed))
        failure: Exception | None = None
        try:
            prepared = prepare(config, salt)
        except Exception as failed:  # raised below, once the others know
            failure = failed
        if not distributed.all_ok(failure is None):
            raise failure or TrainingError("another replica could not read the table")
        model = fit_model(config, prepared, world)
    finally:
        distributed.leave()
    if world.rank != 0 or wrapper is None:
        return None
    return _release(config, wrapper, prepared, model)


def _release(
    config: TrainingConfig, wrapper: KeyWrapper, prepared: Prepared, model: Any
) -> dict[str, Any]:
    """Evaluate (when paid for), export, verify, seal and write; the result."""
    from veil.runtime.sealing import read_header, seal_bytes

    evaluation = _evaluate(config, prepared, model) if config.evaluation_epsilon > 0 else None
    onnx_bytes, check = _verified_onnx(model, config, prepared.plan, prepared.scaler)

    sealed = seal_bytes(onnx_bytes, wrapper)
    header, _ = read_header(io.BytesIO(sealed))
    sealed_digest = tables.write_bytes(tables.as_uri(config.output_uri), sealed)
    result = _result(config, prepared.plan, evaluation)
    if isinstance(model, dpsgd.DpSgdFit):
        result["dpsgd"] = _dpsgd_result(config, model)
    result["onnx"] = {
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "bytes": len(onnx_bytes),
        "opset": export.TARGET_OPSET,
        "input": "input",
        "check": check,
    }
    result["sealed"] = {
        "uri": config.output_uri,
        "sha256": sealed_digest,
        "bytes": len(sealed),
        "keyId": header.key_id,
        "keyThumbprint": header.key_thumbprint,
    }
    if config.result_uri:
        tables.write_bytes(
            config.result_uri, (json.dumps(result, indent=2, sort_keys=True) + "\n").encode()
        )
    return result


def _result(
    config: TrainingConfig, plan: data.ColumnPlan, evaluation: dict[str, Any] | None
) -> dict[str, Any]:
    """Everything but the model's digests: the request, the public plan, the paid estimate."""
    notes: list[str] = []
    sgd_plan = plan_of(config)
    if config.delta > 0 and sgd_plan is None:
        notes.append("delta is charged as declared but unused: the models are pure epsilon-DP")
    if evaluation is None:
        notes.append("no accuracy: evaluationEpsilon is 0, so every usable row trained")
    return {
        "family": config.family,
        "epsilon": config.epsilon,
        "delta": config.delta,
        "evaluationEpsilon": config.evaluation_epsilon,
        "mechanisms": claim_mechanisms(
            config.epsilon, config.evaluation_epsilon, config.delta, sgd_plan
        ),
        "target": plan.target,
        "features": list(plan.features),
        "classes": [_plain(c) for c in plan.classes.labels],
        "bounds": {
            "lower": [float(v) for v in plan.lower],
            "upper": [float(v) for v in plan.upper],
        },
        "testFraction": config.test_fraction if evaluation is not None else None,
        "evaluation": evaluation,
        "dpEstimates": list(evaluate.DP_ESTIMATES) if evaluation is not None else [],
        "notes": notes,
        "versions": {
            "diffprivlib": _version("diffprivlib"),
            "scikitLearn": _version("scikit-learn"),
            "skl2onnx": _version("skl2onnx"),
            **(
                {"torch": _version("torch"), "opacus": _version("opacus")}
                if sgd_plan is not None
                else {}
            ),
        },
    }


def _dpsgd_result(config: TrainingConfig, model: dpsgd.DpSgdFit) -> dict[str, Any]:
    """The DP-SGD run's public figures: the plan, the settings, and the ε of the run by
    Opacus's own accountants beside the claim's (RDP, dp_accounting). No row figure."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    plan, settings = model.plan, config.dpsgd
    opacus_epsilon: dict[str, float] = {}
    for name, accountant in (("rdp", RDPAccountant()), ("prv", PRVAccountant())):
        accountant.history = [(plan.noise_multiplier, plan.sampling_rate, plan.steps)]
        with warnings.catch_warnings():  # Opacus's RDP notes when its largest order is best
            warnings.simplefilter("ignore")
            opacus_epsilon[name] = float(accountant.get_epsilon(plan.delta))
    return {
        "samplingRate": plan.sampling_rate,
        "noiseMultiplier": plan.noise_multiplier,
        "steps": plan.steps,
        "expectedBatchSize": plan.batch_size,
        "epochs": settings.epochs,
        "datasetRows": settings.dataset_rows,
        "maxGradNorm": settings.max_grad_norm,
        "noiseCalibrated": settings.noise_multiplier is None,
        "epsilonRdp": plan.epsilon,
        "opacusEpsilon": opacus_epsilon,
        "delta": plan.delta,
        "network": {
            "family": config.family,
            "hidden": list(settings.hidden),
            **(
                {"inputShape": list(settings.image_shape()), "channels": list(settings.channels)}
                if config.family == "cnn"
                else {}
            ),
            "parameters": model.stats["parameters"],
        },
        "optimizer": settings.optimizer,
        "learningRate": settings.learning_rate,
        "maxPhysicalBatchSize": settings.max_physical_batch_size,
        "gradSampleMode": settings.grad_sample_mode,
        "secureRng": settings.secure_rng,
        "device": model.stats["device"],
    }


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value
