"""Scenarios 1 and 2: the API server restarted, and etcd paused (SIGSTOP) longer than the
operator's request timeouts, each in the middle of a burst of ConfidentialModels and of a
burst of SyntheticDataset claimants against one PrivacyBudget (half of them created before
the fault, half after).

Checked after each: every model converges Ready; one key version per model; each model has
exactly one Deployment and one Service, owned by it (none duplicated, none orphaned); status
says only what is so (its key version is the vault's, its ready replicas the Deployment's).
Every claim gets exactly one answer: one claim per dataset in a ledger whose seal verifies,
none asked twice, the grants within the budget's ε, and exactly the paid-for datasets have a
Job. The recovery times (fault over to the last model Ready, to the last claim answered) are
printed and kept in bench/results/faults.json.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.localcluster import LocalCluster
from tests.faults import claims
from tests.faults.models import (
    PLURAL,
    Doubles,
    Messages,
    assert_one_line,
    children_owned_once,
    converge,
    doubles_with_keys,
    listed,
    model,
    operator_in,
)
from tests.faults.results import record
from tests.integration.conftest import wait_for
from veil import API_GROUP, API_VERSION

pytestmark = [pytest.mark.cluster, pytest.mark.faults]

NAMESPACE = "veil-faults-control-plane"
OPERATOR_USER = "veil-faults-cp-operator"
BURST = 200  # models per fault
MODELS_PER_NODE = 20  # a model pod asks 0.5 CPU plus its sidecar's; a fake node has 16
ETCD_PAUSE = 20  # seconds: past the operator's API requests' and watches' patience
CONVERGE_TIMEOUT = 420
CLAIMANTS = 64  # per fault: half before it, half after


@pytest.fixture(scope="module")
def doubles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doubles]:
    with doubles_with_keys(tmp_path_factory.mktemp("cp-tls"), 2 * BURST) as made:
        yield made


@pytest.fixture(scope="module")
def objects(
    crds: LocalCluster, api: client.ApiClient, doubles: Doubles, tmp_path_factory: Any
) -> Iterator[client.CustomObjectsApi]:
    # Confidential capacity for both bursts' pods, beside the cluster's first four nodes.
    crds.add_nodes(ordinary=0, confidential=2 * BURST // MODELS_PER_NODE, first=4)
    log = Path(tmp_path_factory.mktemp("cp-operator")) / "veil.log"
    with operator_in(crds, NAMESPACE, OPERATOR_USER, doubles, log):
        yield client.CustomObjectsApi(api)


def burst(objects: client.CustomObjectsApi, doubles: Doubles, prefix: str) -> list[str]:
    names = [f"{prefix}-{i:03d}" for i in range(BURST)]
    for i, name in enumerate(names):
        body = model(doubles, NAMESPACE, name, f"{prefix[:6]}{i:03d}")
        objects.create_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, body)
    # Mid-burst: the operator has begun (some keys made), not finished.
    wait_for(
        lambda: any(name in doubles.key_vault.keys for name in names),
        timeout=60,
        interval=0.05,
        what="the burst under way",
    )
    return names


def claim_burst(objects: client.CustomObjectsApi, budget: str) -> claims.Burst:
    """A budget and the first half of its claimants, once the operator has begun to answer
    them; the caller creates the second half after the fault."""
    claimants = claims.burst(NAMESPACE, budget, CLAIMANTS)
    claims.create_budget_of(objects, claimants)
    claims.create_datasets(objects, claimants, list(claimants.names[: CLAIMANTS // 2]))
    wait_for(
        lambda: claims.ledger_of(objects, claimants).claims,
        timeout=60,
        interval=0.05,
        what="the claims under way",
    )
    return claimants


def claims_after_fault(
    api: client.ApiClient,
    objects: client.CustomObjectsApi,
    claimants: claims.Burst,
    back: float,
) -> tuple[claims.Paid, float]:
    """The second half of the claimants, every claim answered; the checks; the seconds from
    `back` to the last answer."""
    claims.create_datasets(objects, claimants, list(claimants.names[CLAIMANTS // 2 :]))
    items = claims.wait_answered(objects, claimants, CONVERGE_TIMEOUT)
    recovered = time.monotonic() - back
    return claims.check_claims(api, objects, claimants, items), recovered


def check_whole(api: client.ApiClient, objects: client.CustomObjectsApi, doubles: Doubles) -> None:
    children_owned_once(api, objects, NAMESPACE)
    apps = client.AppsV1Api(api)
    for obj in listed(objects, NAMESPACE):
        name = obj["metadata"]["name"]
        versions = doubles.key_vault.keys[name]
        assert len(versions) == 1, f"{name}: {len(versions)} key versions"
        assert obj["status"]["keyVersion"] == versions[0].version
        deployment = apps.read_namespaced_deployment(name, NAMESPACE)
        ready = deployment.status.ready_replicas if deployment.status else None
        assert obj["status"]["readyReplicas"] == (ready or 0)


def test_api_server_restart_mid_burst(
    crds: LocalCluster, api: client.ApiClient, objects: client.CustomObjectsApi, doubles: Doubles
) -> None:
    claimants = claim_burst(objects, "restart-budget")
    names = burst(objects, doubles, "restart")
    answered_before = claims.answered_count(objects, claimants)
    down = crds.restart_apiserver(down_seconds=3)
    back = time.monotonic()
    messages = Messages()
    converge(objects, NAMESPACE, names, messages, CONVERGE_TIMEOUT)
    recovery = time.monotonic() - back
    paid, claims_recovery = claims_after_fault(api, objects, claimants, back)
    print(
        f"\nAPI server restart: down {down:.1f} s, {BURST} models Ready {recovery:.1f} s later;"
        f" {CLAIMANTS} claims ({answered_before} answered at the restart) all answered "
        f"{claims_recovery:.1f} s later: {paid.granted} granted, {paid.denied} denied"
    )
    record(
        "api-server-restart",
        models=BURST,
        claimants=CLAIMANTS,
        claims_answered_before_fault=answered_before,
        granted=paid.granted,
        denied=paid.denied,
        down_seconds=round(down, 1),
        recovery_seconds=round(recovery, 1),
        claims_recovery_seconds=round(claims_recovery, 1),
    )
    check_whole(api, objects, doubles)
    assert_one_line(messages)


def test_etcd_paused_mid_burst(
    crds: LocalCluster, api: client.ApiClient, objects: client.CustomObjectsApi, doubles: Doubles
) -> None:
    claimants = claim_burst(objects, "etcd-budget")
    names = burst(objects, doubles, "etcd")
    answered_before = claims.answered_count(objects, claimants)
    with crds.etcd_paused():
        time.sleep(ETCD_PAUSE)
    resumed = time.monotonic()
    messages = Messages()
    converge(objects, NAMESPACE, names, messages, CONVERGE_TIMEOUT)
    recovery = time.monotonic() - resumed
    paid, claims_recovery = claims_after_fault(api, objects, claimants, resumed)
    print(
        f"\netcd paused {ETCD_PAUSE} s: {BURST} models Ready {recovery:.1f} s after resuming; "
        f"{CLAIMANTS} claims ({answered_before} answered at the pause) all answered "
        f"{claims_recovery:.1f} s after: {paid.granted} granted, {paid.denied} denied"
    )
    record(
        "etcd-paused",
        models=BURST,
        claimants=CLAIMANTS,
        claims_answered_before_fault=answered_before,
        granted=paid.granted,
        denied=paid.denied,
        paused_seconds=ETCD_PAUSE,
        recovery_seconds=round(recovery, 1),
        claims_recovery_seconds=round(claims_recovery, 1),
    )
    check_whole(api, objects, doubles)
    assert_one_line(messages)
