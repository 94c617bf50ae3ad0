"""Which image trains a model: the runtime's for diffprivlib, the trainer's (torch, Opacus) for
DP-SGD, and no DP-SGD run at all without one."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.resources.test_training_dpsgd import spec as dpsgd_spec
from veil.api.confidential_model import ConfidentialModelSpec
from veil.config import Images, OperatorConfig
from veil.controllers import training as controller
from veil.resources import training as build

RUNTIME = "ghcr.io/veil-dev/veil@sha256:" + "1" * 64
TRAINER = "ghcr.io/veil-dev/veil-trainer@sha256:" + "2" * 64
OWNER = {
    "apiVersion": "veil.dev/v1alpha1",
    "kind": "ConfidentialModel",
    "metadata": {"name": "grader", "namespace": "ml", "uid": "u-1", "generation": 1},
}


def _image(children: list[dict[str, Any]]) -> str:
    job = next(c for c in children if c["kind"] == "Job")
    image: str = job["spec"]["template"]["spec"]["containers"][0]["image"]
    return image


def _diffprivlib(model: ConfidentialModelSpec) -> ConfidentialModelSpec:
    assert model.training is not None
    training = model.training.model_copy(update={"family": "logisticRegression"})
    for name in ("dataset_rows",):
        training = training.model_copy(update={name: None})
    return model.model_copy(update={"training": training})


def test_dpsgd_trains_in_the_trainer_image_and_diffprivlib_in_the_runtime() -> None:
    config = OperatorConfig(images=Images(runtime=RUNTIME, trainer=TRAINER))
    assert _image(build.children(OWNER, dpsgd_spec(), config)) == TRAINER
    assert _image(build.children(OWNER, _diffprivlib(dpsgd_spec()), config)) == RUNTIME


def test_without_a_trainer_image_dpsgd_stalls_before_anything_is_claimed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_claim(*_: Any) -> None:
        raise AssertionError("the budget was asked")

    monkeypatch.setattr(controller, "_pay", no_claim)
    status: dict[str, Any] = {}
    config = OperatorConfig(images=Images(runtime=RUNTIME))
    result = controller.train(OWNER, dpsgd_spec(), config, status)
    assert isinstance(result, controller.Result)
    assert result.outcome.stalled
    assert result.outcome.reason == "TrainerImageNotConfigured"
    assert "runtime.trainerImage" in result.outcome.message


def test_the_trainer_image_is_held_to_digests_like_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("VEIL_RUNTIME_IMAGE", RUNTIME)
    monkeypatch.setenv("VEIL_TRAINER_IMAGE", "ghcr.io/veil-dev/veil-trainer:1.0")
    config = OperatorConfig.from_env()
    assert config.images.trainer == "ghcr.io/veil-dev/veil-trainer:1.0"
    assert config.images.by_tag() == ["ghcr.io/veil-dev/veil-trainer:1.0"]
    monkeypatch.setenv("VEIL_TRAINER_IMAGE", TRAINER)
    assert OperatorConfig.from_env().images.by_tag() == []
