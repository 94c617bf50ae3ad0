"""SyntheticDataset on the real control plane: budget claim, hardened Job, status from report.

kwok runs the Job's pod as a fake that succeeds; the synthesis itself runs here as a local
process of the same entrypoint with the Job's own arguments, and the operator reads its
report back exactly as it would in a cluster.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster.localcluster import LocalCluster
from tests.integration.conftest import (
    OperatorProcess,
    condition,
    create_budget,
    run_veil,
    wait_for,
    wait_for_condition,
)
from veil import API_GROUP, API_VERSION
from veil.api.synthetic_dataset import SyntheticDatasetSpec
from veil.conditions import kstatus_violations
from veil.privacy import Ledger
from veil.resources.synthetic_dataset import synthesize_args

NAMESPACE = "veil-synthesis"


@pytest.fixture(scope="module")
def objects(operator: OperatorProcess, crds: LocalCluster, api: client.ApiClient) -> Any:
    crds.kubectl("create", "namespace", NAMESPACE)
    crds.kubectl("label", "namespace", NAMESPACE, "pod-security.kubernetes.io/enforce=restricted")
    api_objects = client.CustomObjectsApi(api)
    create_budget(api_objects, NAMESPACE, "cancer-study", epsilon=1.2)
    return api_objects


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame = frame[["mean radius", "mean texture", "target"]]
    frame.columns = ["radius", "texture", "malignant"]
    path = tmp_path_factory.mktemp("data") / "cancer.csv"
    frame.to_csv(path, index=False)
    return path


def dataset(name: str, source: Path, epsilon: float) -> dict[str, Any]:
    output = source.parent / f"{name}.csv"
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "SyntheticDataset",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "source": {"uri": source.as_uri(), "format": "csv"},
            "synthesizer": {
                "method": "mst",
                "epsilon": epsilon,
                "delta": 1e-6,
                "rows": 300,
                "categoricalColumns": ["malignant"],
                "bounds": [
                    {"column": "radius", "lower": 6, "upper": 29},
                    {"column": "texture", "lower": 9, "upper": 40},
                ],
            },
            "budgetRef": {"name": "cancer-study"},
            "output": {"uri": output.as_uri()},
            "resources": {"limits": {"cpu": "1", "memory": "2Gi"}},
        },
    }


def get(objects: Any, name: str) -> dict[str, Any]:
    found: dict[str, Any] = objects.get_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "syntheticdatasets", name
    )
    return found


def test_dataset_is_paid_for_synthesized_and_reported(
    objects: Any, source: Path, api: client.ApiClient
) -> None:
    manifest = dataset("cancer-synthetic", source, epsilon=1.0)
    # The Job's program, run here on the same inputs with the Job's own arguments.
    args = synthesize_args(SyntheticDatasetSpec.model_validate(manifest["spec"]))
    run_veil(args)

    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "syntheticdatasets", manifest
    )
    obj = wait_for_condition(lambda: get(objects, "cancer-synthetic"), "Ready", "True", timeout=120)
    assert kstatus_violations(obj) == []
    status = obj["status"]
    assert condition(obj, "Ready")["reason"] == "Synthesized"
    assert status["rows"] == 300
    assert status["claimState"] == "Consumed"
    assert (
        status["quality"]["oneWayTvd"]["mean"]
        < status["quality"]["uniformBaseline"]["oneWayTvdMean"]
    )

    job = client.BatchV1Api(api).read_namespaced_job(status["jobName"], NAMESPACE)
    container = job.spec.template.spec.containers[0]
    assert container.args == args, "the Job runs exactly what was run here"
    assert job.spec.template.spec.automount_service_account_token is False
    assert container.security_context.read_only_root_filesystem is True
    assert job.spec.backoff_limit == 2
    assert job.spec.active_deadline_seconds == 21600
    assert client.NetworkingV1Api(api).read_namespaced_network_policy(
        status["jobName"], NAMESPACE
    ).spec.policy_types == ["Ingress", "Egress"]

    budget = objects.get_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "privacybudgets", "cancer-study"
    )
    claim = Ledger.from_wire(budget["status"]["ledger"]).claims[obj["metadata"]["uid"]]
    assert claim.state == "Consumed"
    assert claim.mechanisms[0].type == "zcdp"
    report = json.loads(Path(source.parent / "cancer-synthetic.csv.report.json").read_text())
    assert report["rhoSpent"] <= claim.mechanisms[0].rho  # type: ignore[union-attr]

    # Paid for and read: the API server refuses a changed spec, and says what to do instead.
    def patch(body: dict[str, Any]) -> None:
        objects.patch_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, "syntheticdatasets", "cancer-synthetic", body
        )

    with pytest.raises(ApiException) as refused:
        patch({"spec": {"synthesizer": {"rows": 400}}})
    assert refused.value.status == 422
    message = json.loads(refused.value.body)["message"]
    assert "spec cannot change once the budget claim is Consumed" in message
    assert "create a new one" in message
    patch({"metadata": {"labels": {"team": "oncology"}}})  # labels are not the spec


def test_dataset_beyond_the_budget_is_denied(objects: Any, source: Path) -> None:
    # Two MST claims at ε 1 compose (zCDP, PLD) to ε 1.29 at δ 1e-5: above the 1.2 total.
    objects.create_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        NAMESPACE,
        "syntheticdatasets",
        dataset("too-expensive", source, epsilon=1.0),
    )
    obj = wait_for_condition(lambda: get(objects, "too-expensive"), "Stalled", "True", timeout=60)
    assert condition(obj, "Ready")["reason"] == "BudgetDenied"
    assert obj["status"]["claimState"] == "Denied"
    assert "jobName" not in obj["status"], "no Job without a grant"
    assert kstatus_violations(obj) == []


def test_deleting_the_dataset_removes_its_job(objects: Any, api: client.ApiClient) -> None:
    objects.delete_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "syntheticdatasets", "cancer-synthetic"
    )
    batch = client.BatchV1Api(api)
    wait_for(
        lambda: (
            not batch.list_namespaced_job(
                NAMESPACE, label_selector="app.kubernetes.io/instance=cancer-synthetic"
            ).items
        ),
        timeout=60,
        what="the Job garbage-collected",
    )
