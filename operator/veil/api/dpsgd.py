"""`spec.training`'s DP-SGD fields (families mlp, cnn) and where the training runs.

Every DP-SGD field is optional: absent, `veil train`'s default applies (named in each
description), and the claim is planned with the same default (`veil.training.options`).
The API server refuses a DP-SGD field on a diffprivlib family, by name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from veil.api.base import ResourceRequirements, Rule, WireModel

DIFFPRIVLIB_FAMILIES = ("logisticRegression", "gaussianNB", "randomForest")
DPSGD_FAMILIES = ("mlp", "cnn")
Family = Literal["logisticRegression", "gaussianNB", "randomForest", "mlp", "cnn"]
_IS_DPSGD = "self.family in ['mlp', 'cnn']"

Width = Annotated[int, Field(ge=1, le=65536)]
Pixels = Annotated[int, Field(ge=1, le=4096)]


def _dpsgd_only(name: str, alias: str) -> Rule:
    return Rule(
        cel=f"{_IS_DPSGD} || !has(self.{alias})",
        message=f"{alias} applies to the DP-SGD families (mlp, cnn) only",
        check=lambda t: t.family in DPSGD_FAMILIES or getattr(t, name) is None,
        field_path=f".{alias}",
        reason="FieldValueForbidden",
    )


def _cnn_only(name: str, alias: str) -> Rule:
    return Rule(
        cel=f"self.family == 'cnn' || !has(self.{alias})",
        message=f"{alias} applies to family cnn only",
        check=lambda t: t.family == "cnn" or getattr(t, name) is None,
        field_path=f".{alias}",
        reason="FieldValueForbidden",
    )


def _batch_within_rows(t: Any) -> bool:
    return t.batch_size is None or t.dataset_rows is None or t.batch_size <= t.dataset_rows


class DpSgdTraining(WireModel):
    """The DP-SGD settings of spec.training, and the training pod's resources (a base of
    `Training`, whose rules are `DPSGD_RULES`)."""

    dataset_rows: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000_000,
        description="mlp, cnn (required): the dataset's declared, public row count. Each row "
        "joins each step's batch with probability batchSize / datasetRows, whatever the table "
        "really holds, so the guarantee never rests on the true count.",
    )
    epochs: int | None = Field(
        default=None, ge=1, le=10_000, description="mlp, cnn: passes over datasetRows (10)."
    )
    batch_size: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="mlp, cnn: the expected logical batch of Poisson sampling (256).",
    )
    max_grad_norm: float | None = Field(
        default=None,
        gt=0,
        le=1_000_000,
        description="mlp, cnn: per-sample gradient clipping norm C (1.0).",
    )
    noise_multiplier: float | None = Field(
        default=None,
        gt=0,
        le=1000,
        description="mlp, cnn: σ; absent, the smallest σ whose ε at delta is within epsilon. "
        "Given, the run is refused if it spends more than epsilon.",
    )
    hidden: list[Width] | None = Field(
        default=None,
        max_length=16,
        description="mlp, cnn: widths of the hidden dense layers ([64]); empty: none.",
    )
    input_shape: list[Pixels] | None = Field(
        default=None,
        min_length=2,
        max_length=3,
        description="cnn (required): the image shape the features form, [height, width] or "
        "[channels, height, width].",
    )
    channels: list[Width] | None = Field(
        default=None,
        min_length=1,
        max_length=8,
        description="cnn: channels of the 3×3 conv layers, each pooled by 2 ([16, 32]).",
    )
    optimizer: Literal["sgd", "adam"] | None = Field(
        default=None, description="mlp, cnn: sgd or adam, on the noisy gradient (adam)."
    )
    learning_rate: float | None = Field(
        default=None, gt=0, le=10, description="mlp, cnn: the learning rate (0.02)."
    )
    momentum: float | None = Field(
        default=None, ge=0, lt=1, description="optimizer sgd only: its momentum (0.9)."
    )
    max_physical_batch_size: int | None = Field(
        default=None,
        ge=1,
        le=1_000_000,
        description="mlp, cnn: rows per forward/backward pass; a larger logical batch "
        "accumulates its clipped gradients before the one noisy step (1024).",
    )
    grad_sample_mode: Literal["hooks", "functorch", "ew", "ghost"] | None = Field(
        default=None,
        description="mlp, cnn: how Opacus clips per sample; ghost (ghost clipping, the "
        "default), hooks, functorch or ew. All clip to maxGradNorm; they differ in speed.",
    )
    secure_rng: bool | None = Field(
        default=None,
        description="mlp, cnn: draw batches and noise from the kernel's CSPRNG (slower; "
        "for production). Absent: false.",
    )
    gpus: int | None = Field(
        default=None,
        ge=1,
        le=8,
        description="mlp, cnn: NVIDIA GPUs per training pod (nvidia.com/gpu), on confidential "
        "GPU nodes (Azure NCCads H100 v5). Absent: the pod trains on CPU.",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="mlp, cnn: training pods; above 1, a Kubeflow PyTorchJob (the training "
        "operator must be installed) instead of a Job. Absent: 1.",
    )
    resources: ResourceRequirements | None = Field(
        default=None,
        description="CPU and memory of the training container; absent: requests 1 CPU and "
        "2Gi, limits 2 CPU and 4Gi. GPUs are asked for with gpus.",
    )


# Training's rules about these fields (they read its family and delta too).
DPSGD_RULES: tuple[Rule, ...] = (
    *(
        _dpsgd_only(name, alias)
        for name, alias in (
            ("dataset_rows", "datasetRows"),
            ("epochs", "epochs"),
            ("batch_size", "batchSize"),
            ("max_grad_norm", "maxGradNorm"),
            ("noise_multiplier", "noiseMultiplier"),
            ("hidden", "hidden"),
            ("optimizer", "optimizer"),
            ("learning_rate", "learningRate"),
            ("momentum", "momentum"),
            ("max_physical_batch_size", "maxPhysicalBatchSize"),
            ("grad_sample_mode", "gradSampleMode"),
            ("secure_rng", "secureRng"),
            ("gpus", "gpus"),
            ("workers", "workers"),
        )
    ),
    _cnn_only("input_shape", "inputShape"),
    _cnn_only("channels", "channels"),
    Rule(
        cel=f"!({_IS_DPSGD}) || has(self.datasetRows)",
        message="the DP-SGD families (mlp, cnn) need datasetRows, the dataset's declared "
        "(public) row count: the sampling rate is batchSize / datasetRows",
        check=lambda t: t.family not in DPSGD_FAMILIES or t.dataset_rows is not None,
        field_path=".datasetRows",
        reason="FieldValueRequired",
    ),
    Rule(
        cel=f"!({_IS_DPSGD}) || self.delta > 0",
        message="DP-SGD is (epsilon, delta)-DP: delta must be above 0, e.g. below 1 / datasetRows",
        check=lambda t: t.family not in DPSGD_FAMILIES or t.delta > 0,
        field_path=".delta",
    ),
    Rule(
        cel="self.family != 'cnn' || has(self.inputShape)",
        message="family cnn needs inputShape, the image the features form "
        "([height, width] or [channels, height, width])",
        check=lambda t: t.family != "cnn" or t.input_shape is not None,
        field_path=".inputShape",
        reason="FieldValueRequired",
    ),
    Rule(
        cel="!has(self.batchSize) || !has(self.datasetRows) || self.batchSize <= self.datasetRows",
        message="batchSize cannot exceed datasetRows",
        check=_batch_within_rows,
        field_path=".batchSize",
    ),
    Rule(
        cel="!has(self.momentum) || (has(self.optimizer) && self.optimizer == 'sgd')",
        message="momentum applies to optimizer sgd only",
        check=lambda t: t.momentum is None or t.optimizer == "sgd",
        field_path=".momentum",
        reason="FieldValueForbidden",
    ),
)
