"""The operator killed (SIGKILL) during a burst of SyntheticDataset claims, then restarted.

An operator of this test's own watches one namespace (the session operator leaves `veil-crash-*`
alone), so killing it disturbs no other test. Whatever the kill interrupted — a claim decided
but not written, a grant written but not consumed, a Job not yet created — the restarted
operator must finish without granting anything twice or losing a claim.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.localcluster import LocalCluster
from tests.integration.conftest import AzureDoubles, OperatorProcess, create_budget, wait_for
from tests.integration.test_synthetic_dataset import dataset
from veil import API_GROUP, API_VERSION
from veil.privacy import Ledger, epsilon_spent
from veil.resources.synthetic_dataset import job_name

pytestmark = pytest.mark.cluster

NAMESPACE = "veil-crash-test"
BUDGET = "crash-study"
EPSILON, DELTA = 1.0, 1e-5  # twelve of the thirty ε-0.3 MST claims fit
DATASETS = 30
KILLED_AFTER = 10  # datasets created before the kill
SPENT_STATES = ("Granted", "Consumed")


def _ledger(objects: client.CustomObjectsApi) -> Ledger:
    budget = objects.get_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "privacybudgets", BUDGET
    )
    return Ledger.from_wire((budget.get("status") or {}).get("ledger"))


def _datasets(objects: client.CustomObjectsApi) -> list[dict[str, Any]]:
    listed = objects.list_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "syntheticdatasets"
    )
    items: list[dict[str, Any]] = listed["items"]
    return items


def _all_answered(objects: client.CustomObjectsApi) -> list[dict[str, Any]] | None:
    """Every dataset's status names a final claim state (or None while any is still open)."""
    items = _datasets(objects)
    states = [(d.get("status") or {}).get("claimState") for d in items]
    done = len(items) == DATASETS and all(s in ("Consumed", "Denied") for s in states)
    return items if done else None


def test_killed_operator_neither_double_grants_nor_loses_claims(
    crds: LocalCluster,
    api: client.ApiClient,
    azure: AzureDoubles,
    tmp_path: Path,
) -> None:
    crds.kubectl("create", "namespace", NAMESPACE)
    kubeconfig = crds.user_kubeconfig("veil-operator-crash", "veil:operators")
    crds.kubectl(
        "create",
        "clusterrolebinding",
        "veil-operator-crash",
        "--clusterrole=cluster-admin",
        "--user=veil-operator-crash",
    )
    objects = client.CustomObjectsApi(api)
    # The Job's pods are kwok's fakes, so the source is never read; it need not exist.
    source = tmp_path / "cancer.csv"
    create_budget(objects, NAMESPACE, BUDGET, epsilon=EPSILON, dataset_uri=source.as_uri())

    def start(log: str) -> OperatorProcess:
        process = OperatorProcess(
            crds, tmp_path / log, kubeconfig, azure.operator_env(), namespaces=NAMESPACE
        )
        process.wait_healthy()
        return process

    def create(i: int) -> None:
        body = dataset(f"burst-{i:02d}", source, epsilon=0.3)
        body["metadata"]["namespace"] = NAMESPACE
        body["spec"]["budgetRef"] = {"name": BUDGET}
        objects.create_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, "syntheticdatasets", body
        )

    first = start("first.log")
    try:
        # Killed while the first part of the burst is being claimed (the group commit
        # answers a burst in a few writes, so the kill must not wait for the whole of it);
        # the rest arrives while no operator runs.
        for i in range(KILLED_AFTER):
            create(i)
        wait_for(
            lambda: _ledger(objects).claims,
            timeout=60,
            interval=0.05,
            what="the burst under way",
        )
    finally:
        first.kill()
    for i in range(KILLED_AFTER, DATASETS):
        create(i)

    second = start("second.log")
    try:
        items = wait_for(
            lambda: _all_answered(objects), timeout=180, what="every dataset's claim answered"
        )
    finally:
        second.stop()

    ledger = _ledger(objects)
    uids = {d["metadata"]["uid"]: d for d in items}
    assert sorted(ledger.claims) == sorted(uids), "one claim per dataset, none lost, none extra"
    assert ledger.totals.requested == DATASETS, "a re-sent claim is never a second request"
    for uid, claim in ledger.claims.items():
        assert uids[uid]["status"]["claimState"] == claim.state, uids[uid]["metadata"]["name"]

    spent = [m for c in ledger.claims.values() if c.state in SPENT_STATES for m in c.mechanisms]
    assert spent, "some claims fit the budget"
    assert epsilon_spent(spent, DELTA, "pld") <= EPSILON
    assert any(c.state == "Denied" for c in ledger.claims.values()), "the burst outran the budget"

    # Exactly the paid-for datasets got a Job: none ran without a grant, none twice.
    jobs = client.BatchV1Api(api).list_namespaced_job(NAMESPACE).items
    paid = {d["metadata"]["name"] for d in items if d["status"]["claimState"] == "Consumed"}
    assert sorted(j.metadata.name for j in jobs) == sorted(
        job_name({"metadata": {"name": n}}) for n in paid
    )
    crds.kubectl("delete", "namespace", NAMESPACE, "--wait=false", check=False)
