"""The operator runs against the real control plane and writes kstatus-correct conditions."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.localcluster import LocalCluster
from tests.data.invalid_resources import Case
from tests.integration.conftest import OperatorProcess, wait_for
from veil import API_GROUP, API_VERSION
from veil.conditions import kstatus_violations

NAMESPACE = "veil-operator-test"
KINDS = {"budget": "privacybudgets", "synth": "syntheticdatasets", "cvm": "confidentialmodels"}


@pytest.fixture(scope="module")
def objects(operator: OperatorProcess, crds: LocalCluster, api: client.ApiClient) -> Any:
    crds.kubectl("create", "namespace", NAMESPACE)
    return client.CustomObjectsApi(api)


def _get(objects: Any, plural: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = objects.get_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, plural, name
    )
    return found


def _settled(objects: Any, plural: str, name: str) -> dict[str, Any] | None:
    obj = _get(objects, plural, name)
    status = obj.get("status") or {}
    if status.get("observedGeneration") != obj["metadata"]["generation"]:
        return None
    return obj


@pytest.mark.parametrize("base", sorted(KINDS))
def test_new_resource_gets_kstatus_conditions(objects: Any, base: str) -> None:
    plural = KINDS[base]
    name = f"new-{base}"
    manifest = Case(name, base, {}, "").manifest(name=name, namespace=NAMESPACE)
    objects.create_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, plural, manifest)
    obj = wait_for(lambda: _settled(objects, plural, name), what=f"{plural}/{name} status")
    assert kstatus_violations(obj) == []
    ready = next(c for c in obj["status"]["conditions"] if c["type"] == "Ready")
    assert ready["observedGeneration"] == 1
    assert ready["reason"]
    assert ready["message"]


def test_budget_reports_its_figures_and_follows_generation(objects: Any) -> None:
    name = "generations"
    manifest = Case(name, "budget", {}, "").manifest(name=name, namespace=NAMESPACE)
    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "privacybudgets", manifest
    )
    first = wait_for(lambda: _settled(objects, "privacybudgets", name), what="first status")
    assert first["status"]["epsilonRemaining"] == manifest["spec"]["epsilon"]
    objects.patch_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        NAMESPACE,
        "privacybudgets",
        name,
        {"spec": {"maxEpsilonPerClaim": 2}},
    )
    second = wait_for(lambda: _settled(objects, "privacybudgets", name), what="second status")
    assert second["metadata"]["generation"] == 2
    assert second["status"]["epsilonRemaining"] == manifest["spec"]["epsilon"]
    assert kstatus_violations(second) == []


def test_settled_resource_is_not_rewritten(objects: Any) -> None:
    name = "quiet"
    manifest = Case(name, "synth", {}, "").manifest(name=name, namespace=NAMESPACE)
    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "syntheticdatasets", manifest
    )
    settled = wait_for(lambda: _settled(objects, "syntheticdatasets", name), what="status")
    time.sleep(3)
    later = _get(objects, "syntheticdatasets", name)
    assert later["metadata"]["resourceVersion"] == settled["metadata"]["resourceVersion"]


def test_metrics_count_reconciles(objects: Any, operator: OperatorProcess) -> None:
    wait_for(lambda: _settled(objects, "privacybudgets", "new-budget"), what="a reconcile")
    metrics = operator.metrics()
    success = 'controller_runtime_reconcile_total{controller="privacybudget",result="success"}'
    assert success in metrics
    assert "controller_runtime_reconcile_time_seconds_bucket" in metrics
