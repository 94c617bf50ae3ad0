"""A ConfidentialModel's DP-SGD training stage as the operator renders it: `veil train`'s flags,
the claim, the Job's resources and placement, and the PyTorchJob of `workers` > 1."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from veil import labels
from veil.api.confidential_model import ConfidentialModelSpec
from veil.config import OperatorConfig
from veil.resources import training as build
from veil.training import options
from veil.training.commands import config_from_args, register
from veil.training.dpsgd import DpSgdSettings

OWNER = {
    "apiVersion": "veil.dev/v1alpha1",
    "kind": "ConfidentialModel",
    "metadata": {"name": "grader", "namespace": "ns", "uid": "u-1", "generation": 1},
}
# Every DP-SGD field set to something other than the trainer's default.
EVERY_FIELD: dict[str, Any] = {
    "datasetRows": 569,
    "epochs": 3,
    "batchSize": 64,
    "maxGradNorm": 0.75,
    "noiseMultiplier": 1.25,
    "hidden": [16, 8],
    "optimizer": "sgd",
    "learningRate": 0.05,
    "momentum": 0.5,
    "maxPhysicalBatchSize": 32,
    "gradSampleMode": "hooks",
    "secureRng": True,
}


def spec(**training: Any) -> ConfidentialModelSpec:
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
                "family": "mlp",
                "epsilon": 4.0,
                "delta": 1e-5,
                "datasetRows": 569,
                "bounds": [{"column": "radius", "lower": 6, "upper": 29}],
                "features": ["radius"],
                "outputUri": "az://acct/models/grader.sealed",
                **training,
            },
        }
    )


def parse(args: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="veil")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(args)


def test_every_option_is_a_spec_field_a_settings_field_and_a_flag() -> None:
    from veil.api.confidential_model import Training

    parser = argparse.ArgumentParser(prog="veil")
    subparsers = parser.add_subparsers(dest="command")
    register(subparsers)
    flags = {f for a in subparsers.choices["train"]._actions for f in a.option_strings}
    settings = set(DpSgdSettings.__dataclass_fields__)
    for option in (*options.OPTIONS, *options.RUN_OPTIONS):
        assert option.flag in flags, option
        assert option.name in settings, option
    for option in options.OPTIONS:
        assert option.name in Training.model_fields, option
    # And no DP-SGD setting is left without a way in.
    assert {o.name for o in (*options.OPTIONS, *options.RUN_OPTIONS)} == settings


def test_train_args_pass_each_dpsgd_field_once_and_the_trainer_reads_them_back() -> None:
    model = spec(**EVERY_FIELD)
    args = build.train_args(model)
    for option in options.OPTIONS:
        cnn_only = option.name in ("input_shape", "channels")  # refused on mlp
        assert args.count(option.flag) == (0 if cnn_only else 1), option
    assert args[args.index("--hidden") + 1] == "16,8"
    assert "--device" not in args  # no GPU asked for: the trainer's own choice
    config = config_from_args(parse(args))
    assert config.family == "mlp"
    assert config.delta == 1e-5
    assert config.dpsgd == options.spec_settings(model.training)
    assert config.dpsgd.secure_rng
    assert config.dpsgd.hidden == (16, 8)
    assert config.dpsgd.noise_multiplier == 1.25
    assert config.dpsgd.momentum == 0.5


def test_cnn_widths_and_an_empty_hidden_list_travel_as_flags() -> None:
    model = spec(family="cnn", inputShape=[1, 8, 8], channels=[4], hidden=[])
    args = build.train_args(model)
    assert args[args.index("--input-shape") + 1] == "1,8,8"
    assert args[args.index("--channels") + 1] == "4"
    assert args[args.index("--hidden") + 1] == "none"
    settings = config_from_args(parse(args)).dpsgd
    assert (settings.input_shape, settings.channels, settings.hidden) == ((1, 8, 8), (4,), ())


def test_a_diffprivlib_spec_passes_no_dpsgd_flag() -> None:
    model = ConfidentialModelSpec.model_validate(
        {**spec().model_dump(by_alias=True, exclude_none=True)}
        | {
            "training": {
                k: v
                for k, v in spec().training.to_wire().items()  # type: ignore[union-attr]
                if k not in ("family", "datasetRows", "delta")
            }
        }
    )
    args = build.train_args(model)
    assert not {o.flag for o in options.OPTIONS} & set(args)
    assert options.spec_plan(model.training) is None


def test_the_controller_claims_the_dpsgd_event_the_trainer_spends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from veil.controllers import training as controller
    from veil.training.train import claim_mechanisms, plan_of

    model = spec(epochs=2, batchSize=64, evaluationEpsilon=0.5)
    requests: list[Any] = []
    monkeypatch.setattr(controller, "pay_before_reading", lambda _r, req, _s: requests.append(req))
    assert controller._pay(OWNER, model, "run1", {}) is None
    (request,) = requests
    claimed = [m.model_dump(mode="json", by_alias=True) for m in request.mechanisms]
    job = config_from_args(parse(build.train_args(model)))
    plan = plan_of(job)
    assert plan is not None
    assert claimed == claim_mechanisms(job.epsilon, job.evaluation_epsilon, job.delta, plan)
    assert claimed[0] == {
        "type": "dpsgd",
        "samplingRate": 64 / 569,
        "noiseMultiplier": plan.noise_multiplier,
        "steps": 18,  # ⌈2 epochs × 569 rows / 64⌉
    }
    assert claimed[1] | {"count": 1} == {
        "type": "epsilonDelta",
        "epsilon": 0.5,
        "delta": 0.0,
        "count": 1,
    }


def _workload(model: ConfidentialModelSpec, config: OperatorConfig | None = None) -> Any:
    *_, workload = build.children(OWNER, model, config or OperatorConfig())
    return workload


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "Job":
        pod: dict[str, Any] = workload["spec"]["template"]["spec"]
    else:
        pod = workload["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    return pod


def test_the_job_takes_its_resources_from_the_spec() -> None:
    default = _pod(_workload(spec()))["containers"][0]["resources"]
    assert default == build.DEFAULT_RESOURCES
    asked = {"requests": {"cpu": "6", "memory": "24Gi"}, "limits": {"memory": "32Gi"}}
    container = _pod(_workload(spec(resources=asked)))["containers"][0]
    assert container["resources"] == asked
    assert labels.GPU_RESOURCE not in json.dumps(container)


def test_gpus_request_nvidia_gpus_on_confidential_gpu_nodes() -> None:
    model = spec(gpus=2, resources={"requests": {"cpu": "8"}})
    workload = _workload(model)
    pod = _pod(workload)
    (container,) = pod["containers"]
    assert container["resources"] == {
        "requests": {"cpu": "8", "nvidia.com/gpu": "2"},
        "limits": {"nvidia.com/gpu": "2"},
    }
    assert pod["nodeSelector"] == {
        "kubernetes.azure.com/security-type": "ConfidentialVM",
        "kubernetes.azure.com/accelerator": "nvidia",
    }
    tolerated = {(t["key"], t["effect"]) for t in pod["tolerations"]}
    assert tolerated == {("veil.dev/confidential", "NoSchedule"), ("nvidia.com/gpu", "NoSchedule")}
    args = container["args"]
    assert args[args.index("--device") + 1] == "cuda"
    # Without GPUs the pod stays off the GPU nodes' taint and selector.
    cpu = _pod(_workload(spec()))
    assert "kubernetes.azure.com/accelerator" not in cpu["nodeSelector"]
    assert [t["key"] for t in cpu["tolerations"]] == ["veil.dev/confidential"]


def test_one_worker_is_a_job_and_the_suspend_protocol_reads_it() -> None:
    model = spec(workers=1)
    assert build.workload_kind(model) == build.JOB
    *_, job = build.children(OWNER, model, OperatorConfig(), suspended=True)
    assert job["kind"] == "Job"
    assert build.suspended(job)
    assert build.resume_patch("Job") == {"spec": {"suspend": False}}


def test_workers_render_a_pytorchjob_of_one_master_and_the_other_workers() -> None:
    model = spec(workers=4, gpus=1)
    assert build.workload_kind(model) == build.PYTORCH_JOB
    account, policy, workload = build.children(OWNER, model, OperatorConfig(), suspended=True)
    assert (workload["apiVersion"], workload["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    assert workload["metadata"]["name"] == build.job_name(OWNER, model)
    assert workload["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    replicas = workload["spec"]["pytorchReplicaSpecs"]
    assert {role: r["replicas"] for role, r in replicas.items()} == {"Master": 1, "Worker": 3}
    for role in replicas.values():
        (container,) = role["template"]["spec"]["containers"]
        assert container["name"] == "pytorch"  # the container the training operator runs
        assert container["args"] == build.train_args(model)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert build.suspended(workload)
    assert workload["spec"]["runPolicy"]["suspend"] is True
    assert build.resume_patch("PyTorchJob") == {"spec": {"runPolicy": {"suspend": False}}}
    # The replicas reach one another, and only one another, beyond DNS and 443.
    peers = [{"podSelector": {"matchLabels": policy["spec"]["podSelector"]["matchLabels"]}}]
    assert policy["spec"]["ingress"] == [{"from": peers}]
    assert {"to": peers} in policy["spec"]["egress"]
    assert account["kind"] == "ServiceAccount"
    # A Job's policy admits nothing in.
    _, job_policy, _ = build.children(OWNER, spec(), OperatorConfig())
    assert "ingress" not in job_policy["spec"]


def test_a_pytorchjob_that_succeeded_is_complete() -> None:
    from veil.controllers.training import workload_outcome

    def job(kind: str, *conditions: tuple[str, str]) -> dict[str, Any]:
        return {
            "kind": kind,
            "status": {
                "conditions": [{"type": t, "status": "True", "message": m} for t, m in conditions]
            },
        }

    assert workload_outcome(job("PyTorchJob", ("Running", ""), ("Succeeded", "done"))) == (
        "Complete",
        "done",
    )
    assert workload_outcome(job("PyTorchJob", ("Failed", "OOM"))) == ("Failed", "OOM")
    assert workload_outcome(job("PyTorchJob", ("Running", ""))) == ("Running", "")
    assert workload_outcome(job("Job", ("Complete", "ok"))) == ("Complete", "ok")


def _public_key(tmp_path: Path) -> Path:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = tmp_path / "key.pem"
    pem.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return pem


def _local(args: list[str], pem: Path, **paths: Path) -> list[str]:
    """The Job's args with local paths and a public key in place of the vault."""
    vault = args.index("--vault-url")
    args = [*args[:vault], *args[vault + 4 :], "--public-key", str(pem)]
    for flag, path in paths.items():
        args[args.index(f"--{flag}") + 1] = str(path)
    return args


def test_a_pytorchjobs_replicas_train_together_and_spend_the_claim(tmp_path: Path) -> None:
    from sklearn.datasets import load_breast_cancer

    from tests.unit.training.test_dpsgd_distributed import launch
    from veil.training.train import claim_mechanisms

    loaded = load_breast_cancer(as_frame=True)
    frame = pd.DataFrame(
        {"radius": loaded.frame["mean radius"], "malignant": 1 - loaded.frame["target"]}
    )
    frame.to_csv(tmp_path / "oncology.csv", index=False)
    model = spec(workers=2, epochs=5, batchSize=64, noiseMultiplier=1.5, hidden=[8])
    pem = _public_key(tmp_path)
    per_rank = [  # the same args, but each rank's own output paths
        _local(
            build.train_args(model),
            pem,
            dataset=tmp_path / "oncology.csv",
            output=tmp_path / f"{r}.sealed",
            result=tmp_path / f"{r}.json",
        )
        for r in range(2)
    ]
    (code0, out0, err0), (code1, out1, err1) = launch(per_rank, fresh=False)
    assert (code0, code1) == (0, 0), (err0, err1)
    # Rank 0 writes the model and the result, the controller's claim; rank 1 only trained.
    result = json.loads(out0)
    assert json.loads((tmp_path / "0.json").read_text()) == result
    assert (tmp_path / "0.sealed").exists()
    assert out1 == ""
    assert not (tmp_path / "1.sealed").exists()
    assert not (tmp_path / "1.json").exists()
    plan = options.spec_plan(model.training)
    assert plan is not None
    assert result["mechanisms"] == claim_mechanisms(4.0, 0.0, 1e-5, plan)
    assert result["dpsgd"]["steps"] == plan.steps


def test_other_families_train_on_rank_0_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = _local(build.train_args(spec(workers=2)), _public_key(tmp_path))
    args[args.index("--family") + 1] = "logisticRegression"
    namespace = parse(args)
    read: list[str] = []

    def reads(_: Any, *__: Any) -> Any:
        read.append("rows")
        raise ValueError("stop here")

    monkeypatch.setattr("veil.training.train.prepare", reads)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert namespace.func(namespace) == 0
    assert read == [], "a peer of rank 0 read rows for a one-process family"
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="stop here"):
        namespace.func(namespace)  # rank 0 goes on to read, in one process
    assert read == ["rows"]
