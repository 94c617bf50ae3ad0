"""`veil train` at ε = 1 on scikit-learn's breast-cancer and wine sets: accuracy against a
constant predictor, the DP accuracy estimate, the sealed ONNX predicting exactly like the
trained model, public bounds and classes, refusals on the header alone.

Public bounds come from each dataset's published documentation (the min/max table of its
DESCR), not from reading the rows. The tests themselves may read the rows: they check.
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
from veil.training import data
from veil.training.commands import register
from veil.training.train import (
    TrainingConfig,
    TrainingRefusedError,
    claim_mechanisms,
    fit_model,
    prepare,
    train,
)

FEATURES = [
    "mean_radius",
    "mean_concave_points",
    "worst_radius",
    "worst_concave_points",
    "worst_texture",
]
WINE_FEATURES = ["alcohol", "flavanoids", "color_intensity", "proline"]
# The published min/max of the wine DESCR table.
WINE_BOUNDS = ["alcohol=11:14.8", "flavanoids=0.34:5.08", "color_intensity=1.3:13"]
WINE_BOUNDS.append("proline=278:1680")
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


def _config(data_path: Path, bounds_file: Path, output: Path, **overrides: Any) -> TrainingConfig:
    from veil.training.train import load_bounds_file

    settings: dict[str, Any] = {
        "dataset_uri": str(data_path),
        "target_column": "target",
        "family": "logisticRegression",
        "epsilon": 1.0,
        "output_uri": str(output),
        "features": FEATURES,
        "bounds": load_bounds_file(str(bounds_file)),
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


def _held_out(config: TrainingConfig) -> tuple[Any, Any]:
    """Features and labels of the rows the run held out, recomputed from its seed (the
    tests may read the data)."""
    prepared = prepare(config)
    return prepared.rows.x[prepared.test].astype(np.float32), prepared.labels(prepared.test)


@pytest.mark.parametrize("family", FAMILIES)
def test_accuracy_at_epsilon_1_beats_a_constant_predictor(
    family: str,
    breast_cancer: tuple[Path, Path],
    tmp_path: Path,
    model_key: rsa.RSAPrivateKey,
) -> None:
    data_path, bounds = breast_cancer
    wrapper = RsaPublicKeyWrapper(model_key.public_key())
    accuracies, constant = [], []
    for seed in range(1, 6):
        config = _config(data_path, bounds, tmp_path / f"{seed}.sealed", family=family, seed=seed)
        config.evaluation_epsilon = 1.0
        result = train(config, wrapper)
        test_x, truth = _held_out(config)
        session = ort.InferenceSession(
            unseal_file(tmp_path / f"{seed}.sealed", model_key),
            providers=["CPUExecutionProvider"],
        )
        accuracy = float(np.mean(session.run(None, {"input": test_x})[0] == truth))
        accuracies.append(accuracy)
        constant.append(float(np.max(np.bincount(truth)) / len(truth)))
        # The paid estimate: two geometric counts at ε 0.5 each, on ~110 held-out rows.
        assert result["evaluation"]["accuracy"] == pytest.approx(accuracy, abs=0.1)
        assert result["mechanisms"] == [
            {"type": "epsilonDelta", "epsilon": 1.0, "delta": 0.0, "count": 1},
            {"type": "epsilonDelta", "epsilon": 1.0, "delta": 0.0, "count": 1},
        ]
        assert result["dpEstimates"] == [
            "evaluation.accuracy",
            "evaluation.noisyCorrect",
            "evaluation.noisyTotal",
        ]
        assert result["onnx"]["check"]["labelAgreement"] == 1.0
        assert result["notes"] == []
    print(family, accuracies, constant)
    assert max(constant) < 0.75  # the majority class: benign, ~63% (of a random split)
    assert statistics.median(accuracies) >= 0.8
    assert all(a > c for a, c in zip(accuracies, constant, strict=True))


def _refit(config: TrainingConfig) -> tuple[Any, Any, Any]:
    """Refit exactly as `train` does (same seed), to compare its model with the sealed ONNX;
    returns the usable rows' features, and the model's labels and probabilities on them."""
    prepared = prepare(config)
    model = fit_model(config, prepared)
    x32 = prepared.rows.x.astype(np.float32)
    scaled = prepared.scaler.transform(x32.astype(np.float64))
    return x32, model.predict(scaled), model.predict_proba(scaled)


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

        data_path = tmp_path / "wine.csv"
        load_wine(as_frame=True).frame.to_csv(data_path, index=False)
        flags = [f for span in WINE_BOUNDS for f in ("--bounds", span)]
        features, classes = WINE_FEATURES, "0,1,2"
    else:
        data_path, bounds = breast_cancer
        flags = ["--bounds-file", str(bounds)]
        features, classes = FEATURES, "0,1"
    sealed = tmp_path / "model.sealed"
    code, result, err = run(
        [
            *["--dataset", str(data_path), "--target", "target", "--features", ",".join(features)],
            *["--family", family, "--epsilon", "1", "--seed", "4", "--classes", classes],
            *flags,
            *["--public-key", str(public_pem), "--output", str(sealed), "--key-id", "model-v1"],
        ],
        capsys,
    )
    assert code == 0, err
    assert result["sealed"]["sha256"] == hashlib.sha256(sealed.read_bytes()).hexdigest()
    assert result["sealed"]["keyId"] == "model-v1"
    assert result["classes"] == [int(c) for c in classes.split(",")]
    assert result["evaluation"] is None
    assert result["dpEstimates"] == []
    assert result["onnx"]["check"]["drawnFrom"] == "publicBounds"

    onnx_bytes = unseal_file(sealed, model_key)
    assert hashlib.sha256(onnx_bytes).hexdigest() == result["onnx"]["sha256"]

    config = TrainingConfig(
        dataset_uri=str(data_path),
        target_column="target",
        family=family,
        epsilon=1.0,
        output_uri=str(tmp_path / "unused"),
        classes=classes.split(","),
        features=features,
        bounds={
            name: (lo, hi)
            for name, lo, hi in zip(
                features, result["bounds"]["lower"], result["bounds"]["upper"], strict=True
            )
        },
        seed=4,
    )
    x, labels, probabilities = _refit(config)
    session = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    onnx_labels, onnx_proba = session.run(None, {"input": x})
    np.testing.assert_allclose(onnx_proba, probabilities, atol=1e-4)
    ranked = np.sort(probabilities, axis=1)
    decided = ranked[:, -1] - ranked[:, -2] > 1e-4  # a forest's tied vote may break either way
    assert (onnx_labels[decided] == labels[decided]).all()
    # Outside the bounds the export clips as training did.
    far = np.vstack([x[0] * 100, x[0] * -100]).astype(np.float32)
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

    data_path, bounds = breast_cancer
    output = tmp_path / "kv.sealed"
    wrapper = KeyVaultKeyWrapper(CryptographyClient(), model_key.public_key())  # type: ignore[arg-type]
    result = train(_config(data_path, bounds, output, family="gaussianNB"), wrapper)
    assert result["sealed"]["keyId"] == CryptographyClient.key_id
    assert hashlib.sha256(unseal_file(output, model_key)).hexdigest() == result["onnx"]["sha256"]


def test_bounds_and_classes_must_be_public(
    breast_cancer: tuple[Path, Path],
    tmp_path: Path,
    sealing_key: tuple[rsa.RSAPrivateKey, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, public_pem = sealing_key
    data_path, bounds = breast_cancer
    output = tmp_path / "model.sealed"
    common = ["--dataset", str(data_path), "--target", "target", "--features", ",".join(FEATURES)]
    common += ["--family", "gaussianNB", "--epsilon", "1", "--public-key", str(public_pem)]
    common += ["--output", str(output)]
    code, _, err = run([*common, "--classes", "0,1"], capsys)
    assert code == 2
    assert "no public bounds for feature(s) mean_radius" in err
    assert "never read off the data" in err
    assert not output.exists()

    code, _, err = run([*common, "--bounds-file", str(bounds)], capsys)
    assert code == 2
    assert "missing --classes" in err
    assert not output.exists()

    with pytest.raises(SystemExit):  # reading bounds off the data is no longer an option
        run([*common, "--classes", "0,1", "--bounds-from-data"], capsys)
    assert not output.exists()


def test_refusals(breast_cancer: tuple[Path, Path], tmp_path: Path) -> None:
    data_path, bounds = breast_cancer
    wrapper = RsaPublicKeyWrapper(
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    )
    refusals = {
        "unknown family": {"family": "svm"},
        "no target column 'diagnosis'": {"target_column": "diagnosis"},
        "at least two classes": {"classes": ["0"]},
        "two of the declared classes are the same value": {"classes": ["1", "1.0"]},
        "no such feature column": {"features": ["mean_radius", "shoe_size"]},
        "bounds given for unknown column": {"bounds": {"shoe_size": (30.0, 50.0)}},
        "evaluation epsilon": {"evaluation_epsilon": -1.0},
        "test fraction": {"test_fraction": 1.0},
    }
    for message, overrides in refusals.items():
        with pytest.raises(TrainingRefusedError, match=message):
            train(_config(data_path, bounds, tmp_path / "m", **overrides), wrapper)
    assert not (tmp_path / "m").exists()


def _table(tmp_path: Path, rows: list[dict[str, Any]], fmt: str = "csv") -> Path:
    frame = pd.DataFrame(rows)
    path = tmp_path / f"table.{fmt}"
    if fmt == "parquet":
        frame.to_parquet(path, index=False)
    else:
        frame.to_csv(path, index=False)
    return path


def _small(n: int = 200, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 10, n)
    return [{"a": float(v), "b": float(10 - v), "label": "high" if v > 5 else "low"} for v in a]


def test_string_labels_and_unusable_rows_are_dropped_one_by_one(
    tmp_path: Path, model_key: rsa.RSAPrivateKey
) -> None:
    rows = _small()
    rows += [{"a": "n/a", "b": 1.0, "label": "low"}, {"a": 1.0, "b": 2.0, "label": "unknown"}]
    rows += [{"a": float("inf"), "b": 1.0, "label": "high"}, {"a": 3.0, "b": None, "label": "low"}]
    path = _table(tmp_path, rows)
    config = TrainingConfig(
        dataset_uri=str(path),
        target_column="label",
        family="gaussianNB",
        epsilon=1.0,
        output_uri=str(tmp_path / "m"),
        classes=["low", "high"],
        default_bounds=(0.0, 10.0),
        seed=3,
    )
    result = train(config, RsaPublicKeyWrapper(model_key.public_key()))
    assert result["classes"] == ["high", "low"]
    assert result["features"] == ["a", "b"]
    assert len(prepare(config).rows.y) == 200  # the four bad rows went, each on its own


def test_parquet_schema_types_the_labels_and_refuses_before_reading_rows(
    tmp_path: Path, model_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = [{"a": r["a"], "b": r["b"], "label": int(r["label"] == "high")} for r in _small()]
    path = _table(tmp_path, rows, "parquet")
    wrapper = RsaPublicKeyWrapper(model_key.public_key())
    common: dict[str, Any] = {
        "dataset_uri": str(path),
        "target_column": "label",
        "family": "randomForest",
        "epsilon": 1.0,
        "output_uri": str(tmp_path / "m"),
        "default_bounds": (0.0, 10.0),
        "seed": 2,
    }
    result = train(TrainingConfig(classes=["0", "1"], **common), wrapper)
    assert result["classes"] == [0, 1]

    def no_rows(*_: Any) -> Any:
        raise AssertionError("rows were read before the spec was checked against the header")

    monkeypatch.setattr(data, "read_columns", no_rows)
    with pytest.raises(TrainingRefusedError, match="declared classes are not all values"):
        train(TrainingConfig(classes=["low", "high"], **common), wrapper)
    with pytest.raises(TrainingRefusedError, match="no public bounds for feature"):
        train(TrainingConfig(classes=["0", "1"], **{**common, "default_bounds": None}), wrapper)
    strings = _table(tmp_path, [{**r, "a": str(r["a"])} for r in rows], "parquet")
    with pytest.raises(TrainingRefusedError, match="a are not numeric in the Parquet schema"):
        train(
            TrainingConfig(classes=["0", "1"], **{**common, "dataset_uri": str(strings)}), wrapper
        )


def test_naive_bayes_counts_every_declared_class_independently() -> None:
    """diffprivlib's own counts skip absent classes (a zero prior says "absent") and are
    forced to sum to the exact number of rows (the priors then reveal it)."""
    from veil.training import learners

    rng = np.random.default_rng(0)
    x = rng.uniform(-0.5, 0.5, (101, 2))
    y = (x[:, 0] > 0).astype(np.int64)  # no row of class 2
    sums = []
    for seed in range(20):
        model = learners.gaussian_nb(1.0, np.array([0, 1, 2]), x, y, seed=seed)
        assert (model.class_prior_ > 0).all()
        sums.append(model.class_count_.sum())
    assert any(total != 101 for total in sums)


def test_result_without_an_evaluation_has_no_accuracy(
    breast_cancer: tuple[Path, Path], tmp_path: Path, model_key: rsa.RSAPrivateKey
) -> None:
    data_path, bounds = breast_cancer
    config = _config(data_path, bounds, tmp_path / "m", delta=1e-6)
    result = train(config, RsaPublicKeyWrapper(model_key.public_key()))
    assert result["evaluation"] is None
    assert result["testFraction"] is None
    assert result["mechanisms"] == [
        {"type": "epsilonDelta", "epsilon": 1.0, "delta": 1e-6, "count": 1}
    ]
    assert any("evaluationEpsilon is 0" in note for note in result["notes"])
    assert not {"accuracy", "rows", "seconds", "constantBaselineAccuracy"} & set(result)


def test_claim_and_spec(tmp_path: Path) -> None:
    from veil.training.commands import config_from_args

    assert [MECHANISM.validate_python(m).type for m in claim_mechanisms(0.5)] == ["epsilonDelta"]
    assert [m["epsilon"] for m in claim_mechanisms(0.5, 0.25)] == [0.5, 0.25]
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
    classes: ["admitted", "discharged"]
    family: randomForest
    epsilon: 2
    evaluationEpsilon: 0.5
    features: [age]
    bounds: [{column: age, lower: 0, upper: 120}]
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
    assert config.output_uri == "az://acct/models/triage.sealed"
    assert config.default_bounds == (0.0, 1.0)
    assert config.classes == ["admitted", "discharged"]
    assert config.evaluation_epsilon == 0.5
    assert config.features == ["age"]
    assert config.bounds == {"age": (0.0, 120.0)}
