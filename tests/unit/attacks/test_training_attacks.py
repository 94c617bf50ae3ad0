"""Privacy attacks on DP training (`veil train`, a ConfidentialModel's training stage).

Each test is an attack a privacy engineer would try; each failed on the code before the
privacy-guarantee issue (#11) was fixed:

- a label present only in the data shows up in the model or the result (it was read off
  the rows, or named in a refusal);
- adding one record displaces another between training and test (a fixed-size split), or
  between a forest's trees (split by position);
- the result carries figures computed from the rows without paying (row counts, exact
  accuracy, timings): every number in it must be public or paid for, and the result on
  D ∪ {x} may differ from the result on D only where a paid mechanism (or the model it
  paid for) speaks;
- the claim does not carry everything the run spends, or names no dataset.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.unit.attacks.leaves import leaves
from veil.api.confidential_model import ConfidentialModelSpec
from veil.runtime.keywrap import RsaPublicKeyWrapper
from veil.runtime.sealing import unseal_file
from veil.training import data, export, learners
from veil.training.train import TrainingConfig, TrainingRefusedError, claim_mechanisms, train

SECRET_LABEL = "hiv-positive-patient-7731"
FAMILIES = ("logisticRegression", "gaussianNB", "randomForest")


@pytest.fixture(scope="module")
def model_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _records(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    a, b = rng.uniform(0, 10, n), rng.uniform(0, 10, n)
    return [
        {"a": round(float(u), 3), "b": round(float(v), 3), "label": "high" if u > v else "low"}
        for u, v in zip(a, b, strict=True)
    ]


def _csv(path: Path, records: list[dict[str, Any]]) -> Path:
    pd.DataFrame(records).to_csv(path, index=False)
    return path


def _config(path: Path, **overrides: Any) -> TrainingConfig:
    settings: dict[str, Any] = {
        "dataset_uri": str(path),
        "target_column": "label",
        "family": "logisticRegression",
        "epsilon": 1.0,
        "output_uri": str(path.with_suffix(".sealed")),
        "classes": ["low", "high"],
        "bounds": {"a": (0.0, 10.0), "b": (0.0, 10.0)},
        "seed": 7,
    }
    settings.update(overrides)
    return TrainingConfig(**settings)


# --- 1. Domains are public: the label set is declared, never read off the rows -----------


@pytest.mark.parametrize("family", FAMILIES)
def test_a_label_only_in_the_data_never_reaches_the_model_or_the_result(
    family: str, tmp_path: Path, model_key: rsa.RSAPrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    records = _records(300)
    records[17]["label"] = SECRET_LABEL  # one person's rare diagnosis
    path = _csv(tmp_path / "data.csv", records)
    config = _config(path, family=family, evaluation_epsilon=0.5)
    result = train(config, RsaPublicKeyWrapper(model_key.public_key()))

    assert result["classes"] == ["high", "low"]
    assert SECRET_LABEL not in json.dumps(result)
    onnx_bytes = unseal_file(Path(config.output_uri), model_key)
    assert SECRET_LABEL.encode() not in onnx_bytes
    points = export.probe_points(np.zeros(2), np.full(2, 10.0), seed=1)
    labels, _ = export.onnx_predict(onnx_bytes, points)
    assert set(np.asarray(labels).tolist()) <= {"high", "low"}
    out, err = capsys.readouterr()
    assert SECRET_LABEL not in out + err


def test_without_declared_classes_nothing_runs(
    tmp_path: Path, model_key: rsa.RSAPrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    from veil.training.commands import register

    path = _csv(tmp_path / "data.csv", _records(50))
    parser = argparse.ArgumentParser(prog="veil")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            *["train", "--dataset", str(path), "--target", "label", "--family", "gaussianNB"],
            *["--epsilon", "1", "--default-bounds", "0:10", "--output", str(tmp_path / "m")],
            *["--public-key", str(tmp_path / "unused.pem")],
        ]
    )
    assert args.func(args) == 2
    assert "missing --classes" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bounds": {"a": (0.0, 10.0)}}, "no public bounds for feature"),
        ({"features": ["a", "height"]}, "no such feature column"),
        ({"target_column": "diagnosis"}, "no target column"),
    ],
)
def test_a_spec_the_header_cannot_satisfy_is_refused_before_any_row_is_read(
    overrides: dict[str, Any],
    message: str,
    tmp_path: Path,
    model_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = _csv(tmp_path / "data.csv", _records(50))

    def no_rows(*_: Any) -> Any:
        raise AssertionError("rows were read before the spec was checked against the header")

    monkeypatch.setattr(data, "read_columns", no_rows)
    with pytest.raises(TrainingRefusedError, match=message):
        train(_config(path, **overrides), RsaPublicKeyWrapper(model_key.public_key()))


# --- 3. Neighbour relation: one record in or out moves no other record --------------------


def _rows(records: list[dict[str, Any]], salt: bytes) -> data.Rows:
    raw = {k: np.array([str(r[k]) for r in records], dtype=object) for k in ("a", "b", "label")}
    plan = data.plan_columns(
        data.Schema(("a", "b", "label")),
        "label",
        features=None,
        bounds={},
        default_bounds=(0.0, 10.0),
        classes=["low", "high"],
    )
    return data.usable_rows(raw, plan, salt)


def _keys(rows: data.Rows, mask: Any) -> Counter[tuple[Any, ...]]:
    return Counter(
        (*row.tolist(), int(label)) for row, label in zip(rows.x[mask], rows.y[mask], strict=True)
    )


@pytest.mark.parametrize("position", [0, 123, 400])
def test_split_coupling_adding_a_record_moves_no_other_one(position: int) -> None:
    """With the same salt, train(D) ⊆ train(D ∪ {x}) and test(D) ⊆ test(D ∪ {x}), and the
    two differ by x alone, wherever x lands in the file."""
    records = _records(400)
    salt = data.run_salt(11)
    extra = {"a": 4.2, "b": 6.6, "label": "low"}
    for fraction in (0.1, 0.2, 0.5):
        before = _rows(records, salt)
        after = _rows([*records[:position], extra, *records[position:]], salt)
        test_before = data.in_test(before.digests, fraction)
        test_after = data.in_test(after.digests, fraction)
        train_gain = _keys(after, ~test_after) - _keys(before, ~test_before)
        test_gain = _keys(after, test_after) - _keys(before, test_before)
        assert not _keys(before, ~test_before) - _keys(after, ~test_after)
        assert not _keys(before, test_before) - _keys(after, test_after)
        assert sum(train_gain.values()) + sum(test_gain.values()) == 1


def test_the_split_is_per_record_and_keyed() -> None:
    """A row's side is a function of the row and the run's salt alone: duplicates share a
    side, a different salt gives a different split, the share is near the fraction."""
    records = _records(2000)
    salt = data.run_salt(3)
    rows = _rows(records, salt)
    test = data.in_test(rows.digests, 0.2)
    assert 0.17 < test.mean() < 0.23
    other = data.in_test(_rows(records, data.run_salt(4)).digests, 0.2)
    assert (test != other).any()
    doubled = _rows(records + records, salt)
    assert (data.in_test(doubled.digests, 0.2) == np.concatenate([test, test])).all()


@pytest.fixture
def fitted(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every call `train` makes to the learners, with what it gave them."""
    calls: list[dict[str, Any]] = []
    original = learners.fit

    def spy(family: str, epsilon: float, classes: Any, x: Any, rows: Any, **kw: Any) -> Any:
        calls.append({"x": x.copy(), "y": rows[0].copy(), "trees": rows[1].copy()})
        return original(family, epsilon, classes, x, rows, **kw)

    monkeypatch.setattr(learners, "fit", spy)
    return calls


def _trained(call: dict[str, Any]) -> Counter[tuple[Any, ...]]:
    return Counter(
        (*row.tolist(), int(label), int(tree))
        for row, label, tree in zip(call["x"], call["y"], call["trees"], strict=True)
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_adding_a_record_changes_no_other_record_s_training_or_tree(
    family: str,
    tmp_path: Path,
    model_key: rsa.RSAPrivateKey,
    fitted: list[dict[str, Any]],
) -> None:
    """End to end through `train`: the rows each learner (and each tree) fits on, for D and
    for D ∪ {x} with x first in the file, differ by x at most."""
    records = _records(300)
    wrapper = RsaPublicKeyWrapper(model_key.public_key())
    extra = {"a": 1.5, "b": 8.25, "label": "low"}
    for name, table in (("d", records), ("dx", [extra, *records])):
        path = _csv(tmp_path / f"{name}.csv", table)
        train(_config(path, family=family, evaluation_epsilon=0.5, n_estimators=7), wrapper)
    before, after = (_trained(call) for call in fitted)
    assert not before - after
    assert sum((after - before).values()) <= 1


# --- 2. Nothing computed from the rows leaves unless paid for ----------------------------

# Numbers that are functions of the paid model (and of public probe points) alone.
MODEL_DERIVED = {
    "onnx.bytes",
    "sealed.bytes",
    "onnx.check.labelAgreement",
    "onnx.check.maxProbabilityDiff",
}


def _public(config: TrainingConfig) -> dict[str, Any]:
    """The result's public numbers: each a function of the request and the libraries alone."""
    request: dict[str, Any] = {
        "epsilon": config.epsilon,
        "delta": config.delta,
        "evaluationEpsilon": config.evaluation_epsilon,
        "testFraction": config.test_fraction if config.evaluation_epsilon else None,
        "evaluation.epsilon": config.evaluation_epsilon,
        "onnx.opset": export.TARGET_OPSET,
        "onnx.check.points": export.PROBE_POINTS,
        "mechanisms": claim_mechanisms(config.epsilon, config.evaluation_epsilon, config.delta),
        "bounds": {
            "lower": [config.bounds[f][0] for f in config.bounds],
            "upper": [config.bounds[f][1] for f in config.bounds],
        },
    }
    return dict(leaves(request))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("evaluation_epsilon", [0.0, 0.5])
def test_every_number_in_the_result_is_public_or_paid(
    family: str, evaluation_epsilon: float, tmp_path: Path, model_key: rsa.RSAPrivateKey
) -> None:
    path = _csv(tmp_path / "data.csv", _records(300))
    config = _config(path, family=family, evaluation_epsilon=evaluation_epsilon, delta=1e-7)
    result = train(config, RsaPublicKeyWrapper(model_key.public_key()))
    public, paid = _public(config), set(result["dpEstimates"])
    assert all(p.startswith("evaluation.") for p in paid)
    assert bool(paid) == (evaluation_epsilon > 0)
    numbers = {
        p: v for p, v in leaves(result) if isinstance(v, int | float) and not isinstance(v, bool)
    }
    for leaf, value in numbers.items():
        if leaf in paid or leaf in MODEL_DERIVED:
            continue
        assert leaf in public, f"{leaf} = {value} is neither public nor paid for"
        assert value == public[leaf], f"{leaf} = {value}, the request says {public[leaf]}"
    # Strings: names from the spec and the header, digests of the sealed model, versions.
    for leaf, value in leaves(result):
        if isinstance(value, str) and re.fullmatch(r"[0-9.]+", value):
            assert leaf.startswith("versions."), f"{leaf} = {value!r}: a number as a string"


@pytest.mark.parametrize("family", FAMILIES)
def test_differencing_d_and_d_plus_x_reveals_only_what_was_paid_for(
    family: str, tmp_path: Path, model_key: rsa.RSAPrivateKey
) -> None:
    """Same seed (same salt, same noise draws): the results on D and D ∪ {x} are identical
    except for the paid estimates and the model itself (sha256s of what was paid for)."""
    records = _records(300)
    wrapper = RsaPublicKeyWrapper(model_key.public_key())
    results = []
    for name, table in (("d", records), ("dx", [*records, {"a": 9.5, "b": 0.5, "label": "high"}])):
        path = _csv(tmp_path / f"{name}.csv", table)
        config = _config(path, family=family, evaluation_epsilon=0.5)
        config.output_uri = str(tmp_path / "model.sealed")
        results.append(dict(leaves(train(config, wrapper))))
    before, after = results
    assert before.keys() == after.keys()
    paid = {v for k, v in before.items() if k.startswith("dpEstimates[")}
    free_to_differ = paid | MODEL_DERIVED | {"onnx.sha256", "sealed.sha256", "sealed.bytes"}
    differing = {k for k in before if before[k] != after[k]}
    assert differing <= free_to_differ, sorted(differing - free_to_differ)


# --- 4. The claim carries everything the run spends, and the dataset --------------------


def _spec(**training: Any) -> ConfidentialModelSpec:
    return ConfidentialModelSpec.model_validate(
        {
            "tee": {"isolation": "confidentialVM"},
            "keyRelease": {
                "vaultUrl": "https://v.vault.azure.net",
                "keyName": "grader",
                "attestationAuthority": "https://a.attest.azure.net",
            },
            "training": {
                "budgetRef": {"name": "oncology"},
                "datasetUri": "az://acct/data/oncology.csv",
                "targetColumn": "malignant",
                "classes": ["0", "1"],
                "epsilon": 1.0,
                "bounds": [{"column": "radius", "lower": 6, "upper": 29}],
                "features": ["radius"],
                "outputUri": "az://acct/models/grader.sealed",
                **training,
            },
        }
    )


@pytest.mark.parametrize(
    "training",
    [{}, {"evaluationEpsilon": 0.25}, {"evaluationEpsilon": 0.5, "delta": 1e-6}],
)
def test_the_claim_carries_every_mechanism_the_job_spends_and_names_the_dataset(
    training: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from veil.controllers import training as controller
    from veil.resources.training import train_args
    from veil.training.commands import config_from_args, register

    spec = _spec(**training)
    requests: list[Any] = []
    monkeypatch.setattr(controller, "pay_before_reading", lambda _r, req, _s: requests.append(req))
    owner = {"metadata": {"uid": "u-1", "name": "grader", "namespace": "ns", "generation": 1}}
    assert controller._pay(owner, spec, "run1", {}) is None
    (request,) = requests
    assert request.dataset == "az://acct/data/oncology.csv"

    # What the Job's trainer will spend, from the very arguments the Job runs with.
    parser = argparse.ArgumentParser(prog="veil")
    register(parser.add_subparsers(dest="command", required=True))
    job_config = config_from_args(parser.parse_args(train_args(spec)))
    spent = claim_mechanisms(job_config.epsilon, job_config.evaluation_epsilon, job_config.delta)
    claimed = [m.model_dump(mode="json", by_alias=True) for m in request.mechanisms]
    assert claimed == spent
    assert sum(m["epsilon"] for m in claimed) == pytest.approx(
        1.0 + training.get("evaluationEpsilon", 0.0)
    )
    assert job_config.classes == ["0", "1"]
