"""`veil train` at ε = 1 on scikit-learn's breast-cancer and wine sets: accuracy against a
constant predictor, the sealed ONNX predicting exactly like the trained model, bounds policy.

Public bounds come from each dataset's published documentation (the min/max table of its
DESCR), not from reading the rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pandas as pd
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from veil.privacy.mechanisms import MECHANISM
from veil.runtime.keywrap import KeyVaultKeyWrapper, RsaPublicKeyWrapper
from veil.runtime.sealing import unseal_file
from veil.training import export
from veil.training.commands import register
from veil.training.train import TrainingConfig, TrainingRefusedError, claim_mechanisms, train

FEATURES = [
    "mean_radius",
    "mean_concave_points",
    "worst_radius",
    "worst_concave_points",
    "worst_texture",
]
WINE_FEATURES = ["alcohol", "flavanoids", "color_intensity", "proline"]
FAMILIES = ["logisticRegression", "gaussianNB", "randomForest"]


def _descr_bounds(descr: str) -> dict[str, list[float]]:
    """The published min/max of each breast-cancer feature, from its DESCR table."""
    names = {"mean": "mean_{}", "standard error": "{}_error", "worst": "worst_{}"}
    bounds: dict[str, list[float]] = {}
    for line in descr.splitlines():
        match = re.match(
            r"^([a-z ]+) \((mean|standard error|worst)\):\s+([0-9.]+)\s+([0-9.]+)\s*$",
            line.strip(),
        )
        if match:
            name = names[match.group(2)].format(match.group(1).strip()).replace(" ", "_")
            bounds[name] = [float(match.group(3)), float(match.group(4))]
    return bounds


@pytest.fixture(scope="module")
def breast_cancer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    from sklearn.datasets import load_breast_cancer

    loaded = load_breast_cancer(as_frame=True)
    frame = loaded.frame
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    directory = tmp_path_factory.mktemp("breast-cancer")
    frame.to_csv(directory / "data.csv", index=False)
    bounds = _descr_bounds(loaded.DESCR)
    assert set(bounds) == set(frame.columns) - {"target"}
    (directory / "bounds.json").write_text(json.dumps(bounds))
    return directory / "data.csv", directory / "bounds.json"


@pytest.fixture(scope="module")
def model_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def sealing_key(tmp_path: Path, model_key: rsa.RSAPrivateKey) -> tuple[rsa.RSAPrivateKey, Path]:
    """The model key, and its public half as the PEM file `veil train --public-key` reads."""
    path = tmp_path / "model-key.pub.pem"
    path.write_bytes(
        model_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return model_key, path


def _config(data: Path, bounds: Path, output: Path, **overrides: Any) -> TrainingConfig:
    from veil.training.train import load_bounds_file

    settings: dict[str, Any] = {
        "dataset_uri": str(data),
        "target_column": "target",
        "family": "logisticRegression",
        "epsilon": 1.0,
        "output_uri": str(output),
        "features": FEATURES,
        "bounds": load_bounds_file(str(bounds)),
        "classes": ["0", "1"],
        "seed": 1,
    }
    settings.update(overrides)
    return TrainingConfig(**settings)


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    parser = argparse.ArgumentParser(prog="veil")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


@pytest.mark.parametrize("family", FAMILIES)
def test_accuracy_at_epsilon_1_beats_a_constant_predictor(
    family: str,
    breast_cancer: tuple[Path, Path],
    tmp_path: Path,
    model_key: rsa.RSAPrivateKey,
) -> None:
    data, bounds = breast_cancer
    wrapper = RsaPublicKeyWrapper(model_key.public_key())
    results = [
        train(_config(data, bounds, tmp_path / f"{seed}.sealed", family=family, seed=seed), wrapper)
        for seed in range(1, 6)
    ]
    accuracies = [r["accuracy"] for r in results]
    constant = [r["constantBaselineAccuracy"] for r in results]
    print(family, accuracies, constant)
    assert max(constant) < 0.65  # the majority class: benign, ~63%
    assert statistics.median(accuracies) >= 0.8
    assert all(a > c for a, c in zip(accuracies, constant, strict=True))
    for result in results:
        assert result["mechanisms"] == [
            {"type": "epsilonDelta", "epsilon": 1.0, "delta": 0.0, "count": 1}
        ]
        assert result["privacySpent"] == {"epsilon": 1.0, "delta": 0.0}
        assert result["private"] is True
        assert result["bounds"]["source"] == "public"
        assert result["onnx"]["labelAgreement"] == 1.0
        assert result["notes"] == []


def _fitted_predictions(config: TrainingConfig, frame: pd.DataFrame) -> tuple[Any, Any, Any]:
    """Refit exactly as `train` does (same seed), to compare its model with the sealed ONNX."""
    from veil.training.train import _classes, _feature_bounds, _fit, _prepare, _split

    features, x, y, _ = _prepare(config, frame, [])
    train_x, train_y, test_x, _ = _split(x, y, config.test_fraction, config.seed)
    lower, upper, _ = _feature_bounds(config, features, list(frame.columns), train_x)
    scaler = export.bounds_scaler(lower, upper)
    model, _, _ = _fit(config, _classes(config, y, train_y, []), scaler.transform(train_x), train_y)
    scaled = scaler.transform(test_x)
    return test_x, model.predict(scaled), model.predict_proba(scaled)


@pytest.mark.parametrize(
    "case", [(dataset, family) for dataset in ("breast_cancer", "wine") for family in FAMILIES]
)
def test_sealed_onnx_predicts_like_the_trained_model(
    case: tuple[str, str],
    breast_cancer: tuple[Path, Path],
    tmp_path: Path,
    sealing_key: tuple[rsa.RSAPrivateKey, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    dataset, family = case
    model_key, public_pem = sealing_key
    if dataset == "wine":  # three classes
        from sklearn.datasets import load_wine

        data = tmp_path / "wine.csv"
        load_wine(as_frame=True).frame.to_csv(data, index=False)
        # The published min/max of its DESCR table.
        spans = ["alcohol=11:14.8", "flavanoids=0.34:5.08", "color_intensity=1.3:13"]
        spans.append("proline=278:1680")
        flags = [f for span in spans for f in ("--bounds", span)]
        features, classes = WINE_FEATURES, "0,1,2"
    else:
        data, bounds = breast_cancer
        flags = ["--bounds-file", str(bounds)]
        features, classes = FEATURES, "0,1"
    sealed = tmp_path / "model.sealed"
    code, result, err = run(
        [
            *["--dataset", str(data), "--target", "target", "--features", ",".join(features)],
            *["--family", family, "--epsilon", "1", "--seed", "4", "--classes", classes],
            *flags,
            *["--public-key", str(public_pem), "--output", str(sealed), "--key-id", "model-v1"],
        ],
        capsys,
    )
    assert code == 0, err
    assert result["sealed"]["sha256"] == hashlib.sha256(sealed.read_bytes()).hexdigest()
    assert result["sealed"]["keyId"] == "model-v1"

    onnx_bytes = unseal_file(sealed, model_key)
    assert hashlib.sha256(onnx_bytes).hexdigest() == result["onnx"]["sha256"]

    frame = pd.read_csv(data)
    config = TrainingConfig(
        dataset_uri=str(data),
        target_column="target",
        family=family,
        epsilon=1.0,
        output_uri=str(tmp_path / "unused"),
        features=features,
        bounds={
            name: (lo, hi)
            for name, lo, hi in zip(
                features, result["bounds"]["lower"], result["bounds"]["upper"], strict=True
            )
        },
        classes=classes.split(","),
        seed=4,
    )
    test_x, labels, probabilities = _fitted_predictions(config, frame)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    onnx_labels, onnx_proba = session.run(None, {"input": test_x.astype(np.float32)})
    assert (onnx_labels == labels).all()
    np.testing.assert_allclose(onnx_proba, probabilities, atol=1e-4)
    # Outside the bounds the export clips as training did.
    far = np.vstack([test_x[0] * 100, test_x[0] * -100]).astype(np.float32)
    assert session.run(None, {"input": far})[0].shape == (2,)


def test_training_seals_through_key_vault(
    breast_cancer: tuple[Path, Path], tmp_path: Path, model_key: rsa.RSAPrivateKey
) -> None:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    class Wrapped:
        def __init__(self, key_id: str, encrypted_key: bytes) -> None:
            self.key_id, self.encrypted_key = key_id, encrypted_key

    class CryptographyClient:  # what KeyVaultKeyWrapper calls: wrap_key(algorithm, key)
        key_id = "https://vault.example/keys/model/1"

        def wrap_key(self, algorithm: Any, key: bytes) -> Wrapped:
            assert str(algorithm.value if hasattr(algorithm, "value") else algorithm) == (
                "RSA-OAEP-256"
            )
            oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
            return Wrapped(self.key_id, model_key.public_key().encrypt(key, oaep))

    data, bounds = breast_cancer
    output = tmp_path / "kv.sealed"
    wrapper = KeyVaultKeyWrapper(CryptographyClient(), model_key.public_key())  # type: ignore[arg-type]
    result = train(_config(data, bounds, output, family="gaussianNB"), wrapper)
    assert result["sealed"]["keyId"] == CryptographyClient.key_id
    assert hashlib.sha256(unseal_file(output, model_key)).hexdigest() == result["onnx"]["sha256"]


def test_bounds_must_be_public_unless_explicitly_read_from_data(
    breast_cancer: tuple[Path, Path],
    tmp_path: Path,
    sealing_key: tuple[rsa.RSAPrivateKey, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, public_pem = sealing_key
    data, _ = breast_cancer
    output = tmp_path / "model.sealed"
    common = ["--dataset", str(data), "--target", "target", "--features", ",".join(FEATURES)]
    common += ["--family", "gaussianNB", "--epsilon", "1", "--public-key", str(public_pem)]
    common += ["--output", str(output)]
    code, _, err = run(common, capsys)
    assert code == 2
    assert "no public bounds for feature(s) mean_radius" in err
    assert "--bounds-from-data" in err
    assert not output.exists()

    code, result, err = run([*common, "--bounds-from-data", "--seed", "2"], capsys)
    assert code == 0, err
    assert result["private"] is False
    assert result["bounds"]["source"] == "data"
    assert any("NOT private" in note for note in result["notes"])
    assert any("class labels were read" in note for note in result["notes"])


def test_refusals(breast_cancer: tuple[Path, Path], tmp_path: Path) -> None:
    data, bounds = breast_cancer
    wrapper = RsaPublicKeyWrapper(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    )
    with pytest.raises(TrainingRefusedError, match="unknown family"):
        train(_config(data, bounds, tmp_path / "m", family="svm"), wrapper)
    with pytest.raises(TrainingRefusedError, match="no target column"):
        train(_config(data, bounds, tmp_path / "m", target_column="diagnosis"), wrapper)
    with pytest.raises(TrainingRefusedError, match=r"labels \[1\] are not in the given classes"):
        train(_config(data, bounds, tmp_path / "m", classes=["0"]), wrapper)
    assert not (tmp_path / "m").exists()


def test_claim_and_spec(tmp_path: Path) -> None:
    from veil.training.commands import config_from_args

    assert [MECHANISM.validate_python(m).type for m in claim_mechanisms(0.5)] == ["epsilonDelta"]
    spec = tmp_path / "model.yaml"
    spec.write_text(
        """
apiVersion: veil.dev/v1alpha1
kind: ConfidentialModel
metadata: {name: triage}
spec:
  tee: {isolation: confidentialVM}
  keyRelease: {}
  training:
    budgetRef: {name: triage-budget}
    datasetUri: "az://acct/data/triage.csv"
    targetColumn: outcome
    family: randomForest
    epsilon: 2
    outputUri: "az://acct/models/from-the-spec.sealed"
"""
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "train",
            "--spec",
            str(spec),
            "--output",
            "az://acct/models/triage.sealed",
            "--public-key",
            "k.pem",
            "--default-bounds",
            "0:1",
            "--epsilon",
            "1.5",
        ]
    )
    config = config_from_args(args)
    assert (config.family, config.target_column, config.epsilon) == ("randomForest", "outcome", 1.5)
    assert config.dataset_uri == "az://acct/data/triage.csv"
    assert config.default_bounds == (0.0, 1.0)
