"""A ConfidentialModel trained with DP: budget claim, training Job, sealed model rolled out.

kwok fakes the Job's pod; the trainer runs here as a local process with the Job's arguments,
and the operator picks its result up exactly as in a cluster.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.cluster.localcluster import LocalCluster
from tests.integration.conftest import REPO, AzureDoubles, OperatorProcess, wait_for
from veil import API_GROUP, API_VERSION
from veil.api.confidential_model import ConfidentialModelSpec
from veil.conditions import kstatus_violations
from veil.privacy import Ledger
from veil.resources.training import train_args

NAMESPACE = "veil-dp-training"


@pytest.fixture(scope="module")
def objects(operator: OperatorProcess, crds: LocalCluster, api: client.ApiClient) -> Any:
    crds.kubectl("create", "namespace", NAMESPACE)
    crds.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    budget = yaml.safe_load((REPO / "examples" / "dp-training" / "budget.yaml").read_text())
    budget["metadata"]["namespace"] = NAMESPACE
    budget["spec"].pop("unlock")
    api_objects = client.CustomObjectsApi(api)
    api_objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "privacybudgets", budget
    )
    return api_objects


def test_trained_model_is_paid_for_sealed_and_served(
    objects: Any,
    azure: AzureDoubles,
    api: client.ApiClient,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from sklearn.datasets import load_breast_cancer

    work = tmp_path_factory.mktemp("training")
    frame = load_breast_cancer(as_frame=True).frame
    frame = frame[["mean radius", "mean texture", "mean smoothness", "target"]]
    frame.columns = ["radius", "texture", "smoothness", "malignant"]
    frame.to_csv(work / "oncology.csv", index=False)
    model = yaml.safe_load((REPO / "examples" / "dp-training" / "model.yaml").read_text())
    model["metadata"]["namespace"] = NAMESPACE
    spec = model["spec"]
    spec["tee"].pop("nodePool")
    spec["keyRelease"]["vaultUrl"] = azure.key_vault.url
    spec["training"]["datasetUri"] = (work / "oncology.csv").as_uri()
    spec["training"]["outputUri"] = (work / "model.onnx.sealed").as_uri()

    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", model
    )
    # The operator creates the key and the training Job; the trainer then runs here with the
    # Job's own arguments, sealing through the Key Vault double.
    batch = client.BatchV1Api(api)
    job = wait_for(
        lambda: next(
            iter(
                batch.list_namespaced_job(
                    NAMESPACE, label_selector="app.kubernetes.io/instance=tumour-grader"
                ).items
            ),
            None,
        ),
        timeout=60,
        what="the training Job",
    )
    args = job.spec.template.spec.containers[0].args
    assert args == train_args(ConfidentialModelSpec.model_validate(spec))
    ran = subprocess.run(
        [sys.executable, "-m", "veil.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **azure.operator_env()},
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    result = json.loads((work / "model.onnx.sealed.result.json").read_text())
    assert result["accuracy"] > result["constantBaselineAccuracy"]
    assert result["sealed"]["keyId"].startswith(f"{azure.key_vault.url}/keys/tumour-grader/")

    def serving() -> dict[str, Any] | None:
        obj = objects.get_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", "tumour-grader"
        )
        ready = next(
            (c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {}
        )
        return obj if ready.get("status") == "True" else None

    obj = wait_for(serving, timeout=120, what="the trained model served")
    assert kstatus_violations(obj) == []
    status = obj["status"]
    assert status["claimState"] == "Consumed"
    assert status["trainedModel"]["sha256"] == result["sealed"]["sha256"]

    assert job.metadata.name == status["trainingJob"]
    assert job.spec.template.spec.node_selector == {
        "kubernetes.azure.com/security-type": "ConfidentialVM"
    }
    deployment = client.AppsV1Api(api).read_namespaced_deployment("tumour-grader", NAMESPACE)
    fetch = deployment.spec.template.spec.init_containers[0].args
    assert fetch[fetch.index("--sha256") + 1] == result["sealed"]["sha256"]
    assert fetch[fetch.index("--uri") + 1] == spec["training"]["outputUri"]

    budget = objects.get_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "privacybudgets", "oncology-records"
    )
    claim = Ledger.from_wire(budget["status"]["ledger"]).claims[obj["metadata"]["uid"]]
    assert claim.state == "Consumed"
    assert claim.mechanisms[0].type == "epsilonDelta"
