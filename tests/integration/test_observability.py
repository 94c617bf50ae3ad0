"""What a platform team sees of Veil on the real control plane: Kubernetes Events on every
transition and action (series for repeats, nothing on a no-op resync), controller-runtime's
metric names on the live operator, JSON logs naming the object and the reconcile."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes import client
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.localcluster import LocalCluster
from tests.integration.conftest import (
    REPO,
    AzureDoubles,
    OperatorProcess,
    condition,
    create_budget,
    restricted_namespace,
    wait_for,
    wait_for_condition,
)
from veil import API_GROUP, API_VERSION

NAMESPACE = "veil-observability"
# The session operator leaves veil-crash-* to tests that run an operator of their own.
JSON_NAMESPACE = "veil-crash-json-logs"
MODEL = "observed"


@pytest.fixture(scope="module")
def objects(
    operator: OperatorProcess, crds: LocalCluster, api: client.ApiClient
) -> client.CustomObjectsApi:
    restricted_namespace(crds, NAMESPACE)
    return client.CustomObjectsApi(api)


def _model(azure: AzureDoubles, name: str) -> dict[str, Any]:
    document = yaml.safe_load(
        (REPO / "examples" / "confidential-model-cvm" / "model.yaml").read_text()
    )
    document["metadata"] = {"name": name, "namespace": NAMESPACE}
    document["spec"]["keyRelease"]["vaultUrl"] = azure.key_vault.url
    document["spec"]["keyRelease"]["keyName"] = name
    return document  # type: ignore[no-any-return]


def _dataset(name: str, namespace: str, budget: str) -> dict[str, Any]:
    document = yaml.safe_load((REPO / "examples" / "synthetic-data" / "synthetic.yaml").read_text())
    document["metadata"] = {"name": name, "namespace": namespace}
    document["spec"]["budgetRef"] = {"name": budget}
    return document  # type: ignore[no-any-return]


def _get(objects: client.CustomObjectsApi, plural: str, name: str) -> dict[str, Any]:
    return cast(
        dict[str, Any],
        objects.get_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, plural, name),
    )


def _events(api: client.ApiClient, name: str, namespace: str = NAMESPACE) -> list[Any]:
    return list(
        client.CoreV1Api(api)
        .list_namespaced_event(namespace, field_selector=f"involvedObject.name={name}")
        .items
    )


def _by_reason(api: client.ApiClient, name: str) -> dict[str, Any]:
    return {event.reason: event for event in _events(api, name)}


@pytest.fixture(scope="module")
def served(objects: client.CustomObjectsApi, azure: AzureDoubles) -> dict[str, Any]:
    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", _model(azure, MODEL)
    )

    def ready() -> dict[str, Any] | None:
        obj = _get(objects, "confidentialmodels", MODEL)
        settled = obj.get("status", {}).get("observedGeneration") == obj["metadata"]["generation"]
        return obj if settled and condition(obj, "Ready").get("status") == "True" else None

    found: dict[str, Any] = wait_for(ready, timeout=90, what=f"{MODEL} Ready")
    return found


def test_a_model_reports_its_actions_and_transitions(
    served: dict[str, Any], api: client.ApiClient
) -> None:
    wanted = {"KeyVersionCreated", "ChildrenCreated", "ModelServing"}
    wait_for(lambda: wanted <= set(_by_reason(api, MODEL)), what=f"events {wanted}")
    found = _by_reason(api, MODEL)
    for reason in wanted:
        event = found[reason]
        assert event.type == "Normal"
        assert event.involved_object.kind == "ConfidentialModel"
        assert event.involved_object.uid == served["metadata"]["uid"]
        assert event.reporting_component == "veil.dev/operator"
        assert event.source.component == "veil.dev/operator"
        assert event.action
        assert event.event_time
        assert event.last_timestamp
    assert f"version {served['status']['keyVersion']}" in found["KeyVersionCreated"].message
    # Every condition's reason now in force was announced by an event of that reason (but a
    # condition still Unknown since it appeared, with nothing to say yet).
    for item in served["status"]["conditions"]:
        if item["type"] not in ("Reconciling", "Stalled") and item["status"] != "Unknown":
            assert item["reason"] in found, item


def _policy_types(net: client.NetworkingV1Api, name: str) -> list[str] | None:
    spec = net.read_namespaced_network_policy(name, NAMESPACE).spec
    return None if spec is None else spec.policy_types


def test_drift_correction_is_an_event_and_repeats_fold_into_a_series(
    served: dict[str, Any], crds: LocalCluster, api: client.ApiClient
) -> None:
    net = client.NetworkingV1Api(api)
    deny = f"{MODEL}-default-deny"
    for _ in range(2):
        crds.kubectl(
            "patch",
            "networkpolicy",
            deny,
            "-n",
            NAMESPACE,
            "--type=merge",
            "-p",
            '{"spec":{"policyTypes":["Ingress"]}}',
        )
        wait_for(lambda: _policy_types(net, deny) == ["Ingress", "Egress"], what="restored")

    def series() -> Any:
        drift = [e for e in _events(api, MODEL) if e.reason == "DriftCorrected"]
        return drift if drift and drift[0].series and drift[0].series.count >= 2 else None

    (event,) = wait_for(series, what="one DriftCorrected event with a series")
    assert f"NetworkPolicy/{deny}" in event.message
    assert event.count == event.series.count


def test_a_noop_resync_posts_no_event(
    served: dict[str, Any], objects: client.CustomObjectsApi, api: client.ApiClient
) -> None:
    def snapshot() -> set[tuple[str | None, int | None]]:
        return {
            (e.metadata.name, e.series.count if e.series else 1)
            for e in client.CoreV1Api(api).list_namespaced_event(NAMESPACE).items
        }

    time.sleep(3)
    before = snapshot()
    time.sleep(8)  # the operator resyncs every 3 s in these tests
    assert snapshot() == before


def test_a_refusal_is_a_warning_and_status_stays_short(
    objects: client.CustomObjectsApi, azure: AzureDoubles, api: client.ApiClient
) -> None:
    name = "refused-key"
    azure.key_vault.fail(403, "Forbidden", "caller lacks keys/create", path_contains=f"/{name}")
    try:
        objects.create_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", _model(azure, name)
        )
        obj = wait_for_condition(
            lambda: _get(objects, "confidentialmodels", name), "KeyReady", "False"
        )
        wanted = {"KeyNotReady", "KeyVaultRefused"}
        wait_for(lambda: wanted <= set(_by_reason(api, name)), what=f"events {wanted}")
    finally:
        azure.key_vault.clear_failures()
        objects.delete_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, "confidentialmodels", name
        )
    found = _by_reason(api, name)
    assert {found[reason].type for reason in wanted} == {"Warning"}
    assert "caller lacks keys/create" in found["KeyVaultRefused"].message
    for type_ in ("Ready", "KeyReady"):
        message = condition(obj, type_)["message"]
        assert "\n" not in message, message
        assert len(message) < 600, message


def test_a_dataset_and_a_budget_announce_their_transitions(
    objects: client.CustomObjectsApi, api: client.ApiClient
) -> None:
    objects.create_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        NAMESPACE,
        "syntheticdatasets",
        _dataset("unpaid", NAMESPACE, "no-such-budget"),
    )
    obj = wait_for_condition(lambda: _get(objects, "syntheticdatasets", "unpaid"), "Ready", "False")
    reason = condition(obj, "Ready")["reason"]
    event = wait_for(lambda: _by_reason(api, "unpaid").get(reason), what=f"a {reason} event")
    assert event.type == "Warning"

    create_budget(objects, NAMESPACE, "observed-budget", epsilon=3.0)
    budget = wait_for_condition(
        lambda: _get(objects, "privacybudgets", "observed-budget"), "Ready", "True"
    )
    reason = condition(budget, "Ready")["reason"]
    event = wait_for(lambda: _by_reason(api, "observed-budget").get(reason), what=reason)
    assert event.type == "Normal"
    assert event.involved_object.kind == "PrivacyBudget"


def _families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_the_live_operator_exports_controller_runtime_metric_names(
    served: dict[str, Any], operator: OperatorProcess
) -> None:
    families = _families(operator.metrics())
    # prometheus_client's parser names a counter family without its _total suffix.
    for name, labels in {
        "controller_runtime_reconcile": {"controller", "result"},
        "controller_runtime_reconcile_errors": {"controller"},
        "controller_runtime_terminal_reconcile_errors": {"controller"},
        "controller_runtime_reconcile_time_seconds": {"controller"},
        "controller_runtime_active_workers": {"controller"},
        "controller_runtime_max_concurrent_reconciles": {"controller"},
        "workqueue_depth": {"controller", "name"},
        "workqueue_adds": {"controller", "name"},
        "workqueue_work_duration_seconds": {"controller", "name"},
        "veil_resource_ready": {"kind", "namespace", "name"},
        "veil_model_ready_replicas": {"namespace", "name"},
        "veil_key_versions": {"namespace", "name", "action"},
        "veil_privacy_budget_claims": {"namespace", "budget", "state"},
    }.items():
        assert name in families, name
        samples = families[name].samples
        assert samples, name  # zero from the start, as controller-runtime's are
        assert labels <= set(samples[0].labels), (name, samples[0].labels)
    reconciles = {
        (s.labels["controller"], s.labels["result"])
        for s in families["controller_runtime_reconcile"].samples
        if s.name.endswith("_total")
    }
    assert ("confidentialmodel", "success") in reconciles
    assert {result for _, result in reconciles} <= {"success", "error", "requeue", "requeue_after"}
    assert not [name for name in families if name.startswith("veil_reconcile")]


def test_json_logs_name_the_object_and_the_reconcile(
    crds: LocalCluster, azure: AzureDoubles, api: client.ApiClient, tmp_path: Path
) -> None:
    crds.kubectl("create", "namespace", JSON_NAMESPACE)
    user = "veil-operator-json"
    kubeconfig = crds.user_kubeconfig(user, "veil:operators")
    crds.kubectl(
        "create", "clusterrolebinding", user, "--clusterrole=cluster-admin", f"--user={user}"
    )
    log_path = tmp_path / "operator.jsonl"
    process = OperatorProcess(
        crds,
        log_path,
        kubeconfig,
        {**azure.operator_env(), "VEIL_LOG_FORMAT": "json"},
        namespaces=JSON_NAMESPACE,
    )
    try:
        process.wait_healthy()
        objects = client.CustomObjectsApi(api)
        objects.create_namespaced_custom_object(
            API_GROUP,
            API_VERSION,
            JSON_NAMESPACE,
            "syntheticdatasets",
            _dataset("logged", JSON_NAMESPACE, "no-such-budget"),
        )
        wait_for_condition(
            lambda: cast(
                dict[str, Any],
                objects.get_namespaced_custom_object(
                    API_GROUP, API_VERSION, JSON_NAMESPACE, "syntheticdatasets", "logged"
                ),
            ),
            "Ready",
            "False",
        )
        time.sleep(1)
    finally:
        process.stop()
        crds.kubectl("delete", "namespace", JSON_NAMESPACE, "--wait=false", check=False)
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    not_json = [line for line in lines if not line.startswith("{")]
    assert not not_json, not_json[:5]
    parsed = [json.loads(line) for line in lines]
    assert all({"message", "timestamp", "severity"} <= set(line) for line in parsed)
    about = [line for line in parsed if (line.get("object") or {}).get("name") == "logged"]
    assert about, "no line names the SyntheticDataset"
    assert all(line["object"]["namespace"] == JSON_NAMESPACE for line in about)
    assert any(line["object"].get("kind") == "SyntheticDataset" for line in about)
    assert any(line.get("reconcile_id") for line in about), about[:5]
