"""The DP training Job of a ConfidentialModel with `spec.training`. Pure."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from veil import labels
from veil.api.confidential_model import ConfidentialModelSpec
from veil.api.dpsgd import DPSGD_FAMILIES
from veil.config import OperatorConfig
from veil.resources.common import (
    child_metadata,
    restricted_container_security,
    restricted_pod_security,
    selector_labels,
    with_pod_settings,
    workload_identity_account,
)
from veil.resources.confidential_model import DNS_EGRESS
from veil.training import options

APP = "veil-trainer"
JOB = ("batch/v1", "Job")
# Kubeflow's training operator: one pod per worker, DistributedDataParallel between them.
PYTORCH_JOB = ("kubeflow.org/v1", "PyTorchJob")
# The training operator runs the replica container of this name.
PYTORCH_CONTAINER = "pytorch"
DEFAULT_RESOURCES: dict[str, dict[str, str]] = {
    "requests": {"cpu": "1", "memory": "2Gi"},
    "limits": {"cpu": "2", "memory": "4Gi"},
}


def run_id(spec: ConfidentialModelSpec) -> str:
    """A training run's identity: a digest of `spec.training`.

    A changed training spec is a new run: a new claim on the budget, a new Job. The same spec
    is the same run, however often it is reconciled, so a run is paid for and trained once.
    """
    assert spec.training is not None
    wire = json.dumps(spec.training.to_wire(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(wire.encode()).hexdigest()[:10]


def job_name(owner: Mapping[str, Any], spec: ConfidentialModelSpec) -> str:
    return f"{owner['metadata']['name'][:45]}-train-{run_id(spec)}"


def identity_name(owner: Mapping[str, Any]) -> str:
    """The ServiceAccount and NetworkPolicy every run shares."""
    return f"{owner['metadata']['name'][:56]}-train"


def result_uri(spec: ConfidentialModelSpec) -> str:
    assert spec.training is not None
    # Per run, so an earlier run's result is never taken for this one's.
    return f"{spec.training.output_uri}.result-{run_id(spec)}.json"


def trainer_image(spec: ConfidentialModelSpec, config: OperatorConfig) -> str | None:
    """The image that trains `spec`: the runtime's for diffprivlib families, the trainer
    image (torch and Opacus) for DP-SGD ones; None when that one is not configured."""
    assert spec.training is not None
    if spec.training.family in DPSGD_FAMILIES:
        return config.images.trainer
    return config.images.runtime


def train_args(spec: ConfidentialModelSpec) -> list[str]:
    """`veil train` as the Job runs it: the model is sealed to the model's Key Vault key."""
    training = spec.training
    assert training is not None
    args = [
        "train",
        "--dataset",
        training.dataset_uri,
        "--target",
        training.target_column,
        "--family",
        training.family,
        "--epsilon",
        repr(training.epsilon),
        "--delta",
        repr(training.delta),
        "--output",
        training.output_uri,
        "--result",
        result_uri(spec),
        "--vault-url",
        spec.key_release.key_vault().vault_url,
        "--key-name",
        spec.key_release.key_vault().key_name,
    ]
    # The label set is public and declared; the API forbids commas inside a label.
    args += ["--classes", ",".join(training.classes)]
    if training.evaluation_epsilon > 0:
        args += ["--evaluation-epsilon", repr(training.evaluation_epsilon)]
        args += ["--test-fraction", repr(training.test_fraction)]
    if training.features:
        args += ["--features", ",".join(training.features)]
    for bound in training.bounds:
        args += ["--bounds", f"{bound.column}={bound.lower!r}:{bound.upper!r}"]
    args += options.flags(training)
    if training.gpus:
        args += ["--device", "cuda"]  # fail loudly, rather than train on CPU, without a GPU
    return args


def workload_kind(spec: ConfidentialModelSpec) -> tuple[str, str]:
    """(apiVersion, kind) of the run's workload: a PyTorchJob for more than one worker."""
    assert spec.training is not None
    return PYTORCH_JOB if (spec.training.workers or 1) > 1 else JOB


def suspended(workload: Mapping[str, Any]) -> bool:
    spec = workload.get("spec") or {}
    if workload.get("kind") == PYTORCH_JOB[1]:
        return bool((spec.get("runPolicy") or {}).get("suspend"))
    return bool(spec.get("suspend"))


def resume_patch(kind: str) -> dict[str, Any]:
    """The merge patch that lets a suspended workload of `kind` run."""
    if kind == PYTORCH_JOB[1]:
        return {"spec": {"runPolicy": {"suspend": False}}}
    return {"spec": {"suspend": False}}


def _resources(spec: ConfidentialModelSpec) -> dict[str, Any]:
    assert spec.training is not None
    given = spec.training.resources
    resources: dict[str, dict[str, str]] = (
        {key: dict(value) for key, value in given.to_wire().items() if value}
        if given is not None
        else {key: dict(value) for key, value in DEFAULT_RESOURCES.items()}
    )
    if spec.training.gpus:
        # Extended resources are requested by their limit (a request, if any, must equal it).
        for part in ("requests", "limits"):
            resources.setdefault(part, {})[labels.GPU_RESOURCE] = str(spec.training.gpus)
    return resources


def _placement(spec: ConfidentialModelSpec) -> dict[str, Any]:
    """Confidential capacity, GPU nodes among it when GPUs are asked for: the trainer sees
    the raw data."""
    assert spec.training is not None
    selector = {labels.CVM_SECURITY_TYPE_LABEL: labels.CVM_SECURITY_TYPE}
    tolerations = [
        {"key": labels.CONFIDENTIAL_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
    ]
    if spec.training.gpus:
        selector[labels.GPU_ACCELERATOR_LABEL] = labels.GPU_ACCELERATOR
        tolerations.append(
            {"key": labels.GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}
        )
    return {"nodeSelector": selector, "tolerations": tolerations}


def children(
    owner: Mapping[str, Any],
    spec: ConfidentialModelSpec,
    config: OperatorConfig,
    *,
    suspended: bool = False,
) -> list[dict[str, Any]]:
    """The trainer's identity, network policy and workload (a Job, or a PyTorchJob for more
    than one worker); `suspended` makes it without pods (it cannot read the data until its
    run is recorded and it is resumed)."""
    name, identity = job_name(owner, spec), identity_name(owner)
    template = _pod_template(owner, spec, config, identity)
    workload = (
        _job(owner, spec, name, template, suspended)
        if workload_kind(spec) == JOB
        else _pytorch_job(owner, spec, name, template, suspended)
    )
    policy: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(owner, identity, APP, "network"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(owner, APP)},
            "policyTypes": ["Ingress", "Egress"],
            "egress": [DNS_EGRESS, {"ports": [{"protocol": "TCP", "port": 443}]}],
        },
    }
    if workload_kind(spec) == PYTORCH_JOB:
        # The workers rendezvous and all-reduce with one another (on ports they pick).
        peers = [{"podSelector": {"matchLabels": selector_labels(owner, APP)}}]
        policy["spec"]["ingress"] = [{"from": peers}]
        policy["spec"]["egress"].append({"to": peers})
    return [workload_identity_account(owner, identity, APP), policy, workload]


def _pod_template(
    owner: Mapping[str, Any],
    spec: ConfidentialModelSpec,
    config: OperatorConfig,
    identity: str,
) -> dict[str, Any]:
    pod_labels = {
        **selector_labels(owner, APP),
        labels.OWNER_KIND: owner["kind"],
        labels.WORKLOAD_IDENTITY_USE: "true",
    }
    container_name = "train" if workload_kind(spec) == JOB else PYTORCH_CONTAINER
    return {
        "metadata": {"labels": pod_labels},
        "spec": with_pod_settings(
            {
                "restartPolicy": "Never",
                "serviceAccountName": identity,
                "automountServiceAccountToken": False,
                "enableServiceLinks": False,
                "securityContext": restricted_pod_security(),
                **_placement(spec),
                "containers": [
                    {
                        "name": container_name,
                        "image": trainer_image(spec, config) or config.images.runtime,
                        "args": train_args(spec),
                        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                        "resources": _resources(spec),
                        "securityContext": restricted_container_security(),
                    }
                ],
                "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}],
            },
            config.pods,
        ),
    }


def _job(
    owner: Mapping[str, Any],
    spec: ConfidentialModelSpec,
    name: str,
    template: dict[str, Any],
    suspended: bool,
) -> dict[str, Any]:
    return {
        "apiVersion": JOB[0],
        "kind": JOB[1],
        "metadata": child_metadata(owner, name, APP, "training"),
        "spec": {
            "suspend": suspended,
            "backoffLimit": 2,
            "activeDeadlineSeconds": 21600,
            "template": template,
        },
    }


def _pytorch_job(
    owner: Mapping[str, Any],
    spec: ConfidentialModelSpec,
    name: str,
    template: dict[str, Any],
    suspended: bool,
) -> dict[str, Any]:
    """One master and workers - 1 workers, each a pod of `template`; the training operator
    gives them MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK."""
    assert spec.training is not None
    workers = spec.training.workers or 1

    def replicas(count: int) -> dict[str, Any]:
        return {"replicas": count, "restartPolicy": "Never", "template": template}

    return {
        "apiVersion": PYTORCH_JOB[0],
        "kind": PYTORCH_JOB[1],
        "metadata": child_metadata(owner, name, APP, "training"),
        "spec": {
            "runPolicy": {
                "suspend": suspended,
                "backoffLimit": 2,
                "activeDeadlineSeconds": 21600,
                "cleanPodPolicy": "None",
            },
            "pytorchReplicaSpecs": {"Master": replicas(1), "Worker": replicas(workers - 1)},
        },
    }
