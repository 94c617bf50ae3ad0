"""The DP training Job of a ConfidentialModel with `spec.training`. Pure."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from veil import labels
from veil.api.confidential_model import ConfidentialModelSpec
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

APP = "veil-trainer"


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
    return args


def children(
    owner: Mapping[str, Any],
    spec: ConfidentialModelSpec,
    config: OperatorConfig,
    *,
    suspended: bool = False,
) -> list[dict[str, Any]]:
    """The trainer's identity, network policy and Job; `suspended` makes the Job without
    pods (it cannot read the data until its run is recorded and it is resumed)."""
    name, identity = job_name(owner, spec), identity_name(owner)
    pod_labels = {
        **selector_labels(owner, APP),
        labels.OWNER_KIND: owner["kind"],
        labels.WORKLOAD_IDENTITY_USE: "true",
    }
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": child_metadata(owner, name, APP, "training"),
        "spec": {
            "suspend": suspended,
            "backoffLimit": 2,
            "activeDeadlineSeconds": 21600,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": with_pod_settings(
                    {
                        "restartPolicy": "Never",
                        "serviceAccountName": identity,
                        "automountServiceAccountToken": False,
                        "enableServiceLinks": False,
                        "securityContext": restricted_pod_security(),
                        # The trainer sees the raw data: it runs on confidential capacity too.
                        "nodeSelector": {labels.CVM_SECURITY_TYPE_LABEL: labels.CVM_SECURITY_TYPE},
                        "tolerations": [
                            {
                                "key": labels.CONFIDENTIAL_TAINT_KEY,
                                "operator": "Exists",
                                "effect": "NoSchedule",
                            }
                        ],
                        "containers": [
                            {
                                "name": "train",
                                "image": config.images.runtime,
                                "args": train_args(spec),
                                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
                                "resources": {
                                    "requests": {"cpu": "1", "memory": "2Gi"},
                                    "limits": {"cpu": "2", "memory": "4Gi"},
                                },
                                "securityContext": restricted_container_security(),
                            }
                        ],
                        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}],
                    },
                    config.pods,
                ),
            },
        },
    }
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(owner, identity, APP, "network"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(owner, APP)},
            "policyTypes": ["Ingress", "Egress"],
            "egress": [DNS_EGRESS, {"ports": [{"protocol": "TCP", "port": 443}]}],
        },
    }
    return [workload_identity_account(owner, identity, APP), policy, job]
