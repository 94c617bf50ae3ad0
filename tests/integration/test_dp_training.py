"""A ConfidentialModel trained with DP: budget claim, training Job, sealed model rolled out.

kwok fakes the Job's pod; the trainer runs here as a local process with the Job's arguments,
and the operator picks its result up exactly as in a cluster.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.cluster.localcluster import LocalCluster
from tests.integration.conftest import (
    REPO,
    AzureDoubles,
    OperatorProcess,
    create_budget,
    restricted_namespace,
    run_operator_code,
    run_veil,
    wait_for,
)
from veil import API_GROUP, API_VERSION
from veil.api.confidential_model import ConfidentialModelSpec
from veil.artifacts import read_bytes
from veil.conditions import kstatus_violations
from veil.privacy import Ledger
from veil.resources.training import result_uri, run_id, train_args

NAMESPACE = "veil-dp-training"


@pytest.fixture(scope="module")
def oncology(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local copy of the oncology data: the one dataset the module's budget pays for."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame = frame[["mean radius", "mean texture", "mean smoothness", "target"]]
    frame.columns = ["radius", "texture", "smoothness", "malignant"]
    path = tmp_path_factory.mktemp("oncology") / "oncology.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def objects(
    operator: OperatorProcess, crds: LocalCluster, api: client.ApiClient, oncology: Path
) -> Any:
    restricted_namespace(crds, NAMESPACE)
    api_objects = client.CustomObjectsApi(api)
    # Two runs at ε 1 + 0.2 (evaluation) in the first test, one at 0.5 + 0.2 in the second.
    create_budget(api_objects, NAMESPACE, "oncology-records", 4.0, dataset_uri=oncology.as_uri())
    return api_objects


def _example_model(work: Path, azure: AzureDoubles, oncology: Path) -> dict[str, Any]:
    """examples/dp-training/model.yaml on the local oncology data, sealing locally."""
    model: dict[str, Any] = yaml.safe_load(
        (REPO / "examples" / "dp-training" / "model.yaml").read_text()
    )
    model["metadata"]["namespace"] = NAMESPACE
    spec = model["spec"]
    spec["tee"].pop("nodePool")
    spec["keyRelease"]["vaultUrl"] = azure.key_vault.url
    spec["training"]["datasetUri"] = oncology.as_uri()
    spec["training"]["outputUri"] = (work / "model.onnx.sealed").as_uri()
    return model


def _get(objects: Any) -> dict[str, Any]:
    found: dict[str, Any] = objects.get_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", "tumour-grader"
    )
    return found


def _ledger(objects: Any) -> Ledger:
    budget = objects.get_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "privacybudgets", "oncology-records"
    )
    return Ledger.from_wire(budget["status"]["ledger"])


def _train_as_the_job(
    batch: client.BatchV1Api, spec: dict[str, Any], azure: AzureDoubles
) -> tuple[Any, dict[str, Any]]:
    """Wait for this run's Job; run the trainer here with its arguments; return Job and result."""
    typed = ConfidentialModelSpec.model_validate(spec)
    job = wait_for(
        lambda: next(
            (
                j
                for j in batch.list_namespaced_job(
                    NAMESPACE, label_selector="app.kubernetes.io/instance=tumour-grader"
                ).items
                if j.metadata.name.endswith(run_id(typed))
            ),
            None,
        ),
        timeout=60,
        what="the training Job",
    )
    args = job.spec.template.spec.containers[0].args
    assert args == train_args(typed)
    run_veil(args, azure.operator_env())
    result = json.loads(read_bytes(result_uri(typed)))
    return job, result


def _serving(objects: Any, sha256: str) -> dict[str, Any] | None:
    obj = _get(objects)
    ready = next(
        (c for c in obj.get("status", {}).get("conditions", []) if c["type"] == "Ready"), {}
    )
    trained = obj.get("status", {}).get("trainedModel") or {}
    return obj if ready.get("status") == "True" and trained.get("sha256") == sha256 else None


def _deployed(api: client.ApiClient) -> tuple[str, str]:
    """(URI, sha256) of the sealed model the Deployment's fetch step pulls."""
    deployment = client.AppsV1Api(api).read_namespaced_deployment("tumour-grader", NAMESPACE)
    fetch = deployment.spec.template.spec.init_containers[0].args
    return fetch[fetch.index("--uri") + 1], fetch[fetch.index("--sha256") + 1]


def test_trained_model_is_paid_for_sealed_and_served(
    objects: Any,
    azure: AzureDoubles,
    api: client.ApiClient,
    oncology: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    model = _example_model(tmp_path_factory.mktemp("training"), azure, oncology)
    spec = model["spec"]
    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", model
    )
    # The operator creates the key and the training Job; the trainer then runs here with the
    # Job's own arguments, sealing through the Key Vault double.
    batch = client.BatchV1Api(api)
    job, result = _train_as_the_job(batch, spec, azure)
    # The only figure about the data is the paid, noisy accuracy estimate (judged over many
    # seeds in tests/unit/training; here the pipeline is).
    assert result["dpEstimates"] == [
        "evaluation.accuracy",
        "evaluation.noisyCorrect",
        "evaluation.noisyTotal",
    ]
    assert result["evaluation"]["epsilon"] == spec["training"]["evaluationEpsilon"]
    assert result["evaluation"]["accuracy"] is None or 0 <= result["evaluation"]["accuracy"] <= 1
    assert result["classes"] == [0, 1]
    assert not {"accuracy", "rows", "seconds"} & set(result)
    assert result["sealed"]["keyId"].startswith(f"{azure.key_vault.url}/keys/tumour-grader/")

    obj = wait_for(
        lambda: _serving(objects, result["sealed"]["sha256"]),
        timeout=120,
        what="the trained model served",
    )
    assert kstatus_violations(obj) == []
    status = obj["status"]
    assert status["claimState"] == "Consumed"
    assert job.metadata.name == status["trainingJob"]
    assert job.spec.template.spec.node_selector == {
        "kubernetes.azure.com/security-type": "ConfidentialVM"
    }
    assert _deployed(api) == (spec["training"]["outputUri"], result["sealed"]["sha256"])

    uid = obj["metadata"]["uid"]
    first_key = f"{uid}.{status['trainingRun']}"
    claim = _ledger(objects).claims[first_key]
    assert claim.state == "Consumed"
    # The claim paid for everything the run spent: the fit and the evaluation.
    claimed = [m.model_dump(mode="json", by_alias=True) for m in claim.mechanisms]
    assert sorted(claimed, key=json.dumps) == sorted(result["mechanisms"], key=json.dumps)

    # A finished run is never run again: deleting its Job brings no new Job and no new claim.
    batch.delete_namespaced_job(job.metadata.name, NAMESPACE, propagation_policy="Background")
    wait_for(lambda: not batch.list_namespaced_job(NAMESPACE).items, what="the Job gone")
    time.sleep(8)  # the Job's delete event and several resyncs
    assert batch.list_namespaced_job(NAMESPACE).items == []
    assert sorted(_ledger(objects).claims) == [first_key]
    assert _serving(objects, result["sealed"]["sha256"]) is not None

    # Raising training.round is a new run: a new claim, a new Job, a new model rolled out.
    objects.patch_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        NAMESPACE,
        "confidentialmodels",
        "tumour-grader",
        {"spec": {"training": {"round": 1}}},
    )
    spec["training"]["round"] = 1
    second_job, second = _train_as_the_job(batch, spec, azure)
    assert second_job.metadata.name != job.metadata.name
    assert second["sealed"]["sha256"] != result["sealed"]["sha256"]  # a fresh data key
    obj = wait_for(
        lambda: _serving(objects, second["sealed"]["sha256"]),
        timeout=120,
        what="the retrained model served",
    )
    ledger = _ledger(objects)
    second_key = f"{uid}.{obj['status']['trainingRun']}"
    assert sorted(ledger.claims) == sorted([first_key, second_key])
    assert {c.state for c in ledger.claims.values()} == {"Consumed"}
    assert _deployed(api) == (spec["training"]["outputUri"], second["sealed"]["sha256"])


def test_a_job_lost_before_it_finished_is_not_run_again_on_the_same_claim(
    *,
    objects: Any,
    azure: AzureDoubles,
    api: client.ApiClient,
    cluster: LocalCluster,
    oncology: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    model = _example_model(tmp_path_factory.mktemp("lost"), azure, oncology)
    model["metadata"]["name"] = "lost-grader"
    model["spec"]["keyRelease"]["keyName"] = "lost-grader"
    model["spec"]["training"]["epsilon"] = 0.5  # within what the test above left of the budget
    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", model
    )

    def recorded() -> dict[str, Any] | None:
        found: dict[str, Any] = objects.get_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", "lost-grader"
        )
        return found if (found.get("status") or {}).get("trainingJob") else None

    status = wait_for(recorded, timeout=60, what="the training Job recorded")["status"]
    batch = client.BatchV1Api(api)
    # The Job as a pass saw it a moment before it was deleted.
    seen = api.sanitize_for_serialization(
        batch.read_namespaced_job(status["trainingJob"], NAMESPACE)
    )
    batch.delete_namespaced_job(status["trainingJob"], NAMESPACE, propagation_policy="Background")

    def stalled() -> dict[str, Any] | None:
        found = objects.get_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", "lost-grader"
        )
        ready = next(c for c in found["status"]["conditions"] if c["type"] == "Ready")
        return ready if ready["reason"] == "TrainingJobLost" else None

    ready = wait_for(stalled, timeout=180, what="TrainingJobLost")
    assert "spec.training.round" in ready["message"]
    time.sleep(5)  # resyncs come and go; none brings the Job back
    jobs = batch.list_namespaced_job(
        NAMESPACE, label_selector="app.kubernetes.io/instance=lost-grader"
    ).items
    assert jobs == []
    uid = recorded()["metadata"]["uid"]  # type: ignore[index]
    claims = {k: c for k, c in _ledger(objects).claims.items() if k.startswith(uid)}
    assert list(claims) == [f"{uid}.{status['trainingRun']}"], "one claim, not a second"
    assert claims[f"{uid}.{status['trainingRun']}"].state == "Consumed"

    # A pass that saw the Job just before it went: it must not make it again either.
    run_operator_code(
        cluster.kubeconfig, _TRAIN_HAVING_SEEN, [recorded(), seen], azure.operator_env()
    )
    time.sleep(2)
    assert (
        batch.list_namespaced_job(
            NAMESPACE, label_selector="app.kubernetes.io/instance=lost-grader"
        ).items
        == []
    ), "the lost Job was created again"


_TRAIN_HAVING_SEEN = """
import json, sys
from veil.api.confidential_model import ConfidentialModelSpec
from veil.config import OperatorConfig
from veil.controllers import training
from veil.kube import apply

owner, seen = json.load(sys.stdin)
live_get = apply.get_object

def as_seen(api_version, kind, name, namespace, cache=None):
    return seen if kind == "Job" else live_get(api_version, kind, name, namespace, cache)

apply.get_object = as_seen
spec = ConfidentialModelSpec.model_validate(owner["spec"])
training.train(owner, spec, OperatorConfig.from_env(), {})
print("{}")
"""
