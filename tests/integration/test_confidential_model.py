"""ConfidentialModel end to end on the real control plane, with Key Vault and ARM doubles."""

from __future__ import annotations

import copy
import json
import time
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.cluster.localcluster import LocalCluster
from tests.integration.conftest import (
    REPO,
    AzureDoubles,
    OperatorProcess,
    condition,
    restricted_namespace,
    wait_for,
    wait_for_condition,
)
from veil import API_GROUP, API_VERSION
from veil.conditions import kstatus_violations
from veil_standins.keyvault import b64url_decode

NAMESPACE = "veil-models"
PLURAL = "confidentialmodels"
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection"}


@pytest.fixture(scope="module")
def objects(
    operator: OperatorProcess, crds: LocalCluster, api: client.ApiClient
) -> client.CustomObjectsApi:
    # Restricted Pod Security: a pod Veil builds that breaks it is never created.
    restricted_namespace(crds, NAMESPACE)
    return client.CustomObjectsApi(api)


def model(
    azure: AzureDoubles, name: str, example: str = "confidential-model-cvm", **changes: Any
) -> dict[str, Any]:
    document = yaml.safe_load((REPO / "examples" / example / "model.yaml").read_text())
    document["metadata"] = {"name": name, "namespace": NAMESPACE}
    document["spec"]["keyRelease"]["vaultUrl"] = azure.key_vault.url
    document["spec"]["keyRelease"]["keyName"] = name
    for path, value in changes.items():
        target = document["spec"]
        keys = path.split(".")
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return document  # type: ignore[no-any-return]


def get(objects: client.CustomObjectsApi, name: str) -> dict[str, Any]:
    found: dict[str, Any] = objects.get_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, PLURAL, name
    )
    return found


def ready(objects: client.CustomObjectsApi, name: str) -> dict[str, Any] | None:
    obj = get(objects, name)
    if condition(obj, "Ready").get("status") != "True":
        return None
    if obj["status"].get("observedGeneration") != obj["metadata"]["generation"]:
        return None
    return obj


def pods(api: client.ApiClient, name: str) -> list[client.V1Pod]:
    return [
        pod
        for pod in client.CoreV1Api(api)
        .list_namespaced_pod(NAMESPACE, label_selector=f"app.kubernetes.io/instance={name}")
        .items
        if pod.metadata.deletion_timestamp is None
    ]


@pytest.fixture(scope="module")
def served(objects: client.CustomObjectsApi, azure: AzureDoubles) -> dict[str, Any]:
    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, PLURAL, model(azure, "classifier")
    )
    settled: dict[str, Any] = wait_for(
        lambda: ready(objects, "classifier"), timeout=90, what="classifier Ready"
    )
    return settled


def test_model_becomes_ready_with_every_condition(served: dict[str, Any]) -> None:
    assert kstatus_violations(served) == []
    for type_, reason in (
        ("KeyReady", "KeyVersionCurrent"),
        ("Placed", "OnConfidentialNodes"),
        ("KeyReleased", "ModelUnsealed"),
    ):
        assert condition(served, type_)["status"] == "True", served["status"]
        assert condition(served, type_)["reason"] == reason
    status = served["status"]
    assert status["readyReplicas"] == 2
    assert status["keyId"].startswith("https://127.0.0.1")
    assert status["endpoint"].endswith("/v2/models/classifier")


def test_key_is_an_exportable_hsm_key_with_the_release_policy(
    served: dict[str, Any], azure: AzureDoubles
) -> None:
    versions = azure.key_vault.keys["classifier"]
    current = versions[-1]
    assert current.kty == "RSA-HSM"
    assert current.exportable is True
    assert current.release_policy is not None
    assert current.release_policy["immutable"] is True
    policy = json.loads(b64url_decode(current.release_policy["data"]))
    claims = {c["claim"]: c["equals"] for c in policy["anyOf"][0]["allOf"]}
    assert claims["x-ms-isolation-tee.x-ms-attestation-type"] == "sevsnpvm"
    assert claims["x-ms-isolation-tee.x-ms-compliance-status"] == "azure-compliant-cvm"


def test_pods_land_only_on_confidential_nodes(
    served: dict[str, Any], api: client.ApiClient
) -> None:
    running = pods(api, "classifier")
    assert len(running) == 2
    nodes = client.CoreV1Api(api)
    for pod in running:
        node = nodes.read_node(pod.spec.node_name)
        assert node.metadata.labels["kubernetes.azure.com/security-type"] == "ConfidentialVM"


def test_children_are_owned(served: dict[str, Any], crds: LocalCluster) -> None:
    names = crds.kubectl(
        "get",
        "deployment,service,serviceaccount,networkpolicy,poddisruptionbudget",
        "-n",
        NAMESPACE,
        "-l",
        "app.kubernetes.io/instance=classifier",
        "-o",
        "name",
    ).split()
    assert sorted(names) == sorted(
        [
            "deployment.apps/classifier",
            "service/classifier",
            "serviceaccount/classifier",
            "networkpolicy.networking.k8s.io/classifier-allow",
            "networkpolicy.networking.k8s.io/classifier-default-deny",
            "poddisruptionbudget.policy/classifier",
        ]
    )


def _operator_writes(cluster: LocalCluster, since: float) -> list[str]:
    writes = []
    for event in cluster.audit_events(user="veil-operator"):
        stamp = event.get("requestReceivedTimestamp", "")
        if event["verb"] in WRITE_VERBS and _epoch(stamp) >= since:
            ref = event.get("objectRef", {})
            writes.append(
                f"{event['verb']} {ref.get('resource')}/{ref.get('name')}"
                f"{'/' + ref['subresource'] if ref.get('subresource') else ''}"
            )
    return writes


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def test_noop_resync_writes_nothing(
    served: dict[str, Any], crds: LocalCluster, objects: client.CustomObjectsApi
) -> None:
    wait_for(lambda: ready(objects, "classifier"), what="settled")
    time.sleep(2)
    since = time.time()
    # The operator resyncs every 3 s here; a child's status event triggers a reconcile too.
    time.sleep(8)
    reads = [
        e
        for e in crds.audit_events(user="veil-operator")
        if e["verb"] == "get" and _epoch(e["requestReceivedTimestamp"]) >= since
    ]
    assert reads, "the operator did resync (it read the children)"
    assert _operator_writes(crds, since) == []


def test_deleted_and_edited_children_are_restored(
    served: dict[str, Any], crds: LocalCluster, api: client.ApiClient
) -> None:
    crds.kubectl("delete", "service", "classifier", "-n", NAMESPACE)
    crds.kubectl(
        "patch",
        "networkpolicy",
        "classifier-default-deny",
        "-n",
        NAMESPACE,
        "--type=merge",
        "-p",
        '{"spec":{"policyTypes":["Ingress"]}}',
    )
    crds.kubectl("scale", "deployment", "classifier", "-n", NAMESPACE, "--replicas=5")
    core, net, apps = client.CoreV1Api(api), client.NetworkingV1Api(api), client.AppsV1Api(api)

    def restored() -> bool:
        try:
            core.read_namespaced_service("classifier", NAMESPACE)
        except client.ApiException:
            return False
        deny = net.read_namespaced_network_policy("classifier-default-deny", NAMESPACE)
        deployment = apps.read_namespaced_deployment("classifier", NAMESPACE)
        return deny.spec.policy_types == ["Ingress", "Egress"] and deployment.spec.replicas == 2

    wait_for(restored, timeout=30, what="the children restored")


def test_policy_change_makes_a_new_key_version(
    served: dict[str, Any], objects: client.CustomObjectsApi, azure: AzureDoubles
) -> None:
    before = len(azure.key_vault.keys["classifier"])
    old_version = served["status"]["keyVersion"]
    objects.patch_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        NAMESPACE,
        PLURAL,
        "classifier",
        {
            "spec": {
                "keyRelease": {
                    "requiredClaims": [
                        {"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-is-debuggable", "equals": False}
                    ]
                }
            }
        },
    )
    after = wait_for(
        lambda: (
            (o := ready(objects, "classifier")) and o["status"]["keyVersion"] != old_version and o
        ),
        timeout=60,
        what="a new key version",
    )
    assert len(azure.key_vault.keys["classifier"]) == before + 1
    first = azure.key_vault.keys["classifier"][0].release_policy
    assert first is not None
    assert first["immutable"], "the old version is untouched"
    assert after["status"]["keyId"].endswith(after["status"]["keyVersion"])


def test_no_confidential_capacity_says_so(
    objects: client.CustomObjectsApi, azure: AzureDoubles, crds: LocalCluster
) -> None:
    # Confidential ACI needs virtual nodes, which this cluster does not have.
    objects.create_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        NAMESPACE,
        PLURAL,
        model(azure, "no-capacity", example="confidential-model-aci"),
    )

    def placed_false() -> dict[str, Any] | None:
        obj = get(objects, "no-capacity")
        return obj if condition(obj, "Placed").get("status") == "False" else None

    obj = wait_for(placed_false, timeout=60, what="Placed False")
    placed = condition(obj, "Placed")
    assert placed["reason"] == "NoConfidentialCapacity"
    assert "node" in placed["message"]
    assert condition(obj, "Ready")["status"] == "False"
    assert kstatus_violations(obj) == []


def test_fqdn_egress_without_cilium_is_stalled_with_the_reason(
    objects: client.CustomObjectsApi, azure: AzureDoubles
) -> None:
    objects.create_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        NAMESPACE,
        PLURAL,
        model(azure, "needs-cilium", **{"network.fqdnEgress": True}),
    )
    obj = wait_for_condition(lambda: get(objects, "needs-cilium"), "Stalled", "True", timeout=60)
    assert condition(obj, "Ready")["reason"] == "CiliumNotInstalled"
    assert "Cilium" in condition(obj, "Ready")["message"]


def test_vault_refusal_is_explained(objects: client.CustomObjectsApi, azure: AzureDoubles) -> None:
    azure.key_vault.fail(403, "Forbidden", "caller lacks keys/create", path_contains="/forbidden")
    try:
        objects.create_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, PLURAL, model(azure, "forbidden")
        )
        obj = wait_for_condition(lambda: get(objects, "forbidden"), "KeyReady", "False", timeout=60)
    finally:
        azure.key_vault.clear_failures()
    key_ready = condition(obj, "KeyReady")
    assert "lacks the Key Vault Crypto Officer role" in key_ready["message"]
    assert key_ready["reason"] == "KeyVaultRefused"
    assert condition(obj, "Ready")["status"] == "False"


def test_deleting_the_model_removes_children_and_follows_the_key_policy(
    objects: client.CustomObjectsApi, azure: AzureDoubles, api: client.ApiClient
) -> None:
    objects.create_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        NAMESPACE,
        PLURAL,
        model(
            azure, "short-lived", **{"keyRelease.deletionPolicy": "Delete", "serving.replicas": 1}
        ),
    )
    wait_for(lambda: ready(objects, "short-lived"), timeout=90, what="short-lived Ready")
    assert azure.key_vault.keys["short-lived"]
    objects.delete_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, PLURAL, "short-lived"
    )
    apps = client.AppsV1Api(api)

    def gone() -> bool:
        remaining = apps.list_namespaced_deployment(
            NAMESPACE, label_selector="app.kubernetes.io/instance=short-lived"
        ).items
        return not remaining and "short-lived" in azure.key_vault.deleted

    wait_for(gone, timeout=60, what="children garbage-collected and the key deleted")


def test_retained_key_survives_deletion(
    objects: client.CustomObjectsApi, azure: AzureDoubles
) -> None:
    body = model(azure, "retained", **{"serving.replicas": 1})
    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, PLURAL, copy.deepcopy(body)
    )
    wait_for(lambda: ready(objects, "retained"), timeout=90, what="retained Ready")
    objects.delete_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, "retained")

    def deleted() -> bool:
        try:
            get(objects, "retained")
        except client.ApiException as gone:
            return gone.status == 404
        return False

    wait_for(deleted, timeout=30, what="the model deleted (finalizer done)")
    assert "retained" not in azure.key_vault.deleted
    assert azure.key_vault.keys["retained"]
