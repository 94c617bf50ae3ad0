"""SyntheticDataset on the real control plane: budget claim, hardened Job, status from report.

kwok runs the Job's pod as a fake that succeeds; the synthesis itself runs here as a local
process of the same entrypoint with the Job's own arguments, and the operator reads its
report back exactly as it would in a cluster. A Job that must stay running asks for more CPU
than any fake node has, so its pod is never scheduled.
"""

from __future__ import annotations

import json
import shutil
import time
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
    restricted_namespace,
    run_operator_code,
    run_veil,
    wait_for,
    wait_for_condition,
)
from veil import API_GROUP, API_VERSION
from veil.api.synthetic_dataset import SyntheticDatasetSpec
from veil.conditions import kstatus_violations
from veil.privacy import Ledger
from veil.resources.synthetic_dataset import job_name, synthesize_args

NAMESPACE = "veil-synthesis"
# The declared domains of the source: public bounds and the 0/1 label.
COLUMNS = [
    {"name": "radius", "type": "numeric", "lower": 6, "upper": 29},
    {"name": "texture", "type": "numeric", "lower": 9, "upper": 40},
    {"name": "malignant", "type": "categorical", "values": ["0", "1"]},
]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame = frame[["mean radius", "mean texture", "target"]]
    frame.columns = ["radius", "texture", "malignant"]
    path = tmp_path_factory.mktemp("data") / "cancer.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def objects(
    operator: OperatorProcess, crds: LocalCluster, api: client.ApiClient, source: Path
) -> Any:
    restricted_namespace(crds, NAMESPACE)
    api_objects = client.CustomObjectsApi(api)
    create_budget(api_objects, NAMESPACE, "cancer-study", epsilon=1.2, dataset_uri=source.as_uri())
    return api_objects


def dataset(name: str, source: Path, epsilon: float, report_epsilon: float = 0.0) -> dict[str, Any]:
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
                "reportEpsilon": report_epsilon,
                "columns": COLUMNS,
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
    manifest = dataset("cancer-synthetic", source, epsilon=1.0, report_epsilon=0.1)
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
    # Only the DP estimate, paid from reportEpsilon: no exact figure of the source.
    quality = status["quality"]
    assert quality["kind"] == "dpEstimate"
    assert quality["oneWayTvd"]["mean"] < quality["uniformOneWayTvd"]["mean"]
    assert "DP estimate" in condition(obj, "Ready")["message"]
    assert set(status) <= {
        "observedGeneration",
        "conditions",
        "claimState",
        "jobName",
        "outputUri",
        "rows",
        "quality",
    }

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
    assert [m.type for m in claim.mechanisms] == ["zcdp", "gaussian"]
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


# --- a deleted Job never runs again on the same claim ---------------------------------------


@pytest.fixture(scope="module")
def registry(objects: Any, source: Path) -> Path:
    """A dataset of its own (one budget protects one dataset), with a budget for two runs."""
    copy = source.parent / "registry" / "cancer.csv"
    copy.parent.mkdir()
    shutil.copy(source, copy)
    create_budget(objects, NAMESPACE, "registry-study", epsilon=5.0, dataset_uri=copy.as_uri())
    return copy


def _jobs(api: client.ApiClient, name: str) -> list[Any]:
    return list(
        client.BatchV1Api(api)
        .list_namespaced_job(NAMESPACE, label_selector=f"app.kubernetes.io/instance={name}")
        .items
    )


def _delete_job_and_nudge(objects: Any, api: client.ApiClient, name: str) -> None:
    """Delete the dataset's Job, wait until it is gone, then make the operator reconcile."""
    batch = client.BatchV1Api(api)
    batch.delete_namespaced_job(
        job_name({"metadata": {"name": name}}), NAMESPACE, propagation_policy="Background"
    )
    wait_for(lambda: not _jobs(api, name), timeout=60, what="the Job deleted")
    objects.patch_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        NAMESPACE,
        "syntheticdatasets",
        name,
        {"metadata": {"labels": {"nudged": "yes"}}},
    )


def _never_again(objects: Any, api: client.ApiClient, name: str, seconds: float = 8) -> None:
    """No Job for `name` for a while, and exactly one claim of its, Consumed."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert _jobs(api, name) == [], "the Job was created again"
        time.sleep(0.5)
    budget = objects.get_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "privacybudgets", "registry-study"
    )
    ledger = Ledger.from_wire(budget["status"]["ledger"])
    uid = get(objects, name)["metadata"]["uid"]
    assert [k for k in ledger.claims if k.startswith(uid)] == [uid]
    assert ledger.claims[uid].state == "Consumed"


def _registry_dataset(name: str, registry: Path, **spec: Any) -> dict[str, Any]:
    manifest = dataset(name, registry, epsilon=1.0)
    manifest["spec"]["budgetRef"] = {"name": "registry-study"}
    manifest["spec"].update(spec)
    return manifest


def test_a_finished_dataset_whose_job_is_deleted_stays_ready(
    objects: Any, registry: Path, api: client.ApiClient
) -> None:
    manifest = _registry_dataset("kept-synthetic", registry)
    run_veil(synthesize_args(SyntheticDatasetSpec.model_validate(manifest["spec"])))
    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "syntheticdatasets", manifest
    )
    wait_for_condition(lambda: get(objects, "kept-synthetic"), "Ready", "True", timeout=120)

    _delete_job_and_nudge(objects, api, "kept-synthetic")
    _never_again(objects, api, "kept-synthetic")
    obj = get(objects, "kept-synthetic")
    assert condition(obj, "Ready")["status"] == "True"
    assert condition(obj, "Ready")["reason"] == "Synthesized"
    assert obj["status"]["outputUri"] == manifest["spec"]["output"]["uri"]


def test_an_unfinished_dataset_whose_job_is_deleted_stalls(
    objects: Any, registry: Path, api: client.ApiClient, cluster: LocalCluster
) -> None:
    # More CPU than any node has: the pod is never scheduled, the Job never finishes.
    manifest = _registry_dataset("lost-synthetic", registry, resources={"requests": {"cpu": "64"}})
    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "syntheticdatasets", manifest
    )
    wait_for(lambda: _jobs(api, "lost-synthetic"), timeout=60, what="the Job created")
    # Recorded as it was created: from here on it is never created again.
    wait_for(
        lambda: (get(objects, "lost-synthetic").get("status") or {}).get("jobName"),
        what="status.jobName",
    )
    # The dataset as a watch event read before that record carries it.
    stale = get(objects, "lost-synthetic")
    for recorded in ("jobName", "claimState"):
        stale["status"].pop(recorded, None)

    _delete_job_and_nudge(objects, api, "lost-synthetic")
    obj = wait_for_condition(lambda: get(objects, "lost-synthetic"), "Stalled", "True")
    assert condition(obj, "Stalled")["reason"] == "JobLost"
    assert "create a new SyntheticDataset" in condition(obj, "Stalled")["message"]
    _never_again(objects, api, "lost-synthetic")
    assert kstatus_violations(get(objects, "lost-synthetic")) == []

    # A pass deciding on the stale copy: its claim is Consumed already, so the budget says
    # go; only the record stops it from making the Job again, a second read on one claim.
    verdict = run_operator_code(cluster.kubeconfig, _CONVERGE, stale)
    assert verdict["reason"] == "JobLost"
    _never_again(objects, api, "lost-synthetic", seconds=3)


_CONVERGE = """
import json, sys
from veil.api.synthetic_dataset import SyntheticDatasetSpec
from veil.controllers.synthetic_dataset import converge

owner = json.load(sys.stdin)
result = converge(owner, SyntheticDatasetSpec.model_validate(owner["spec"]))
print(json.dumps({"reason": result.outcome.reason}))
"""
