"""DP-SGD networks with Opacus: a tabular MLP and a small CNN, trained on clipped, publicly
scaled features, exported to ONNX with the same clipping and scaling built in.

**Privacy.** Every number the guarantee rests on is public and fixed before a row is read
(`veil.training.claim.dpsgd_plan`): each of the T steps draws its batch by Poisson sampling
(every row independently with probability q), clips each row's gradient to L2 norm C,
sums, adds N(0, σ²C²) to every coordinate and divides by the *expected* batch size q × the
declared rows (a public constant; Opacus's own `make_private` would divide by q × the true
row count, which is private). An empty batch still steps, with noise alone. So the model is
the DP-SGD event (q, σ, T) the claim states; the trainer checks after the run that Opacus's
optimizer and accountant saw exactly those numbers.

**Physical batches.** A logical batch larger than `max_physical_batch_size` is split into
physical ones whose clipped gradients accumulate before the one noisy step (Opacus's
`signal_skip_step`, as its `BatchMemoryManager` does): memory follows the physical size, the
privacy the logical one.

**Per-sample gradients.** `grad_sample_mode`: Opacus's `ghost` (default: ghost clipping,
per-sample norms without materialising per-sample gradients, two backward passes; about 4×
the `hooks` speed for the MLP on CPU, a little faster for the CNN), `hooks`, `functorch`
(vmap) or `ew` (expanded weights). All clip per sample to C (tested mode by mode); they
differ only in speed and memory.

**Replicas.** Across a PyTorchJob's replicas (WORLD_SIZE > 1), the network is wrapped in
Opacus's `DifferentiallyPrivateDistributedDataParallel` and the optimizer is Opacus's
distributed one: each replica samples its own chunk of the rows at q, rank 0 alone adds the
noise, the sum is all-reduced; the same event (q, σ, T) (`veil.training.distributed`).

**Randomness.** With `secure_rng`, batches are drawn from `os.urandom` (an exact Bernoulli
comparison on 64-bit words) and the noise is Box–Muller on `os.urandom` words, four draws
summed and halved as Opacus's `secure_mode` does against floating-point attacks. Otherwise
torch generators seeded from `seed` (tests, benchmarks) or from `secrets`.

torch and Opacus are imported here only, inside functions: the operator and the inference
runtime never import them (the `dpsgd` extra installs them).
"""

from __future__ import annotations

import io
import math
import os
import secrets
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from veil.training import export
from veil.training.claim import DpSgdPlan
from veil.training.distributed import SINGLE, World
from veil.training.errors import TrainingError, TrainingRefusedError

if TYPE_CHECKING:
    import torch

FAMILIES: tuple[str, ...] = ("mlp", "cnn")
GRAD_SAMPLE_MODES: tuple[str, ...] = ("hooks", "functorch", "ew", "ghost")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")
# ONNX export of torch networks: the TorchScript exporter (torch.onnx.export(dynamo=False)),
# which needs nothing beyond torch; the dynamo exporter would need onnxscript.
ONNX_OPSET = 17
# The export must give PyTorch's probabilities to within this (float32 arithmetic).
PROBABILITY_TOLERANCE = 1e-5


@dataclass(frozen=True)
class DpSgdSettings:
    """A DP-SGD run's public settings (the spec's; `claim.dpsgd_plan` takes the privacy ones)."""

    epochs: int = 10
    batch_size: int = 256  # expected logical batch
    dataset_rows: int = 0  # declared, public; 0: not given (refused)
    max_grad_norm: float = 1.0
    noise_multiplier: float | None = None  # None: calibrated to (ε, δ)
    hidden: tuple[int, ...] = (64,)  # mlp: hidden widths; cnn: dense widths after the convs
    input_shape: tuple[int, ...] | None = None  # cnn: (channels, height, width) or (h, w)
    channels: tuple[int, ...] = (16, 32)  # cnn: conv channels, each conv 3×3 + ReLU + pool 2
    optimizer: str = "adam"  # DP-Adam: Adam on the noisy gradient (post-processing)
    learning_rate: float = 0.02
    momentum: float = 0.9
    max_physical_batch_size: int = 1024
    grad_sample_mode: str = "ghost"  # fastest here for both families (bench/dpsgd.py)
    secure_rng: bool = False
    device: str = "auto"
    threads: int = 0  # torch intra-op threads on CPU; 0: torch's default

    def check(self, family: str, n_features: int | None = None) -> None:
        """Refusals that need nothing but the request (and, for the CNN, the feature count)."""
        if family not in FAMILIES:
            raise TrainingRefusedError(f"{family!r} is not a DP-SGD family ({', '.join(FAMILIES)})")
        if self.dataset_rows < 1:
            raise TrainingRefusedError(
                "DP-SGD needs the dataset's declared row count (datasetRows, public): the "
                "sampling rate is batch size / rows"
            )
        if min(self.epochs, self.batch_size, self.max_physical_batch_size) < 1:
            raise TrainingRefusedError("epochs and batch sizes must be at least 1")
        if not (self.max_grad_norm > 0 and math.isfinite(self.max_grad_norm)):
            raise TrainingRefusedError("the max gradient norm must be a positive number")
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise TrainingRefusedError("the learning rate must be a positive number")
        if not 0 <= self.momentum < 1:
            raise TrainingRefusedError("momentum must be in [0, 1)")
        if any(w < 1 for w in (*self.hidden, *self.channels)):
            raise TrainingRefusedError("layer widths and channels must be at least 1")
        for name, value, allowed in (
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("grad sample mode", self.grad_sample_mode, GRAD_SAMPLE_MODES),
            ("device", self.device, DEVICES),
        ):
            if value not in allowed:
                raise TrainingRefusedError(f"unknown {name} {value!r}: use {', '.join(allowed)}")
        if family == "cnn":
            self._check_cnn(n_features)

    def _check_cnn(self, n_features: int | None) -> None:
        """The CNN's input shape against the features and the conv depth."""
        shape = self.image_shape()
        if not self.channels:
            raise TrainingRefusedError("the CNN needs at least one conv layer (channels)")
        if n_features is not None and math.prod(shape) != n_features:
            raise TrainingRefusedError(
                f"input shape {'×'.join(map(str, shape))} does not hold the "
                f"{n_features} feature columns"
            )
        if min(shape[1:]) < 2 ** len(self.channels):
            raise TrainingRefusedError("the input is too small for that many conv layers")

    def image_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of the CNN's input."""
        shape = self.input_shape
        if shape is None or len(shape) not in (2, 3) or min(shape) < 1:
            raise TrainingRefusedError(
                "the CNN needs an input shape (height, width) or (channels, height, width)"
            )
        return (1, shape[0], shape[1]) if len(shape) == 2 else (shape[0], shape[1], shape[2])


@dataclass
class DpSgdFit:
    """A trained network, as the learners' models look to `train`: `predict`/`predict_proba`
    on scaled features, `classes_`. `stats` are public (settings, plan, speed), never rows."""

    network: Any  # torch.nn.Module, scaled features → logits
    classes_: npt.NDArray[Any]
    family: str
    plan: DpSgdPlan
    stats: dict[str, Any] = field(default_factory=dict)

    def predict_proba(self, x: npt.NDArray[Any]) -> npt.NDArray[np.float64]:
        import torch

        device = next(self.network.parameters()).device
        with torch.no_grad():
            logits = self.network(torch.as_tensor(np.asarray(x), dtype=torch.float32).to(device))
            proba = torch.softmax(logits, dim=1).cpu().numpy()
        return np.asarray(proba, dtype=np.float64)

    def predict(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        labels: npt.NDArray[Any] = self.classes_[np.argmax(self.predict_proba(x), axis=1)]
        return labels


def build_network(
    family: str, n_features: int, n_classes: int, settings: DpSgdSettings
) -> torch.nn.Module:
    """The network, on features scaled onto [-0.5, 0.5]: no batch norm (per-sample
    gradients need layers that treat rows apart; the CNN normalises by GroupNorm)."""
    from torch import nn

    layers: list[nn.Module] = []
    width = n_features
    if family == "cnn":
        channels, height, width_px = settings.image_shape()
        layers.append(nn.Unflatten(1, (channels, height, width_px)))
        for out in settings.channels:
            layers += [
                nn.Conv2d(channels, out, kernel_size=3, padding=1),
                nn.GroupNorm(min(8, out), out) if out % min(8, out) == 0 else nn.Identity(),
                nn.ReLU(),
                nn.MaxPool2d(2),
            ]
            channels, height, width_px = out, height // 2, width_px // 2
        layers.append(nn.Flatten())
        width = channels * height * width_px
    for hidden in settings.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise TrainingRefusedError("device cuda was asked for, and no GPU is visible")
    return torch.device(name)


def _generator(device: torch.device, seed: int | None, stream: int) -> torch.Generator:
    import torch

    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed * 7919 + stream)
    return generator


def secure_normal(shape: Sequence[int], std: float, reference: torch.Tensor) -> torch.Tensor:
    """N(0, std²) from os.urandom (Box–Muller), four draws summed and halved."""
    import torch

    n = math.prod(shape)
    total = np.zeros(n)
    for _ in range(4):
        words = np.frombuffer(os.urandom(16 * n), dtype=np.uint64).reshape(2, n)
        u1 = ((words[0] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0**-53  # (0, 1]
        u2 = (words[1] >> np.uint64(11)).astype(np.float64) * 2.0**-53
        total += np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
    noise = torch.from_numpy(total * (std / 2.0)).reshape(tuple(shape))
    return noise.to(device=reference.device, dtype=reference.dtype)


def _secure_optimizer_class(base: type[Any]) -> type:
    """`base` (a DPOptimizer class) with its noise drawn by `secure_normal`."""
    from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

    def add_noise(self: Any) -> None:
        if getattr(self, "rank", 0) != 0:  # distributed: rank 0's noise is the step's only
            base.add_noise(self)
            return
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            _check_processed_flag(p.summed_grad)
            noise = secure_normal(p.summed_grad.shape, std, p.summed_grad)
            p.grad = (p.summed_grad + noise).view_as(p)
            _mark_as_processed(p.summed_grad)

    return type(f"Secure{base.__name__}", (base,), {"add_noise": add_noise})


class _Sampler:
    """Poisson batches: each row joins each step's batch with probability q."""

    def __init__(
        self,
        n: int,
        q: float,
        device: torch.device,
        secure: bool,
        seed: int | None,
        *,
        stream: int = 1,
    ):
        self.n, self.q, self.device, self.secure = n, q, device, secure
        self.threshold = np.uint64(min(2**64 - 1, math.floor(q * 2.0**64)))
        self.generator = None if secure else _generator(device, seed, stream)

    def draw(self) -> torch.Tensor:
        import torch

        if self.secure:
            words = np.frombuffer(os.urandom(8 * self.n), dtype=np.uint64)
            chosen = np.flatnonzero(words < self.threshold)
            return torch.from_numpy(chosen).to(self.device)
        mask = torch.rand(self.n, generator=self.generator, device=self.device) < self.q
        return mask.nonzero(as_tuple=True)[0]


@dataclass
class _Private:
    """A network made private: what one training step needs."""

    module: Any
    optimizer: Any
    criterion: Any
    ghost: bool
    accountant: Any  # Opacus's RDP accountant, fed by the optimizer's real steps


def make_private(
    network: torch.nn.Module,
    plan: DpSgdPlan,
    settings: DpSgdSettings,
    device: torch.device,
    seed: int | None,
) -> _Private:
    """Opacus's per-sample-gradient module and DP optimizer, with the plan's σ, C and the
    expected batch size (public) as the divisor; no data loader involved. A network wrapped
    in Opacus's DPDDP gets Opacus's distributed optimizer and, as `make_private` gives it,
    the per-replica divisor B / W (the all-reduce sums the replicas and divides by W)."""
    import torch
    from opacus.accountants import RDPAccountant
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel
    from opacus.grad_sample.utils import prepare_module
    from opacus.optimizers import get_optimizer_class

    mode = settings.grad_sample_mode
    ghost = mode == "ghost"
    kwargs: dict[str, Any] = {"batch_first": True, "loss_reduction": "mean"}
    if ghost:
        kwargs["max_grad_norm"] = settings.max_grad_norm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = prepare_module(network, grad_sample_mode=mode, **kwargs)
    parameters = [p for p in module.parameters() if p.requires_grad]
    base: torch.optim.Optimizer
    if settings.optimizer == "adam":
        base = torch.optim.Adam(parameters, lr=settings.learning_rate)
    else:
        base = torch.optim.SGD(parameters, lr=settings.learning_rate, momentum=settings.momentum)
    distributed = isinstance(network, DifferentiallyPrivateDistributedDataParallel)
    divisor: float = plan.batch_size
    if distributed:
        divisor = plan.batch_size / torch.distributed.get_world_size()
    optimizer_class = get_optimizer_class("flat", distributed=distributed, grad_sample_mode=mode)
    if settings.secure_rng:
        optimizer_class = _secure_optimizer_class(optimizer_class)
    optimizer = optimizer_class(
        base,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        expected_batch_size=divisor,
        loss_reduction="mean",
        generator=None if settings.secure_rng else _generator(device, seed, 2),
        secure_mode=False,  # secure_rng draws its own noise (Opacus's needs torchcsprng)
    )
    accountant = RDPAccountant()
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(plan.sampling_rate))
    criterion: Any = torch.nn.CrossEntropyLoss(reduction="mean")
    if ghost:
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping

        criterion = DPLossFastGradientClipping(module, optimizer, criterion, "mean")
    return _Private(module, optimizer, criterion, ghost, accountant)


def private_step(
    private: _Private, x: torch.Tensor, y: torch.Tensor, chosen: torch.Tensor, physical: int
) -> None:
    """One DP-SGD step on the rows `chosen` (a Poisson batch, possibly empty): clipped
    per-sample gradients accumulated over physical batches, then one noisy update."""
    import torch

    if len(chosen) == 0:
        _noise_only_step(private.optimizer)
        return
    chunks = list(torch.split(chosen, physical))
    for i, rows in enumerate(chunks):
        loss = private.criterion(private.module(x[rows]), y[rows])
        loss.backward()
        private.optimizer.signal_skip_step(do_skip=i < len(chunks) - 1)
        private.optimizer.step()
        private.optimizer.zero_grad(set_to_none=True)


def _noise_only_step(optimizer: Any) -> None:
    """An empty batch's step: the sum of no clipped gradients is zero, and the noise, the
    division by the expected batch size and the update happen as on any other step (the
    per-sample-gradient modes differ on empty inputs, so none is asked to run on one)."""
    import torch

    for p in optimizer.params:
        p.summed_grad = torch.zeros_like(p)
        p.grad_sample = p.summed_grad.new_zeros((0, *p.shape))  # one (empty) iteration
    optimizer.add_noise()  # distributed: rank 0's noise; the others add none
    optimizer.scale_grad()
    if optimizer.step_hook:
        optimizer.step_hook(optimizer)
    optimizer._is_last_step_skipped = False
    reduce = getattr(optimizer, "reduce_gradients", None)
    if reduce is not None:  # distributed: this replica joins the step's all-reduce
        reduce()
    optimizer.original_optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for p in optimizer.params:
        p.grad_sample = None


def fit(
    family: str,
    *,
    classes: npt.NDArray[Any],
    x: npt.NDArray[np.float64],
    y: npt.NDArray[np.int64],
    plan: DpSgdPlan,
    settings: DpSgdSettings,
    seed: int | None,
    private: bool = True,
    world: World = SINGLE,
) -> DpSgdFit:
    """Train `family` by DP-SGD under `plan` on scaled features `x` and class indices `y`.

    With `world.distributed` (the group joined), `x` and `y` are this replica's chunk of the
    training rows, and the replicas train one model together (`veil.training.distributed`).

    `private=False` trains the same network the same way without clipping or noise (for
    tests and benchmarks only: such a model is not DP and `train` never makes one)."""
    import torch

    settings.check(family, x.shape[1])
    device = resolve_device(settings.device)
    if settings.threads > 0 and device.type == "cpu":
        torch.set_num_threads(settings.threads)
    if seed is not None:
        torch.manual_seed(seed)  # initial weights: data-independent either way
    network = build_network(family, x.shape[1], len(classes), settings).to(device)
    features = torch.as_tensor(x, dtype=torch.float32, device=device)
    labels = torch.as_tensor(y, dtype=torch.int64, device=device)
    # Each replica its own stream (rank 0's is the single process's): independent draws.
    sampler = _Sampler(
        len(x), plan.sampling_rate, device, settings.secure_rng, seed, stream=1 + 2 * world.rank
    )
    started = time.perf_counter()
    sampled = 0
    try:
        if world.distributed and not private:
            raise TrainingRefusedError("the non-private baseline trains in one process only")
        if private:
            if world.distributed:
                from opacus.distributed import DifferentiallyPrivateDistributedDataParallel

                # Broadcasts rank 0's initial weights.
                network = DifferentiallyPrivateDistributedDataParallel(network)
            state = make_private(network, plan, settings, device, seed)
            state.module.train()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for _ in range(plan.steps):
                    chosen = sampler.draw()
                    sampled += len(chosen)
                    private_step(state, features, labels, chosen, settings.max_physical_batch_size)
            _check_run(state, plan, settings, world)
            trained = state.module.to_standard_module()  # Opacus's hooks removed
            if world.distributed:
                trained = trained.module  # the network inside DPDDP
        else:
            trained, sampled = _fit_non_private(
                network,
                features=features,
                labels=labels,
                plan=plan,
                settings=settings,
                sampler=sampler,
            )
    except TrainingError:
        raise
    except Exception as failed:  # torch's messages may quote tensor values
        raise TrainingError(f"the {family} DP-SGD fit failed ({type(failed).__name__})") from None
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    trained.eval()
    stats = {
        "device": device.type,
        "gradSampleMode": settings.grad_sample_mode,
        "secureRng": settings.secure_rng,
        "parameters": int(sum(p.numel() for p in trained.parameters())),
        # Process-local figures for tests and benchmarks; `train` does not release them.
        "_seconds": seconds,
        "_sampled": sampled,
    }
    return DpSgdFit(trained, np.asarray(classes), family, plan, stats)


def _fit_non_private(
    network: torch.nn.Module,
    *,
    features: torch.Tensor,
    labels: torch.Tensor,
    plan: DpSgdPlan,
    settings: DpSgdSettings,
    sampler: _Sampler,
) -> tuple[torch.nn.Module, int]:
    """The same steps, batches and optimizer without clipping or noise (a baseline); and
    the number of rows its batches held."""
    import torch

    parameters = list(network.parameters())
    optimizer: torch.optim.Optimizer
    if settings.optimizer == "adam":
        optimizer = torch.optim.Adam(parameters, lr=settings.learning_rate)
    else:
        optimizer = torch.optim.SGD(
            parameters, lr=settings.learning_rate, momentum=settings.momentum
        )
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    network.train()
    sampled = 0
    for _ in range(plan.steps):
        chosen = sampler.draw()
        sampled += len(chosen)
        for rows in torch.split(chosen, settings.max_physical_batch_size):
            # Summed and divided by the expected batch, as the private step divides.
            (criterion(network(features[rows]), labels[rows]) / plan.batch_size).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return network, sampled


def _check_run(
    private: _Private, plan: DpSgdPlan, settings: DpSgdSettings, world: World = SINGLE
) -> None:
    """What Opacus trained with must be what the claim states: its optimizer's σ, C and
    divisor, and its accountant's record of the noisy steps taken, (σ, q, T); across
    replicas, on every replica, with Opacus's distributed optimizer, and all of them left
    holding the same model."""
    from opacus.optimizers import DistributedDPOptimizer, DistributedDPOptimizerFastGradientClipping

    from veil.training import distributed

    optimizer = private.optimizer
    ok = (
        optimizer.noise_multiplier == plan.noise_multiplier
        and optimizer.max_grad_norm == settings.max_grad_norm
        and optimizer.expected_batch_size == plan.batch_size / world.size
        and private.accountant.history == [(plan.noise_multiplier, plan.sampling_rate, plan.steps)]
        and world.distributed
        == isinstance(
            optimizer, DistributedDPOptimizer | DistributedDPOptimizerFastGradientClipping
        )
    )
    if world.distributed:
        ok = distributed.all_ok(ok) and distributed.same_parameters(private.module)
    if not ok:
        raise TrainingError("the DP-SGD run differs from the claim's mechanism: not written")


class _Exported:
    """scaled = clip(x, lower, upper) → [-0.5, 0.5]; then the network; then softmax."""

    @staticmethod
    def module(network: Any, lower: npt.NDArray[np.float64], upper: npt.NDArray[np.float64]) -> Any:
        import torch
        from torch import nn

        low_range, high_range = export.FEATURE_RANGE

        class Exported(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.network = network
                self.register_buffer("lower", torch.tensor(lower, dtype=torch.float32))
                self.register_buffer("upper", torch.tensor(upper, dtype=torch.float32))
                self.register_buffer(
                    "scale",
                    torch.tensor((high_range - low_range) / (upper - lower), dtype=torch.float32),
                )

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                lower, upper = self.get_buffer("lower"), self.get_buffer("upper")
                clipped = torch.minimum(torch.maximum(x, lower), upper)
                scaled = (clipped - lower) * self.get_buffer("scale") + low_range
                return torch.softmax(self.network(scaled), dim=1)

        return Exported().eval()


def export_onnx(
    fitted: DpSgdFit, lower: npt.NDArray[np.float64], upper: npt.NDArray[np.float64]
) -> bytes:
    """ONNX of `clip+scale → network → softmax`, one float32 input `input` [N, d], outputs
    `label` (the declared class, by ArgMax and Gather) and `probabilities` [N, k], as the
    scikit-learn families' exports."""
    import onnx
    import torch
    from onnx import helper, numpy_helper

    module = _Exported.module(fitted.network.cpu(), lower, upper)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (torch.zeros(1, len(lower)),),
            buffer,  # type: ignore[arg-type]  # the TorchScript exporter writes to file objects
            input_names=["input"],
            output_names=["probabilities"],
            dynamic_axes={"input": {0: "N"}, "probabilities": {0: "N"}},
            opset_version=ONNX_OPSET,
            dynamo=False,
        )
    model = onnx.load_from_string(buffer.getvalue())
    labels = _label_array(fitted.classes_)
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(labels, name="classes"))
    graph.node.extend(
        [
            helper.make_node("ArgMax", ["probabilities"], ["label_index"], axis=1, keepdims=0),
            helper.make_node("Gather", ["classes", "label_index"], ["label"], axis=0),
        ]
    )
    label_type = helper.np_dtype_to_tensor_dtype(labels.dtype)
    graph.output.insert(0, helper.make_tensor_value_info("label", label_type, ["N"]))
    onnx.checker.check_model(model)
    payload: bytes = model.SerializeToString()
    return payload


def _label_array(classes: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """The declared classes as an ONNX constant: int64, float64 or strings."""
    if classes.dtype.kind in "iu":
        return classes.astype(np.int64)
    if classes.dtype.kind == "f":
        return classes.astype(np.float64)
    return np.array([str(c) for c in classes], dtype=object)


def check_export(
    payload: bytes, fitted: DpSgdFit, scaler: Any, points: npt.NDArray[np.float64]
) -> dict[str, float]:
    """Refuse an export whose probabilities differ from PyTorch's on `points` (raw features:
    the export clips and scales them itself), or whose labels differ where the top class
    leads by more than the tolerance."""
    onnx_labels, onnx_proba = export.onnx_predict(payload, points)
    proba = fitted.predict_proba(scaler.transform(points))
    ranked = np.sort(proba, axis=1)
    decided = ranked[:, -1] - ranked[:, -2] > PROBABILITY_TOLERANCE
    agree = np.asarray(onnx_labels) == fitted.classes_[np.argmax(proba, axis=1)]
    agreement = float(np.mean(agree[decided])) if decided.any() else 1.0
    proba_diff = float(np.max(np.abs(np.asarray(onnx_proba, dtype=np.float64) - proba)))
    if agreement < 1.0 or proba_diff > PROBABILITY_TOLERANCE:
        raise export.ExportMismatchError(
            f"the ONNX export does not predict like the PyTorch network on {len(points)} "
            f"points of the public bounds box (label agreement {agreement:.4f}, largest "
            f"probability difference {proba_diff:.2e})"
        )
    return {"labelAgreement": agreement, "maxProbabilityDiff": proba_diff}
