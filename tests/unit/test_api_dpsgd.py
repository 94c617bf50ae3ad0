"""spec.training's DP-SGD fields: refused by pydantic and by the CRD's CEL rules alike, by name;
and the confidential GPU VM sizes (NCCads H100 v5) in node pools."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from veil.api.confidential_model import NodePool, Training, TrustedExecution
from veil.api.crd import all_crds
from veil.api.dpsgd import DPSGD_FAMILIES
from veil.azure.node_pools import (
    GPU_TAINT,
    NodePoolError,
    confidential_platform,
    desired_agent_pool,
    is_gpu_size,
)
from veil.training import dpsgd

BASE: dict[str, Any] = {
    "budgetRef": {"name": "b"},
    "datasetUri": "file:///data.csv",
    "targetColumn": "y",
    "classes": ["0", "1"],
    "epsilon": 1.0,
    "outputUri": "file:///model.sealed",
}
MLP = {**BASE, "family": "mlp", "delta": 1e-5, "datasetRows": 500}


def test_the_api_names_the_trainer_s_dpsgd_families() -> None:
    assert DPSGD_FAMILIES == dpsgd.FAMILIES


def test_a_complete_mlp_and_cnn_are_accepted() -> None:
    mlp = Training.model_validate({**MLP, "hidden": [32, 16], "gpus": 1, "workers": 2})
    assert (mlp.family, mlp.hidden, mlp.gpus, mlp.workers) == ("mlp", [32, 16], 1, 2)
    cnn = Training.model_validate({**MLP, "family": "cnn", "inputShape": [8, 8]})
    assert cnn.input_shape == [8, 8]


@pytest.mark.parametrize(
    ("training", "field"),
    [
        ({**BASE, "epochs": 3}, "epochs"),
        ({**BASE, "gpus": 1}, "gpus"),
        ({**BASE, "workers": 2}, "workers"),
        ({**BASE, "secureRng": False}, "secureRng"),
        ({**MLP, "datasetRows": None}, "datasetRows"),
        ({**MLP, "delta": 0}, "delta"),
        ({**MLP, "inputShape": [8, 8]}, "inputShape"),
        ({**MLP, "channels": [4]}, "channels"),
        ({**MLP, "family": "cnn"}, "inputShape"),
        ({**MLP, "batchSize": 501}, "batchSize"),
        ({**MLP, "momentum": 0.5}, "momentum"),
        ({**MLP, "optimizer": "adam", "momentum": 0.5}, "momentum"),
        ({**MLP, "gpus": 9}, "gpus"),
        ({**MLP, "workers": 0}, "workers"),
        ({**MLP, "inputShape": [8]}, "inputShape"),
        ({**MLP, "hidden": [0]}, "hidden"),
        ({**MLP, "noiseMultiplier": 0}, "noiseMultiplier"),
        ({**MLP, "gradSampleMode": "vmap"}, "gradSampleMode"),
    ],
)
def test_bad_dpsgd_values_are_refused_naming_the_field(
    training: dict[str, Any], field: str
) -> None:
    training = {k: v for k, v in training.items() if v is not None}
    with pytest.raises(ValidationError) as refused:
        Training.model_validate(training)
    assert field in str(refused.value)


def _training_schema() -> dict[str, Any]:
    crd = next(c for c in all_crds().values() if c["spec"]["names"]["kind"] == "ConfidentialModel")
    version = crd["spec"]["versions"][0]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "properties"
    ]["training"]
    return schema


def test_the_crd_carries_the_rules_and_bounds() -> None:
    schema = _training_schema()
    rules = {r.get("fieldPath"): r for r in schema["x-kubernetes-validations"]}
    assert rules[".epochs"]["reason"] == "FieldValueForbidden"
    assert "mlp, cnn" in rules[".epochs"]["message"]
    assert rules[".datasetRows"]["reason"] in ("FieldValueForbidden", "FieldValueRequired")
    props = schema["properties"]
    assert props["family"]["enum"] == [
        "logisticRegression",
        "gaussianNB",
        "randomForest",
        "mlp",
        "cnn",
    ]
    assert props["gpus"]["minimum"] == 1
    assert props["gpus"]["maximum"] == 8
    assert props["workers"]["maximum"] == 64
    assert props["inputShape"]["minItems"] == 2
    assert props["inputShape"]["maxItems"] == 3
    assert "nvidia.com/gpu" not in str(props["resources"].get("default", ""))


@pytest.mark.parametrize("size", ["Standard_NCC40ads_H100_v5", "Standard_NCC80ads_H100_v5"])
def test_confidential_gpu_sizes_are_sevsnp_pools_with_the_gpu_taint(size: str) -> None:
    assert confidential_platform(size) == "sevsnp"
    assert is_gpu_size(size)
    pool = NodePool(
        subscription_id="s", resource_group="rg", cluster_name="c", name="gpu", vm_size=size
    )
    tee = TrustedExecution(isolation="confidentialVM", platform="sevsnp", node_pool=pool)
    assert tee.node_pool is not None
    taints = desired_agent_pool(pool).as_dict()["properties"]["nodeTaints"]
    assert GPU_TAINT in taints
    with pytest.raises(ValidationError, match="must match the platform"):
        TrustedExecution(isolation="confidentialVM", platform="tdx", node_pool=pool)


def test_cpu_pools_get_no_gpu_taint_and_other_gpu_sizes_are_refused() -> None:
    pool = NodePool(
        subscription_id="s",
        resource_group="rg",
        cluster_name="c",
        name="cvm",
        vm_size="Standard_DC4as_v5",
    )
    assert not is_gpu_size(pool.vm_size)
    assert GPU_TAINT not in desired_agent_pool(pool).as_dict()["properties"]["nodeTaints"]
    for size in ("Standard_NC40ads_H100_v5", "Standard_NCC40ads_A100_v4"):
        with pytest.raises(NodePoolError, match="NCCadsH100v5"):
            confidential_platform(size)
        with pytest.raises(ValidationError, match=r"vm_size|vmSize"):
            NodePool(
                subscription_id="s",
                resource_group="rg",
                cluster_name="c",
                name="g",
                vm_size=size,
            )
