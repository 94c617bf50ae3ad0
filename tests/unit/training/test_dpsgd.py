"""DP-SGD training (`mlp`, `cnn`) with Opacus, for real on CPU, on scikit-learn's digits
(8×8 images, 10 classes) and breast-cancer sets: the claim is the DP-SGD event Opacus ran
and dp-accounting composes; accuracy at ε 1 against the majority class and against the
same network trained without privacy; the ONNX export against PyTorch, served by the
runtime's onnxruntime model; per-sample clipping and noise as the plan states.

Public bounds: digits' pixels are 0..16 (its DESCR); breast-cancer's come from its DESCR
table (as in test_train). The tests themselves may read the rows: they check.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric import rsa
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from opacus.accountants import PRVAccountant, RDPAccountant

from tests.unit.training.test_train import _descr_bounds
from veil.privacy import accounting
from veil.privacy.mechanisms import MECHANISM, DpSgdMechanism
from veil.runtime.keywrap import RsaPublicKeyWrapper
from veil.runtime.model import OnnxModel
from veil.runtime.sealing import unseal_file
from veil.training import dpsgd
from veil.training.claim import calibrate_noise, claim_mechanisms, dpsgd_plan, mechanisms
from veil.training.commands import register
from veil.training.train import (
    TrainingConfig,
    TrainingRefusedError,
    fit_model,
    plan_of,
    prepare,
    train,
)

DELTA = 1e-5
DIGIT_ROWS = 1797
logging.getLogger("absl").setLevel(logging.ERROR)  # dp_accounting's RDP series warnings


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.datasets import load_digits

    loaded = load_digits(as_frame=True)
    directory = tmp_path_factory.mktemp("digits")
    loaded.frame.to_csv(directory / "data.csv", index=False)
    return directory / "data.csv"


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[float, float]]]:
    from sklearn.datasets import load_breast_cancer

    loaded = load_breast_cancer(as_frame=True)
    frame = loaded.frame
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    directory = tmp_path_factory.mktemp("cancer")
    frame.to_csv(directory / "data.csv", index=False)
    bounds = {k: (v[0], v[1]) for k, v in _descr_bounds(loaded.DESCR).items()}
    return directory / "data.csv", bounds


@pytest.fixture(scope="module")
def model_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _digits_config(path: Path, output: Path, **overrides: Any) -> TrainingConfig:
    settings = dpsgd.DpSgdSettings(
        epochs=15, batch_size=256, dataset_rows=DIGIT_ROWS, input_shape=(8, 8)
    )
    config = TrainingConfig(
        dataset_uri=str(path),
        target_column="target",
        family="mlp",
        epsilon=1.0,
        delta=DELTA,
        output_uri=str(output),
        classes=[str(c) for c in range(10)],
        default_bounds=(0.0, 16.0),
        evaluation_epsilon=0.5,  # so that rows are held out (the tests measure on them)
        seed=3,
        dpsgd=settings,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def _opacus_epsilons(q: float, sigma: float, steps: int, delta: float) -> dict[str, float]:
    """Opacus's RDP ε, and its PRV accountant's (lower, estimate, upper) ε at its defaults
    (`get_epsilon` returns the upper one; eps_error 0.01, delta_error δ / 1000)."""
    rdp, prv = RDPAccountant(), PRVAccountant()
    rdp.history = [(sigma, q, steps)]
    prv.history = [(sigma, q, steps)]
    eps_error, delta_error = 0.01, delta / 1000
    lower, estimate, upper = prv._get_dprv(eps_error, delta_error).compute_epsilon(
        delta, delta_error, eps_error
    )
    assert upper == pytest.approx(prv.get_epsilon(delta))
    return {
        "rdp": float(rdp.get_epsilon(delta)),
        "prv": float(upper),
        "prv_estimate": float(estimate),
        "prv_lower": float(lower),
    }


def _check_accountants(q: float, sigma: float, steps: int, delta: float) -> dict[str, float]:
    """The budget's ε for the claim, against dp-accounting directly and Opacus's accountants."""
    claim = [DpSgdMechanism(sampling_rate=q, noise_multiplier=sigma, steps=steps)]
    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
    )
    assert claim[0].to_dp_event() == event
    rdp = rdp_privacy_accountant.RdpAccountant().compose(event).get_epsilon(delta)
    pld = pld_privacy_accountant.PLDAccountant().compose(event).get_epsilon(delta)
    figures = {
        "dp_accounting_rdp": rdp,
        "dp_accounting_pld": pld,
        "budget_rdp": accounting.epsilon_spent(claim, delta, "rdp"),
        "budget_pld": accounting.epsilon_spent(claim, delta, "pld"),
    }
    opacus = _opacus_epsilons(q, sigma, steps, delta)
    # The budget composes exactly dp-accounting's event.
    assert accounting.rdp_epsilon(claim, delta) == pytest.approx(rdp, rel=1e-9)
    assert accounting.pld_epsilon(claim, delta) == pytest.approx(pld, rel=1e-9)
    # Never in Veil's disfavour: an `rdp` budget (the Rényi filter) charges at least what
    # either Opacus accountant says, and dp-accounting's RDP at least Opacus's RDP. A `pld`
    # budget charges PLD's (pessimistic) bound, which is tighter than Opacus's upper figures
    # and never below what Opacus's PRV proves the run costs at least (its lower bound);
    # it matches PRV's central estimate to within PRV's resolution.
    assert figures["budget_rdp"] >= max(opacus["rdp"], opacus["prv"])
    assert rdp >= opacus["rdp"] * (
        1 - 1e-12
    )  # equal (to rounding) when both grids hold the best order
    assert figures["budget_pld"] >= opacus["prv_lower"]
    assert figures["budget_pld"] == pytest.approx(opacus["prv_estimate"], abs=2e-3)
    assert figures["budget_pld"] == pytest.approx(min(rdp, pld))
    return {**figures, **{f"opacus_{k}": v for k, v in opacus.items()}}


@pytest.mark.parametrize(
    ("q", "sigma", "steps", "delta"),
    [(256 / 1437, 1.0, 80, 1e-5), (0.01, 2.0, 2000, 1e-5), (0.2, 3.0, 50, 1e-6)],
)
def test_budget_and_opacus_accountants_agree_in_veils_favour(
    q: float, sigma: float, steps: int, delta: float
) -> None:
    print(_check_accountants(q, sigma, steps, delta))


def test_calibrated_noise_is_the_smallest_that_fits() -> None:
    plan = dpsgd_plan(1.0, DELTA, batch_size=256, dataset_rows=1437, epochs=15)
    assert plan.sampling_rate == 256 / 1437
    assert plan.steps == math.ceil(15 * 1437 / 256)
    assert plan.epsilon <= 1.0
    smaller = plan.noise_multiplier * (1 - 2e-3)
    from veil.training.claim import run_epsilon

    assert run_epsilon(plan.sampling_rate, smaller, plan.steps, DELTA) > 1.0
    assert calibrate_noise(1.0, DELTA, plan.sampling_rate, plan.steps) == plan.noise_multiplier
    # The claim's wire format is the ledger's DP-SGD mechanism, then the evaluation.
    wire = claim_mechanisms(1.0, 0.2, DELTA, plan)
    assert wire[0] == {
        "type": "dpsgd",
        "samplingRate": plan.sampling_rate,
        "noiseMultiplier": plan.noise_multiplier,
        "steps": plan.steps,
    }
    assert [MECHANISM.validate_python(m) for m in wire] == list(mechanisms(1.0, 0.2, DELTA, plan))
    # A given σ reports its ε, and is refused above the request's.
    given = dpsgd_plan(5.0, DELTA, batch_size=256, dataset_rows=1437, epochs=15, noise_multiplier=2)
    assert given.noise_multiplier == 2
    assert given.epsilon < 5.0
    with pytest.raises(ValueError, match=r"above ε 0\.5"):
        dpsgd_plan(0.5, DELTA, batch_size=256, dataset_rows=1437, epochs=15, noise_multiplier=1)
    with pytest.raises(ValueError, match="delta"):
        dpsgd_plan(1.0, 0.0, batch_size=256, dataset_rows=1437, epochs=15)


def _held_out(config: TrainingConfig) -> tuple[Any, Any, Any]:
    prepared = prepare(config)
    return prepared, prepared.rows.x[prepared.test].astype(np.float32), prepared.test


def test_epsilon_1_beats_the_majority_class_and_loses_to_non_private(
    digits: Path,
    cancer: tuple[Path, dict[str, tuple[float, float]]],
    tmp_path: Path,
    model_key: rsa.RSAPrivateKey,
) -> None:
    wrapper = RsaPublicKeyWrapper(model_key.public_key())
    cancer_path, cancer_bounds = cancer
    cases = {
        "digits": _digits_config(digits, tmp_path / "digits.sealed"),
        "breast-cancer": _digits_config(
            cancer_path,
            tmp_path / "cancer.sealed",
            classes=["0", "1"],
            default_bounds=None,
            bounds=cancer_bounds,
            dpsgd=dpsgd.DpSgdSettings(epochs=15, batch_size=64, dataset_rows=569),
        ),
    }
    report = {}
    for name, config in cases.items():
        result = train(config, wrapper)
        prepared, test_x, test = _held_out(config)
        truth = prepared.labels(test)
        served = OnnxModel.from_bytes(name, unseal_file(Path(config.output_uri), model_key))
        label, _ = served.run({"input": test_x}, ["label", "probabilities"])
        private = float(np.mean(label == truth))
        baseline = dpsgd.fit(
            config.family,
            classes=prepared.plan.classes.array(),
            x=prepared.features(~test),
            y=prepared.rows.y[~test],
            plan=plan_of(config),  # type: ignore[arg-type]
            settings=config.dpsgd,
            seed=config.seed,
            private=False,
        )
        non_private = float(np.mean(baseline.predict(prepared.features(test)) == truth))
        majority = float(np.max(np.bincount(prepared.rows.y[test])) / test.sum())
        report[name] = {
            "epsilon1": private,
            "nonPrivate": non_private,
            "majority": majority,
            "margin": non_private - private,
            "noiseMultiplier": result["dpsgd"]["noiseMultiplier"],
        }
        assert result["mechanisms"][0]["type"] == "dpsgd"
        assert private > majority + 0.2
        assert non_private > private
    print(json.dumps(report, indent=1))
    assert report["digits"]["epsilon1"] >= 0.75  # 10 classes, majority ~0.1
    assert report["breast-cancer"]["epsilon1"] >= 0.85  # majority ~0.63


@pytest.mark.parametrize("family", ["mlp", "cnn"])
def test_onnx_outputs_equal_pytorch_on_held_out_rows(
    family: str, digits: Path, tmp_path: Path
) -> None:
    config = _digits_config(digits, tmp_path / "m.sealed", family=family)
    config.dpsgd = replace(config.dpsgd, epochs=2, hidden=(32,), channels=(8, 16))
    prepared = prepare(config)
    model = fit_model(config, prepared)
    payload = dpsgd.export_onnx(model, prepared.plan.lower, prepared.plan.upper)
    served = OnnxModel.from_bytes(family, payload)
    assert [o.name for o in served.outputs] == ["label", "probabilities"]
    # Held-out rows, and beyond the public bounds (where the export must clip as training did).
    rows = prepared.rows.x[prepared.test]
    rows = np.vstack([rows, rows[:50] * 3 - 16]).astype(np.float32)
    label, proba = served.run({"input": rows}, ["label", "probabilities"])
    expected = model.predict_proba(prepared.scaler.transform(rows.astype(np.float64)))
    assert np.max(np.abs(proba - expected)) < 1e-5
    assert (label == model.predict(prepared.scaler.transform(rows.astype(np.float64)))).all()
    assert label.dtype == np.int64  # the declared classes "0".."9" are numbers


def _one_step_grads(
    network: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    sigma: float,
    clip: float,
    batch: int,
    mode: str = "hooks",
) -> list[torch.Tensor]:
    """p.grad after one DP step on all of x (σ, C, divisor `batch`), weights unchanged."""
    plan = dpsgd_plan(1e3, DELTA, batch_size=batch, dataset_rows=1000, epochs=1, noise_multiplier=1)
    plan = replace(plan, noise_multiplier=sigma)
    settings = dpsgd.DpSgdSettings(
        dataset_rows=1000, batch_size=batch, max_grad_norm=clip, grad_sample_mode=mode
    )
    network = copy.deepcopy(network)  # each call wraps a fresh copy in Opacus's hooks
    private = dpsgd.make_private(network, plan, settings, torch.device("cpu"), seed=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss = private.criterion(private.module(x), y)
        loss.backward()
        private.optimizer.pre_step()  # clip, accumulate, noise, divide: no update
    return [p.grad.detach().clone() for p in private.optimizer.params]


@pytest.mark.parametrize("family", dpsgd.FAMILIES)
@pytest.mark.parametrize("mode", dpsgd.GRAD_SAMPLE_MODES)
def test_per_sample_clipping_and_noise_are_applied(family: str, mode: str) -> None:
    torch.manual_seed(0)
    settings = dpsgd.DpSgdSettings(
        dataset_rows=1000, hidden=(16,), input_shape=(4, 4), channels=(4,)
    )
    network = dpsgd.build_network(family, 16, 3, settings)
    x, y = torch.randn(32, 16) * 20, torch.randint(0, 3, (32,))
    clip, batch = 0.5, 32

    # Plain per-sample gradients, by autograd, one row at a time.
    per_sample = []
    for i in range(len(x)):
        loss = torch.nn.functional.cross_entropy(network(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, list(network.parameters()))
        per_sample.append(torch.cat([g.flatten() for g in grads]))
    raw = torch.stack(per_sample)
    norms = raw.norm(dim=1)
    assert (norms > clip).sum() > len(x) // 2  # most rows are clipped at this scale

    # σ = 0: the step's gradient is Σ clip(g_i) / B, with every clipped ‖g_i‖ ≤ C.
    for i in range(4):
        one = torch.cat(
            [
                g.flatten()
                for g in _one_step_grads(
                    network, x[i : i + 1], y[i : i + 1], sigma=0.0, clip=clip, batch=1, mode=mode
                )
            ]
        )
        assert one.norm() <= clip * (1 + 1e-5)
        expected = raw[i] * min(1.0, clip / float(norms[i]))
        assert torch.allclose(one, expected, atol=1e-5, rtol=1e-4)
    clipped = torch.cat(
        [
            g.flatten()
            for g in _one_step_grads(network, x, y, sigma=0.0, clip=clip, batch=batch, mode=mode)
        ]
    )
    factors = torch.clamp(clip / (norms + 1e-6), max=1.0)
    assert torch.allclose(clipped, (raw * factors[:, None]).sum(0) / batch, atol=1e-5, rtol=1e-4)

    # σ > 0: the update differs from the noiseless one by N(0, (σC/B)²) in every coordinate.
    sigma = 2.0
    noisy = torch.cat(
        [
            g.flatten()
            for g in _one_step_grads(network, x, y, sigma=sigma, clip=clip, batch=batch, mode=mode)
        ]
    )
    noise = (noisy - clipped).double()
    scale = sigma * clip / batch
    n = noise.numel()
    assert n > 200
    assert abs(float(noise.mean())) < 4 * scale / math.sqrt(n)
    assert float(noise.std()) == pytest.approx(scale, rel=5 / math.sqrt(n))


def test_gradient_accumulation_equals_one_physical_batch(digits: Path, tmp_path: Path) -> None:
    config = _digits_config(digits, tmp_path / "m.sealed")
    config.dpsgd = replace(config.dpsgd, epochs=2, optimizer="sgd", learning_rate=0.5)
    prepared = prepare(config)
    whole = fit_model(config, prepared)
    config.dpsgd = replace(config.dpsgd, max_physical_batch_size=16)
    pieces = fit_model(config, prepared)
    x = prepared.features(prepared.test)
    assert np.max(np.abs(whole.predict_proba(x) - pieces.predict_proba(x))) < 1e-3


def test_secure_rng() -> None:
    reference = torch.zeros(1)
    draws = dpsgd.secure_normal((200_000,), 3.0, reference).double()
    assert abs(float(draws.mean())) < 0.05
    assert float(draws.std()) == pytest.approx(3.0, rel=0.02)
    sampler = dpsgd._Sampler(100_000, 0.03, torch.device("cpu"), secure=True, seed=None)
    assert len(sampler.draw()) == pytest.approx(3000, abs=250)
    # A run with secure randomness: the same mechanism, Opacus's accountant agrees.
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (300, 4))
    y = (x[:, 0] > 0).astype(np.int64)
    plan = dpsgd_plan(2.0, DELTA, batch_size=50, dataset_rows=300, epochs=3)
    settings = dpsgd.DpSgdSettings(dataset_rows=300, batch_size=50, epochs=3, secure_rng=True)
    fitted = dpsgd.fit(
        "mlp", classes=np.array([0, 1]), x=x, y=y, plan=plan, settings=settings, seed=None
    )
    assert fitted.stats["secureRng"] is True


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    parser = argparse.ArgumentParser(prog="veil")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


def test_cli_trains_a_cnn_and_refuses_bad_requests(
    digits: Path, tmp_path: Path, model_key: rsa.RSAPrivateKey, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = tmp_path / "key.pem"
    pem.write_bytes(
        model_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    base = [
        "--dataset", str(digits), "--target", "target", "--classes", "0,1,2,3,4,5,6,7,8,9",
        "--default-bounds", "0:16", "--epsilon", "2", "--delta", "1e-5",
        "--public-key", str(pem), "--seed", "1",
    ]  # fmt: skip
    output = tmp_path / "cnn.sealed"
    code, result, err = run(
        [
            *base, "--family", "cnn", "--input-shape", "8,8", "--channels", "8,16",
            "--hidden", "none", "--dataset-rows", "1797", "--epochs", "2",
            "--batch-size", "200", "--max-physical-batch-size", "64", "--output", str(output),
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    section = result["dpsgd"]
    assert result["mechanisms"] == [
        {
            "type": "dpsgd",
            "samplingRate": 200 / 1797,
            "noiseMultiplier": section["noiseMultiplier"],
            "steps": math.ceil(2 * 1797 / 200),
        }
    ]
    assert section["network"]["inputShape"] == [1, 8, 8]
    assert section["opacusEpsilon"]["rdp"] <= 2.0
    assert section["opacusEpsilon"]["prv"] <= 2.0
    assert section["epsilonRdp"] <= 2.0
    assert result["onnx"]["check"]["labelAgreement"] == 1.0
    assert result["notes"] == ["no accuracy: evaluationEpsilon is 0, so every usable row trained"]
    assert "torch" in result["versions"]
    assert "opacus" in result["versions"]
    served = OnnxModel.from_bytes("cnn", unseal_file(output, model_key))
    label, proba = served.run(
        {"input": pd.read_csv(digits).drop(columns="target").to_numpy(np.float32)[:5]},
        ["label", "probabilities"],
    )
    assert label.shape == (5,)
    assert proba.shape == (5, 10)

    refusals = {
        "datasetRows": ["--family", "mlp"],
        "delta": ["--family", "mlp", "--dataset-rows", "1797", "--delta", "0"],
        "input shape": ["--family", "cnn", "--dataset-rows", "1797", "--input-shape", "7,7"],
        "above ε": ["--family", "mlp", "--dataset-rows", "1797", "--noise-multiplier", "0.3"],
        "batch size": ["--family", "mlp", "--dataset-rows", "100", "--batch-size", "200"],
    }
    for message, extra in refusals.items():
        code, _, err = run([*base, *extra, "--output", str(tmp_path / "x")], capsys)
        assert code == 2, (message, err)
        assert message in err, err
        assert not (tmp_path / "x").exists()


def test_refusals_need_nothing_but_the_request(digits: Path, tmp_path: Path) -> None:
    config = _digits_config(digits, tmp_path / "m.sealed", family="cnn")
    config.dpsgd = replace(config.dpsgd, input_shape=None)
    with pytest.raises(TrainingRefusedError, match="input shape"):
        prepare(config)
    config.dpsgd = replace(config.dpsgd, input_shape=(8, 8), grad_sample_mode="nope")
    with pytest.raises(TrainingRefusedError, match="grad sample mode"):
        prepare(config)
