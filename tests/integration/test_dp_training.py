"""A ConfidentialModel trained with DP: budget claim, training Job, sealed model rolled out.

kwok fakes the Job's pod; the trainer runs here as a local process with the Job's arguments,
and the operator picks its result up exactly as in a cluster.
"""

from __future__ import annotations

import json
import math
import subprocess
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
from veil.training.options import spec_plan

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


def _model(objects: Any, name: str = "tumour-grader") -> dict[str, Any]:
    found: dict[str, Any] = objects.get_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", name
    )
    return found


def _ledger(objects: Any, budget: str = "oncology-records") -> Ledger:
    found = objects.get_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "privacybudgets", budget
    )
    return Ledger.from_wire((found.get("status") or {}).get("ledger") or {})


def _training_job(batch: client.BatchV1Api, name: str, typed: ConfidentialModelSpec) -> Any:
    """The Job of the model's current training run, once the operator made it."""
    return wait_for(
        lambda: next(
            (
                j
                for j in batch.list_namespaced_job(
                    NAMESPACE, label_selector=f"app.kubernetes.io/instance={name}"
                ).items
                if j.metadata.name.endswith(run_id(typed))
            ),
            None,
        ),
        timeout=60,
        what=f"the training Job of {name}",
    )


def _train_as_the_job(
    batch: client.BatchV1Api, spec: dict[str, Any], azure: AzureDoubles
) -> tuple[Any, dict[str, Any]]:
    """Wait for this run's Job; run the trainer here with its arguments; return Job and result."""
    typed = ConfidentialModelSpec.model_validate(spec)
    job = _training_job(batch, "tumour-grader", typed)
    args = job.spec.template.spec.containers[0].args
    assert args == train_args(typed)
    run_veil(args, azure.operator_env())
    result = json.loads(read_bytes(result_uri(typed)))
    return job, result


def _serving(objects: Any, sha256: str, name: str = "tumour-grader") -> dict[str, Any] | None:
    """The model, once Ready and serving the trained model with this sha256."""
    obj = _model(objects, name)
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


# --- DP-SGD (family mlp): the claim is the DP-SGD event the trainer spends ---------------------


def _dpsgd_model(
    name: str, budget: str, data: Path, work: Path, azure: AzureDoubles, **training: Any
) -> dict[str, Any]:
    """examples/dp-training/mlp-model.yaml on local data, sealing through the Key Vault double."""
    model: dict[str, Any] = yaml.safe_load(
        (REPO / "examples" / "dp-training" / "mlp-model.yaml").read_text()
    )
    model["metadata"] = {"name": name, "namespace": NAMESPACE}
    spec = model["spec"]
    spec["keyRelease"].update(vaultUrl=azure.key_vault.url, keyName=name)
    spec["training"].update(
        budgetRef={"name": budget},
        datasetUri=data.as_uri(),
        outputUri=(work / f"{name}.onnx.sealed").as_uri(),
        **training,
    )
    return model


def _own_data(objects: Any, oncology: Path, work: Path, budget: str) -> Path:
    """A copy of the oncology data with a budget of its own (a budget pays for one dataset)."""
    data = work / f"{budget}.csv"
    data.write_bytes(oncology.read_bytes())
    create_budget(objects, NAMESPACE, budget, 4.0, dataset_uri=data.as_uri())
    return data


def test_an_mlp_is_claimed_trained_by_dpsgd_sealed_and_served(
    objects: Any,
    azure: AzureDoubles,
    api: client.ApiClient,
    oncology: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    work = tmp_path_factory.mktemp("mlp")
    data = _own_data(objects, oncology, work, "oncology-net")
    model = _dpsgd_model("tumour-net", "oncology-net", data, work, azure)
    spec = model["spec"]
    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", model
    )
    typed = ConfidentialModelSpec.model_validate(spec)
    batch = client.BatchV1Api(api)
    job = _training_job(batch, "tumour-net", typed)
    (container,) = job.spec.template.spec.containers
    assert container.args == train_args(typed)
    assert "--dataset-rows" in container.args
    assert "--hidden" in container.args
    assert container.resources.requests == spec["training"]["resources"]["requests"]
    assert container.resources.limits == spec["training"]["resources"]["limits"]
    run_veil(container.args, azure.operator_env())
    result = json.loads(read_bytes(result_uri(typed)))
    assert result["family"] == "mlp"
    assert result["mechanisms"][0]["type"] == "dpsgd"
    assert result["dpsgd"]["steps"] == math.ceil(5 * 569 / 64)
    assert result["dpsgd"]["epsilonRdp"] <= spec["training"]["epsilon"]
    assert result["onnx"]["check"]["drawnFrom"] == "publicBounds"

    obj = wait_for(
        lambda: _serving(objects, result["sealed"]["sha256"], "tumour-net"),
        timeout=120,
        what="the DP-SGD model served",
    )
    assert kstatus_violations(obj) == []
    assert obj["status"]["claimState"] == "Consumed"
    deployment = client.AppsV1Api(api).read_namespaced_deployment("tumour-net", NAMESPACE)
    fetch = deployment.spec.template.spec.init_containers[0].args
    assert fetch[fetch.index("--sha256") + 1] == result["sealed"]["sha256"]
    # The budget was charged exactly what the trainer spent: the DP-SGD event and the estimate.
    claim = _ledger(objects, "oncology-net").claims[
        f"{obj['metadata']['uid']}.{obj['status']['trainingRun']}"
    ]
    assert claim.state == "Consumed"
    assert [m.model_dump(mode="json", by_alias=True) for m in claim.mechanisms] == result[
        "mechanisms"
    ]


@pytest.mark.parametrize(
    ("training", "field"),
    [
        ({"family": "logisticRegression", "delta": 0}, "spec.training.datasetRows"),
        ({"datasetRows": None}, "spec.training.datasetRows"),
        ({"delta": 0}, "spec.training.delta"),
        ({"gpus": 9}, "spec.training.gpus"),
        ({"inputShape": [8, 8]}, "spec.training.inputShape"),
        ({"batchSize": 600}, "spec.training.batchSize"),
    ],
)
def test_the_api_server_refuses_bad_dpsgd_fields_by_name(
    *,
    objects: Any,
    azure: AzureDoubles,
    oncology: Path,
    tmp_path: Path,
    training: dict[str, Any],
    field: str,
) -> None:
    model = _dpsgd_model("refused-net", "oncology-records", oncology, tmp_path, azure)
    model["spec"]["training"].update(training)
    model["spec"]["training"] = {
        k: v for k, v in model["spec"]["training"].items() if v is not None
    }
    with pytest.raises(client.ApiException) as refused:
        objects.create_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", model
        )
    assert refused.value.status == 422
    assert field in json.loads(refused.value.body or "{}")["message"]


def test_workers_wait_for_the_training_operator_then_run_as_a_pytorchjob(
    *,
    objects: Any,
    azure: AzureDoubles,
    api: client.ApiClient,
    cluster: LocalCluster,
    oncology: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    work = tmp_path_factory.mktemp("ddp")
    data = _own_data(objects, oncology, work, "oncology-ddp")
    model = _dpsgd_model("tumour-ddp", "oncology-ddp", data, work, azure, workers=3)
    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", model
    )

    def stalled() -> dict[str, Any] | None:
        ready = next(
            (
                c
                for c in (_model(objects, "tumour-ddp").get("status") or {}).get("conditions", [])
                if c["type"] == "Ready"
            ),
            {},
        )
        return ready if ready.get("reason") == "TrainingOperatorNotInstalled" else None

    ready = wait_for(stalled, timeout=60, what="TrainingOperatorNotInstalled")
    assert "install the Kubeflow training operator" in ready["message"]
    assert _ledger(objects, "oncology-ddp").claims == {}, "claimed without a way to train"

    # The training operator's own CRD, from its Go module: then the run goes ahead.
    crd = subprocess.run(
        ["bash", str(REPO / "hack" / "training-operator-crd.sh")],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()[-1]
    cluster.kubectl("apply", "--server-side", "--field-manager=veil-tests", "-f", crd)
    extensions = client.ApiextensionsV1Api(api)
    wait_for(
        lambda: any(
            c.type == "Established" and c.status == "True"
            for c in (
                extensions.read_custom_resource_definition("pytorchjobs.kubeflow.org").status
            ).conditions
            or []
        ),
        timeout=60,
        what="the PyTorchJob CRD established",
    )
    typed = ConfidentialModelSpec.model_validate(model["spec"])

    def resumed() -> dict[str, Any] | None:
        status = _model(objects, "tumour-ddp").get("status") or {}
        if not status.get("trainingJob"):
            return None
        stored: dict[str, Any] = objects.get_namespaced_custom_object(
            "kubeflow.org", "v1", NAMESPACE, "pytorchjobs", status["trainingJob"]
        )
        return stored if stored["spec"]["runPolicy"].get("suspend") is False else None

    stored = wait_for(resumed, timeout=150, what="the PyTorchJob made, recorded and resumed")
    # The API server kept the manifest whole against the real CRD's schema (nothing pruned).
    replicas = stored["spec"]["pytorchReplicaSpecs"]
    assert {r: s["replicas"] for r, s in replicas.items()} == {"Master": 1, "Worker": 2}
    (container,) = replicas["Master"]["template"]["spec"]["containers"]
    assert container["name"] == "pytorch"
    assert container["args"] == train_args(typed)
    assert container["resources"] == model["spec"]["training"]["resources"]
    assert replicas["Worker"]["template"]["spec"]["nodeSelector"] == {
        "kubernetes.azure.com/security-type": "ConfidentialVM"
    }
    uid = _model(objects, "tumour-ddp")["metadata"]["uid"]
    (claim,) = _ledger(objects, "oncology-ddp").claims.values()
    assert claim.state == "Consumed"
    plan = spec_plan(typed.training)
    assert plan is not None
    assert next(m.model_dump(mode="json", by_alias=True) for m in claim.mechanisms) == {
        "type": "dpsgd",
        "samplingRate": plan.sampling_rate,
        "noiseMultiplier": plan.noise_multiplier,
        "steps": plan.steps,
    }
    assert f"{uid}." in next(iter(_ledger(objects, "oncology-ddp").claims))
