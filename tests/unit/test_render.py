from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from veil.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _render(path: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    assert main(["render", str(path)]) == 0
    return [d for d in yaml.safe_load_all(capsys.readouterr().out) if d]


def test_model_renders_key_policy_and_children(capsys: pytest.CaptureFixture[str]) -> None:
    docs = _render(EXAMPLES / "confidential-model-cvm" / "model.yaml", capsys)
    kinds = [d["kind"] for d in docs]
    assert kinds[0] == "KeyVaultKey"
    assert {"Deployment", "Service", "NetworkPolicy", "PodDisruptionBudget"} <= set(kinds)
    policy = docs[0]["releasePolicy"]
    assert isinstance(policy, dict)
    assert policy["version"] == "1.0.0"


def test_training_model_renders_the_key_and_the_training_job(
    capsys: pytest.CaptureFixture[str],
) -> None:
    docs = _render(EXAMPLES / "dp-training" / "model.yaml", capsys)
    assert [d["kind"] for d in docs] == ["KeyVaultKey", "ServiceAccount", "NetworkPolicy", "Job"]
    args = docs[-1]["spec"]["template"]["spec"]["containers"][0]["args"]  # type: ignore[index]
    assert args[0] == "train"
    assert "--bounds" in args


def test_dataset_renders_its_hardened_job(capsys: pytest.CaptureFixture[str]) -> None:
    docs = _render(EXAMPLES / "synthetic-data" / "synthetic.yaml", capsys)
    job = next(d for d in docs if d["kind"] == "Job")
    pod = job["spec"]["template"]["spec"]  # type: ignore[index]
    assert pod["automountServiceAccountToken"] is False
    assert pod["restartPolicy"] == "Never"
    assert job["spec"]["backoffLimit"] == 2  # type: ignore[index]


def test_invalid_file_fails_clearly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: veil.dev/v1alpha1\nkind: PrivacyBudget\nspec: {epsilon: -1}\n")
    assert main(["render", str(bad)]) == 1
    assert "epsilon" in capsys.readouterr().err
