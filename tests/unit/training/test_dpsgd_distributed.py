"""Distributed DP-SGD: two replicas on CPU (gloo), as a PyTorchJob's pods run `veil train`
(MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK), and as torch.multiprocessing workers for what
only the processes can show (their parameters, their noise). The run must be the claim's
DP-SGD event, exactly as in one process: each training row in one replica's chunk, sampled
at q there, the noise N(0, σ²C²) added once to the global sum, divided by the batch B.
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.unit.training.test_dpsgd import run
from tests.unit.training.test_train import _descr_bounds
from veil.runtime.model import OnnxModel
from veil.runtime.sealing import unseal_file
from veil.training import data, distributed, dpsgd
from veil.training.claim import claim_mechanisms, dpsgd_plan
from veil.training.options import plan_for
from veil.training.train import TrainingConfig, fit_model, prepare, shard

DELTA = 1e-5
CANCER_ROWS = 569
WORLD = 2
JOIN_SECONDS = 240  # far past a run here (seconds), short of pytest's own 600 s


@pytest.fixture(scope="module")
def cancer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, tuple[float, float]]]:
    from sklearn.datasets import load_breast_cancer

    loaded = load_breast_cancer(as_frame=True)
    frame = loaded.frame
    frame.columns = [str(c).replace(" ", "_") for c in frame.columns]
    path = tmp_path_factory.mktemp("cancer") / "data.csv"
    frame.to_csv(path, index=False)
    return path, {k: (v[0], v[1]) for k, v in _descr_bounds(loaded.DESCR).items()}


@pytest.fixture(scope="module")
def model_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def launch(
    per_rank: list[list[str]], *, fresh: bool = True, timeout: float = 120
) -> list[tuple[int, str, str]]:
    """`veil <argv>` once per rank, with the environment the training operator gives a
    PyTorchJob's pods; (exit code, stdout, stderr) per rank. `fresh`: `python -m veil.cli`
    in new interpreters, as the pods run it; otherwise `veil.cli.main` in forked processes
    (the same program, without importing torch and Opacus again: seconds less)."""
    port = free_port()
    envs = [
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "WORLD_SIZE": str(len(per_rank)),
            "RANK": str(rank),
        }
        for rank in range(len(per_rank))
    ]
    if not fresh:
        return _launch_forked(per_rank, envs, timeout)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "veil.cli", *argv],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv, env in zip(per_rank, envs, strict=True)
    ]
    outcomes = []
    try:
        for process in processes:
            out, err = process.communicate(timeout=timeout)
            outcomes.append((process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return outcomes


def _warm() -> None:
    """Import here, once, what every forked rank would import for itself (seconds each)."""
    import importlib

    # torch._dynamo: torch's optimizers import it on first use.
    for module in ("onnx", "onnxruntime", "opacus", "torch._dynamo"):
        importlib.import_module(module)


def _forked_main(argv: list[str], env: dict[str, str], out: str, err: str) -> None:
    from veil.cli import main

    os.environ.update(env)
    with open(out, "w") as sys.stdout, open(err, "w") as sys.stderr:
        code = main(argv)
    sys.exit(code)


def _launch_forked(
    per_rank: list[list[str]], envs: list[dict[str, str]], timeout: float
) -> list[tuple[int, str, str]]:
    import multiprocessing
    import tempfile

    _warm()
    context = multiprocessing.get_context("fork")
    with tempfile.TemporaryDirectory(prefix="veil-ranks-") as tmp:
        files = [(f"{tmp}/{r}.out", f"{tmp}/{r}.err") for r in range(len(per_rank))]
        processes = [
            context.Process(target=_forked_main, args=(argv, env, *names))
            for argv, env, names in zip(per_rank, envs, files, strict=True)
        ]
        for process in processes:
            process.start()
        try:
            for process in processes:
                process.join(timeout)
        finally:
            for process in processes:
                if process.is_alive():
                    process.kill()
                    process.join()
        return [
            (
                -1 if process.exitcode is None else process.exitcode,
                Path(out).read_text(),
                Path(err).read_text(),
            )
            for process, (out, err) in zip(processes, files, strict=True)
        ]


def pem_file(key: rsa.RSAPrivateKey, path: Path) -> Path:
    path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return path


def test_two_replicas_train_one_model_and_claim_what_one_process_claims(
    cancer: tuple[Path, dict[str, tuple[float, float]]],
    tmp_path: Path,
    model_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path, bounds = cancer
    pem = pem_file(model_key, tmp_path / "key.pem")
    common = [
        "train", "--dataset", str(path), "--target", "target", "--classes", "0,1",
        "--family", "mlp", "--epsilon", "4", "--delta", str(DELTA),
        "--dataset-rows", str(CANCER_ROWS), "--epochs", "5", "--batch-size", "64",
        "--noise-multiplier", "1.5",
        "--hidden", "32", "--threads", "1", "--public-key", str(pem),
    ]  # fmt: skip
    common += [
        a for column, (low, high) in bounds.items() for a in ("--bounds", f"{column}={low}:{high}")
    ]
    outputs = [tmp_path / f"rank{r}.sealed" for r in range(WORLD)]
    # No --seed: the replicas must agree on rank 0's random salt.
    ranks = launch([[*common, "--output", str(outputs[r])] for r in range(WORLD)])
    (code0, out0, err0), (code1, out1, err1) = ranks
    assert code0 == 0, err0
    assert code1 == 0, err1
    assert out1 == "", "only rank 0 prints the result"
    assert not outputs[1].exists(), "only rank 0 writes the model"
    result = json.loads(out0)

    # The claim is the spec's DP-SGD event, as one process reports it for the same request.
    plan = dpsgd_plan(
        4.0, DELTA, batch_size=64, dataset_rows=CANCER_ROWS, epochs=5, noise_multiplier=1.5
    )
    assert result["mechanisms"] == claim_mechanisms(4.0, 0.0, DELTA, plan)
    for variable in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(variable, raising=False)
    code, single, err = run([*common[1:], "--output", str(tmp_path / "single.sealed")], capsys)
    assert code == 0, err
    assert result["mechanisms"] == single["mechanisms"]
    assert result["dpsgd"] == single["dpsgd"]

    # The sealed model (every row trained: no evaluation) beats the majority class.
    served = OnnxModel.from_bytes("mlp", unseal_file(outputs[0], model_key))
    frame = pd.read_csv(path)
    features = frame[list(bounds)].to_numpy(np.float32)
    label, _ = served.run({"input": features}, ["label", "probabilities"])
    truth = frame["target"].to_numpy()
    accuracy = float(np.mean(label == truth))
    majority = float(np.max(np.bincount(truth)) / len(truth))
    print({"accuracy": accuracy, "majority": majority})
    assert accuracy > majority + 0.2


def test_the_replicas_chunks_partition_the_training_rows(
    cancer: tuple[Path, dict[str, tuple[float, float]]], tmp_path: Path
) -> None:
    config = _config(cancer, tmp_path)
    prepared = prepare(config)
    training = ~prepared.test
    assert 0 < prepared.test.sum() < training.sum()
    chunks = [shard(prepared, distributed.World(r, 3)) for r in range(3)]
    assert (sum(c.astype(int) for c in chunks) == training.astype(int)).all()  # disjoint, cover
    assert all(c.sum() > training.sum() / 6 for c in chunks)  # keyed hash: roughly balanced
    assert (shard(prepared, distributed.SINGLE) == training).all()
    # A row's chunk is its own: the same with another row removed.
    fewer = replace(prepared.rows, digests=prepared.rows.digests[1:])
    again = data.tree_of(fewer.digests, 3)
    assert (again == data.tree_of(prepared.rows.digests, 3)[1:]).all()


def _config(cancer: tuple[Path, dict[str, tuple[float, float]]], tmp_path: Path) -> TrainingConfig:
    path, bounds = cancer
    return TrainingConfig(
        dataset_uri=str(path),
        target_column="target",
        family="mlp",
        epsilon=4.0,
        delta=DELTA,
        output_uri=str(tmp_path / "m.sealed"),
        classes=["0", "1"],
        bounds=bounds,
        evaluation_epsilon=0.5,  # rows held out, to measure on
        seed=5,
        dpsgd=dpsgd.DpSgdSettings(
            epochs=5,
            batch_size=64,
            dataset_rows=CANCER_ROWS,
            noise_multiplier=1.5,
            hidden=(32,),
            threads=1,
        ),
    )


def _spawn(worker: Any, *args: Any) -> None:
    """`worker(rank, *args)` on WORLD processes, to join by gloo on a free local port;
    forked, so that they start with this process's torch and Opacus (imports take seconds)."""
    _warm()
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    try:
        ranks = mp.start_processes(worker, args=args, nprocs=WORLD, join=False, start_method="fork")
        deadline = time.monotonic() + JOIN_SECONDS
        while not ranks.join(timeout=1):  # raises as soon as a rank fails
            if time.monotonic() > deadline:
                for process in ranks.processes:
                    process.kill()
                raise AssertionError(f"the {WORLD} ranks did not finish in {JOIN_SECONDS} s")
    finally:
        del os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"]


def _fit_worker(rank: int, config: TrainingConfig, out: str) -> None:
    """One replica of `train_replica`'s fit: rank 0's salt, this rank's chunk."""
    torch.set_num_threads(1)
    world = distributed.World(rank, WORLD)
    distributed.join(world, torch.device("cpu"))
    try:
        # Rank 0's salt (the seed's) for all: rank 1 offers a random one of its own.
        salt = distributed.broadcast_bytes(data.run_salt(config.seed if rank == 0 else None))
        prepared = prepare(config, salt)
        model = fit_model(config, prepared, world)
    finally:
        distributed.leave()
    torch.save(
        {
            "salt": salt,
            "state": model.network.state_dict(),
            "sampled": model.stats["_sampled"],
            "chunk": int(shard(prepared, world).sum()),
            "training": int((~prepared.test).sum()),
        },
        Path(out) / f"rank{rank}.pt",
    )


def test_replicas_hold_one_model_sampled_at_q(
    cancer: tuple[Path, dict[str, tuple[float, float]]], tmp_path: Path
) -> None:
    config = _config(cancer, tmp_path)
    plan = plan_for(config.epsilon, config.delta, config.dpsgd)
    _spawn(_fit_worker, config, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    assert ranks[0]["salt"] == ranks[1]["salt"], "the replicas split with different salts"
    first, second = ranks[0]["state"], ranks[1]["state"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first), "the replicas diverged"

    # The chunks cover the training rows once; the union of the local batches is Poisson(q)
    # over them: about q × rows × T rows in all (within 5 standard deviations).
    rows = ranks[0]["training"]
    assert sum(r["chunk"] for r in ranks) == rows
    expected = plan.sampling_rate * rows * plan.steps
    spread = math.sqrt(rows * plan.steps * plan.sampling_rate * (1 - plan.sampling_rate))
    sampled = sum(r["sampled"] for r in ranks)
    assert abs(sampled - expected) < 5 * spread, (sampled, expected)

    # The model beats the majority class on the held-out rows.
    prepared = prepare(config)  # --seed: the same split as the replicas'
    network = dpsgd.build_network("mlp", len(prepared.plan.features), 2, config.dpsgd)
    network.load_state_dict(first)
    fitted = dpsgd.DpSgdFit(network.eval(), prepared.plan.classes.array(), "mlp", plan)
    test = prepared.test
    accuracy = float(np.mean(fitted.predict(prepared.features(test)) == prepared.labels(test)))
    majority = float(np.max(np.bincount(prepared.rows.y[test])) / test.sum())
    print({"accuracy": accuracy, "majority": majority})
    assert accuracy > majority + 0.2


# One DP-SGD step on 64 rows of 30 features (SGD at rate 1: the update is the gradient).
ROWS, FEATURES, CLIP, SIGMA = 64, 30, 0.5, 2.0


def _step_data() -> tuple[torch.Tensor, torch.Tensor, torch.nn.Module, dpsgd.DpSgdSettings]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(ROWS, FEATURES, generator=generator) * 3
    y = torch.randint(0, 2, (ROWS,), generator=generator)
    settings = dpsgd.DpSgdSettings(
        dataset_rows=1000,
        batch_size=ROWS,
        max_grad_norm=CLIP,
        hidden=(64,),
        optimizer="sgd",
        learning_rate=1.0,
        momentum=0.0,
        max_physical_batch_size=16,  # accumulated over physical batches, as in training
    )
    torch.manual_seed(1)
    return x, y, dpsgd.build_network("mlp", FEATURES, 2, settings), settings


def _update(
    network: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: dpsgd.DpSgdSettings,
    sigma: float,
    *,
    wrap: bool,
) -> tuple[torch.Tensor, Any]:
    """The flat update of one private step on all of (x, y) (θ before − θ after)."""
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel

    plan = dpsgd_plan(1e3, DELTA, batch_size=ROWS, dataset_rows=1000, epochs=1, noise_multiplier=1)
    plan = replace(plan, noise_multiplier=sigma)
    module: torch.nn.Module = copy.deepcopy(network)
    if wrap:
        module = DifferentiallyPrivateDistributedDataParallel(module)
    before = torch.cat([p.detach().flatten() for p in module.parameters()])
    private = dpsgd.make_private(module, plan, settings, torch.device("cpu"), seed=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        chosen = torch.arange(len(x))
        dpsgd.private_step(private, x, y, chosen, settings.max_physical_batch_size)
    after = torch.cat([p.detach().flatten() for p in module.parameters()])
    return before - after, private.optimizer


def _step_worker(rank: int, out: str) -> None:
    """Each rank steps on its half of the rows (rank 1: none, in the `empty` cases)."""
    torch.set_num_threads(1)
    distributed.join(distributed.World(rank, WORLD), torch.device("cpu"))
    x, y, network, settings = _step_data()
    results: dict[str, Any] = {}
    try:
        for mode in ("ghost", "hooks"):
            for secure in (False, True):
                for empty in (False, True):
                    chosen = torch.arange(rank, ROWS, WORLD)
                    if empty and rank == 1:
                        chosen = chosen[:0]
                    case = replace(settings, grad_sample_mode=mode, secure_rng=secure)
                    for sigma in (0.0, SIGMA):
                        update, optimizer = _update(
                            network, x[chosen], y[chosen], case, sigma, wrap=True
                        )
                        results[f"{mode}/{secure}/{empty}/{sigma}"] = update
                    results[f"{mode}/class"] = type(optimizer).__name__
                    results[f"{mode}/divisor"] = optimizer.expected_batch_size
    finally:
        distributed.leave()
    torch.save(results, Path(out) / f"rank{rank}.pt")


def test_noise_is_added_once_for_the_global_batch(tmp_path: Path) -> None:
    _spawn(_step_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    x, y, network, settings = _step_data()
    scale = SIGMA * CLIP / ROWS  # one process: N(0, (σC/B)²) per coordinate
    for mode in ("ghost", "hooks"):
        case = replace(settings, grad_sample_mode=mode)
        assert "Distributed" in ranks[0][f"{mode}/class"]  # Opacus's distributed optimizer
        assert ranks[0][f"{mode}/divisor"] * WORLD == ROWS  # per replica B / W, as Opacus's
        # The noiseless update: Σ clip(g_i) / B over every replica's rows, as in one process.
        whole, single = _update(network, x, y, case, 0.0, wrap=False)
        first = _update(network, x[0::WORLD], y[0::WORLD], case, 0.0, wrap=False)[0]
        assert "Distributed" not in type(single).__name__
        for secure in (False, True):
            for empty in (False, True):
                key = f"{mode}/{secure}/{empty}"
                clean, noisy = ranks[0][f"{key}/0.0"], ranks[0][f"{key}/{SIGMA}"]
                # Every replica applies the same (all-reduced) update, noise included.
                for sigma in (0.0, SIGMA):
                    assert torch.equal(ranks[1][f"{key}/{sigma}"], ranks[0][f"{key}/{sigma}"])
                # Rank 1 with an empty batch still steps: the sum is rank 0's rows alone.
                expected = first if empty else whole
                assert torch.allclose(clean, expected, atol=1e-6, rtol=1e-4), key
                noise = (noisy - clean).double()
                n = noise.numel()
                assert n > 2000
                assert abs(float(noise.mean())) < 5 * scale / math.sqrt(n), key
                # σC/B, not √W σC/B (noise from every replica) nor σC/(B/W) (a local divisor).
                assert float(noise.std()) == pytest.approx(scale, rel=5 / math.sqrt(n)), key
