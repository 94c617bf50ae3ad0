"""DP-SGD rows of bench/synth.py's training table, and DP-SGD speed against plain Opacus.

Accuracy (`training_rows`): `veil.training.train.train` (what the Job runs: Opacus, ONNX
export, sealing) for the DP-SGD families at ε 0.5, 1 and 4 (δ 1e-5, σ calibrated), the
sealed model's accuracy on the held-out rows (keyed-hash split, ~20%), median over seeds;
`nonprivate_accuracy` is the same network, steps, batches and optimizer without clipping or
noise (`veil.training.dpsgd.fit(private=False)`). Data: breast cancer (the table's five
features, an MLP) and digits (8×8 pixels in 0..16, an MLP and a CNN).

Speed (`speed`): samples per second (rows in the Poisson batches ÷ wall seconds of the
training loop), on synthetic rows (speed does not depend on the values), at the issue's
anchor shapes: a tabular MLP 30→256→256→2 at batch 1,024 and a CNN (two 3×3 conv layers,
16 and 32 channels, GroupNorm, max-pool; 28×28 inputs, 10 classes) at batch 256; σ 1, C 1,
Adam. For each shape:

- `veil_<mode>`: Veil's trainer (`veil.training.dpsgd.fit`) with Opacus's `hooks`,
  `functorch`, `ew` (expanded weights) and `ghost` (ghost clipping) per-sample gradients;
- `veil_nonprivate`: the same trainer without privacy (Poisson batches, no clipping/noise);
- `opacus_<mode>`: plain Opacus as its tutorials use it: `PrivacyEngine.make_private` on a
  `DataLoader` (Poisson sampling), the same network and optimizer, hooks and ghost modes;
- `torch_nonprivate`: plain PyTorch with a shuffled `DataLoader` (the anchor's baseline).

Ratios: `dpsgd_vs_nonprivate_ratio` is Veil's best private mode over Veil's non-private
trainer (and `..._hooks` the hooks mode alone, the anchor's setting);
`veil_vs_opacus_ratio` is Veil's hooks over plain Opacus's hooks (target ≥ 0.9). Every
figure is the median of `repeats` timed runs after one untimed warm-up (`--quick`: one run,
no warm-up, a smaller MLP batch; a smoke test, not a measurement), on whatever else the
machine is doing (two shared cores here: compare ratios, not absolute figures).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

DPSGD_DELTA = 1e-5
EPSILONS = (0.5, 1.0, 4.0)


@dataclass(frozen=True)
class SpeedShape:
    name: str
    family: str
    features: int
    classes: int
    rows: int
    batch: int
    steps: int
    hidden: tuple[int, ...]
    input_shape: tuple[int, ...] | None = None


SPEED_SHAPES = (
    SpeedShape("mlp_30_256_256_2_batch1024", "mlp", 30, 2, 16384, 1024, 12, (256, 256)),
    SpeedShape("cnn_28x28_batch256", "cnn", 784, 10, 4096, 256, 8, (64,), (28, 28)),
)
QUICK_SPEED_SHAPES = (
    SpeedShape("mlp_30_256_256_2_batch512", "mlp", 30, 2, 2048, 512, 3, (256, 256)),
)
MODES = ("hooks", "functorch", "ew", "ghost")
OPACUS_MODES = ("hooks", "ghost")


def _log(message: str) -> None:
    import sys

    print(f"[bench.dpsgd] {message}", file=sys.stderr, flush=True)


# --- accuracy --------------------------------------------------------------------------------


def _digits_frame() -> Any:
    from sklearn.datasets import load_digits

    return load_digits(as_frame=True).frame


def training_rows(
    scratch: Path,
    *,
    cancer_frame: Any,
    cancer_bounds: dict[str, tuple[float, float]],
    epsilons: tuple[float, ...],
    seeds: int,
    quick: bool,
    wrapper: Any,
    key: Any,
) -> list[dict[str, Any]]:
    """The DP-SGD entries of the training table (module docstring)."""
    from veil.runtime.sealing import unseal_file
    from veil.training import dpsgd, export
    from veil.training.train import TrainingConfig, plan_of, prepare, train

    cancer = scratch / "dpsgd-breast-cancer.csv"
    cancer_frame.to_csv(cancer, index=False)
    digits = scratch / "digits.csv"
    digits_frame = _digits_frame()
    digits_frame.to_csv(digits, index=False)
    cases: list[tuple[str, str, dict[str, Any]]] = [
        (
            "mlp",
            "breast cancer",
            {
                "dataset_uri": str(cancer),
                "features": list(cancer_bounds),
                "bounds": cancer_bounds,
                "classes": ["0", "1"],
                "dpsgd": dpsgd.DpSgdSettings(
                    epochs=5 if quick else 15, batch_size=64, dataset_rows=len(cancer_frame)
                ),
            },
        )
    ]
    if not quick:
        digits_settings = dpsgd.DpSgdSettings(
            epochs=15, batch_size=256, dataset_rows=len(digits_frame), input_shape=(8, 8)
        )
        for family in ("mlp", "cnn"):
            cases.append(
                (
                    family,
                    "digits",
                    {
                        "dataset_uri": str(digits),
                        "default_bounds": (0.0, 16.0),
                        "classes": [str(c) for c in range(10)],
                        "dpsgd": digits_settings,
                    },
                )
            )

    def config(family: str, fields: dict[str, Any], epsilon: float, seed: int) -> TrainingConfig:
        return TrainingConfig(
            target_column="target",
            family=family,
            epsilon=epsilon,
            delta=DPSGD_DELTA,
            output_uri=str(scratch / "dpsgd.sealed"),
            evaluation_epsilon=1.0,  # held-out rows for the measurement; estimate unused
            seed=seed,
            **fields,
        )

    entries: list[dict[str, Any]] = []
    for family, dataset, fields in cases:
        seed_range = range(1, seeds + 1)
        prepared = {s: prepare(config(family, fields, 1.0, s)) for s in seed_range}
        baseline, constant = [], []
        for s, p in prepared.items():
            plain = config(family, fields, 1.0, s)
            fitted = dpsgd.fit(
                family,
                classes=p.plan.classes.array(),
                x=p.features(~p.test),
                y=p.rows.y[~p.test],
                plan=plan_of(plain),  # type: ignore[arg-type]
                settings=plain.dpsgd,
                seed=s,
                private=False,
            )
            truth = p.labels(p.test)
            baseline.append(float(np.mean(fitted.predict(p.features(p.test)) == truth)))
            constant.append(float(np.max(np.bincount(p.rows.y[p.test])) / p.test.sum()))
        for epsilon in epsilons:
            _log(f"training {family} on {dataset} at ε {epsilon:g}, {seeds} seeds")
            accuracies, sigma = [], 0.0
            for s in seed_range:
                run = config(family, fields, epsilon, s)
                result = train(run, wrapper)
                sigma = result["dpsgd"]["noiseMultiplier"]
                payload = unseal_file(Path(run.output_uri), key)
                labels, _ = export.onnx_predict(payload, prepared[s].rows.x[prepared[s].test])
                truth = prepared[s].labels(prepared[s].test)
                accuracies.append(float(np.mean(np.asarray(labels) == truth)))
            settings = fields["dpsgd"]
            entries.append(
                {
                    "model": family,
                    "dataset": dataset,
                    "epsilon": epsilon,
                    "delta": DPSGD_DELTA,
                    "accuracy": round(statistics.median(accuracies), 4),
                    "nonprivate_accuracy": round(statistics.median(baseline), 4),
                    "accuracy_range": [round(min(accuracies), 4), round(max(accuracies), 4)],
                    "constant_accuracy": round(statistics.median(constant), 4),
                    "seeds": seeds,
                    "noise_multiplier": sigma,
                    "epochs": settings.epochs,
                    "batch_size": settings.batch_size,
                    "hidden": list(settings.hidden),
                }
            )
            _log(str(entries[-1]))
    return entries


# --- speed -----------------------------------------------------------------------------------


def _data(shape: SpeedShape) -> tuple[Any, Any]:
    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, size=(shape.rows, shape.features))
    y = rng.integers(0, shape.classes, size=shape.rows)
    return x, y


def _settings(shape: SpeedShape, mode: str) -> Any:
    from veil.training import dpsgd

    return dpsgd.DpSgdSettings(
        epochs=1,
        batch_size=shape.batch,
        dataset_rows=shape.rows,
        max_grad_norm=1.0,
        noise_multiplier=1.0,
        hidden=shape.hidden,
        input_shape=shape.input_shape,
        max_physical_batch_size=max(shape.batch * 4, 1024),
        grad_sample_mode=mode,
        device="cpu",
    )


def _plan(shape: SpeedShape) -> Any:
    from veil.training.claim import DpSgdPlan

    return DpSgdPlan(shape.batch / shape.rows, 1.0, shape.steps, math.nan, DPSGD_DELTA, shape.batch)


def veil_speed(shape: SpeedShape, mode: str, *, private: bool = True) -> float:
    """Samples per second of Veil's trainer (setup excluded, as in the Opacus loop)."""
    from veil.training import dpsgd

    x, y = _data(shape)
    fitted = dpsgd.fit(
        shape.family,
        classes=np.arange(shape.classes),
        x=x,
        y=y,
        plan=_plan(shape),
        settings=_settings(shape, mode),
        seed=1,
        private=private,
    )
    return float(fitted.stats["_sampled"] / fitted.stats["_seconds"])


def opacus_speed(shape: SpeedShape, mode: str | None) -> float:
    """Samples per second of plain Opacus (`make_private`, Poisson DataLoader) in `mode`,
    or of plain PyTorch with a shuffled DataLoader when `mode` is None."""
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from veil.training import dpsgd

    torch.manual_seed(1)
    x, y = _data(shape)
    dataset = TensorDataset(
        torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)
    )
    model = dpsgd.build_network(
        shape.family, shape.features, shape.classes, _settings(shape, "hooks")
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    criterion: Any = torch.nn.CrossEntropyLoss()
    loader = DataLoader(dataset, batch_size=shape.batch, shuffle=mode is None)
    if mode is not None:
        engine = PrivacyEngine(accountant="rdp")
        made = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=True,
            grad_sample_mode=mode,
            **({"criterion": criterion} if mode == "ghost" else {}),
        )
        if mode == "ghost":  # make_private also wraps the loss for ghost clipping
            model, optimizer, criterion, loader = made
        else:
            model, optimizer, loader = made
    model.train()
    seen, steps = 0, 0
    started = time.perf_counter()
    while steps < shape.steps:
        for xb, yb in loader:
            optimizer.zero_grad()
            criterion(model(xb), yb).backward()
            optimizer.step()
            seen += len(xb)
            steps += 1
            if steps == shape.steps:
                break
    return seen / (time.perf_counter() - started)


def _median(measure: Callable[[], float], repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        measure()  # first calls pay allocator and kernel setup
    return statistics.median(measure() for _ in range(repeats))


def speed_figures(*, quick: bool, repeats: int) -> dict[str, Any]:
    """The speed table (module docstring)."""
    import torch

    logging.getLogger("absl").setLevel(logging.ERROR)
    shapes = QUICK_SPEED_SHAPES if quick else SPEED_SHAPES
    modes = ("hooks", "ghost") if quick else MODES
    table: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for shape in shapes:
            runs = 1 if quick else repeats
            figures: dict[str, float] = {}
            for mode in modes:
                _log(f"speed: {shape.name}, Veil {mode}")
                figures[f"veil_{mode}"] = _median(partial(veil_speed, shape, mode), runs, not quick)
            _log(f"speed: {shape.name}, Veil non-private")
            figures["veil_nonprivate"] = _median(
                partial(veil_speed, shape, "hooks", private=False), runs, not quick
            )
            for mode in OPACUS_MODES if not quick else ("hooks",):
                _log(f"speed: {shape.name}, plain Opacus {mode}")
                figures[f"opacus_{mode}"] = _median(
                    partial(opacus_speed, shape, mode), runs, not quick
                )
            _log(f"speed: {shape.name}, plain PyTorch")
            figures["torch_nonprivate"] = _median(
                partial(opacus_speed, shape, None), runs, not quick
            )
            best = max(modes, key=lambda m: figures[f"veil_{m}"])
            table[shape.name] = {
                "samples_per_second": {k: round(v, 1) for k, v in figures.items()},
                "best_private_mode": best,
                "dpsgd_vs_nonprivate_ratio": round(
                    figures[f"veil_{best}"] / figures["veil_nonprivate"], 3
                ),
                "dpsgd_vs_nonprivate_ratio_hooks": round(
                    figures["veil_hooks"] / figures["veil_nonprivate"], 3
                ),
                "opacus_vs_torch_ratio_hooks": round(
                    figures["opacus_hooks"] / figures["torch_nonprivate"], 3
                ),
                "veil_vs_opacus_ratio": round(figures["veil_hooks"] / figures["opacus_hooks"], 3),
                **(
                    {
                        "veil_vs_opacus_ratio_ghost": round(
                            figures["veil_ghost"] / figures["opacus_ghost"], 3
                        )
                    }
                    if "opacus_ghost" in figures
                    else {}
                ),
                "batch": shape.batch,
                "steps": shape.steps,
                "rows": shape.rows,
            }
            _log(f"speed: {shape.name}: {table[shape.name]}")
    return {
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "repeats": 1 if quick else repeats,
        "noise_multiplier": 1.0,
        "max_grad_norm": 1.0,
        "shapes": table,
        "dpsgd_vs_nonprivate_ratio": {
            name: entry["dpsgd_vs_nonprivate_ratio"] for name, entry in table.items()
        },
        "gpu": None,  # no GPU machine was at hand for this run
    }
