"""ensure_confidential_pool with the REAL azure-mgmt-containerservice client (and azure-mgmt-core's
long-running-operation poller) against the local ARM agentPools double; wire bodies asserted."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.mgmt.containerservice import ContainerServiceClient

from veil.api.confidential_model import NodePool
from veil.azure.credentials import AzureSettings
from veil.azure.errors import DEFAULT_RETRY_SECONDS
from veil.azure.node_pools import (
    VEIL_LABEL,
    VEIL_TAINT,
    NodePoolError,
    confidential_platform,
    container_service_client,
    desired_agent_pool,
    ensure_confidential_pool,
)
from veil_standins.arm import ArmDouble
from veil_standins.faults import FaultKind, FaultPlan

SUB = "00000000-0000-0000-0000-00000000cafe"
RG = "veil-rg"
FAST = 0.01  # seconds between polls (AKS answers Retry-After; production keeps the SDK default)


@pytest.fixture
def cluster(arm_double: ArmDouble) -> str:
    name = f"aks-{uuid.uuid4().hex[:8]}"
    arm_double.add_cluster(SUB, RG, name)
    return name


@pytest.fixture
def client(arm_settings: AzureSettings) -> ContainerServiceClient:
    no_retries = dataclasses.replace(arm_settings, extra_client_kwargs={"retry_total": 0})
    return container_service_client(SUB, no_retries)


def pool(
    cluster: str, vm_size: str = "Standard_DC4as_v5", count: int = 2, name: str = "cvm"
) -> NodePool:
    return NodePool(
        subscription_id=SUB,
        resource_group=RG,
        cluster_name=cluster,
        name=name,
        vm_size=vm_size,
        count=count,
    )


@pytest.mark.parametrize(
    ("size", "platform"),
    [
        ("Standard_DC4as_v5", "sevsnp"),
        ("Standard_DC8ads_v5", "sevsnp"),
        ("Standard_EC16as_v5", "sevsnp"),
        ("Standard_EC32ads_v6", "sevsnp"),
        ("Standard_DC2as_v6", "sevsnp"),
        ("Standard_DC4es_v5", "tdx"),
        ("Standard_DC8eds_v5", "tdx"),
        ("Standard_EC16es_v6", "tdx"),
        ("Standard_EC64eds_v6", "tdx"),
    ],
)
def test_confidential_sizes_name_their_platform(size: str, platform: str) -> None:
    assert confidential_platform(size) == platform


@pytest.mark.parametrize(
    "size",
    [
        "Standard_D4s_v5",  # general purpose
        "Standard_DC4s_v3",  # SGX enclaves, not a confidential VM
        "Standard_DC4as_cc_v5",  # confidential child VMs (retired Kata CC)
        "Standard_NC24ads_A100_v4",
        "Standard_DC4as_v4",
        "standard_dc4as_v5",
    ],
)
def test_other_sizes_are_refused_with_the_families_named(size: str) -> None:
    with pytest.raises(NodePoolError, match=r"not a confidential VM size.*DCasv5.*DCesv5"):
        confidential_platform(size)


def test_a_bad_size_is_refused_before_any_call(
    arm_double: ArmDouble, client: ContainerServiceClient, cluster: str
) -> None:
    bad = NodePool.model_construct(**{**pool(cluster).model_dump(), "vm_size": "Standard_D4s_v5"})
    before = len(arm_double.requests)
    with pytest.raises(NodePoolError, match="Standard_D4s_v5' is not a confidential VM size"):
        ensure_confidential_pool(client, bad)
    assert len(arm_double.requests) == before


def test_platform_must_match_the_size(client: ContainerServiceClient, cluster: str) -> None:
    with pytest.raises(NodePoolError, match="is sevsnp, but the model asks for tdx"):
        ensure_confidential_pool(client, pool(cluster), platform="tdx")


def test_desired_pool_wire_shape() -> None:
    body = desired_agent_pool(pool("c"), {"team": "fraud"}, ["gpu=none:NoSchedule"]).as_dict()
    assert body == {
        "properties": {
            "vmSize": "Standard_DC4as_v5",
            "count": 2,
            "osType": "Linux",
            "osSKU": "AzureLinux",
            "mode": "User",
            "nodeLabels": {VEIL_LABEL: "true", "team": "fraud"},
            "nodeTaints": [VEIL_TAINT, "gpu=none:NoSchedule"],
        }
    }


def test_creates_the_pool_and_follows_the_operation(
    arm_double: ArmDouble, client: ContainerServiceClient, cluster: str
) -> None:
    state = ensure_confidential_pool(
        client,
        pool(cluster),
        {"team": "fraud"},
        platform="sevsnp",
        wait=True,
        polling_interval=FAST,
    )
    assert (state.provisioning_state, state.ready, state.changed) == ("Succeeded", True, True)
    assert (state.vm_size, state.count, state.platform) == ("Standard_DC4as_v5", 2, "sevsnp")
    [body] = arm_double.puts(cluster, "cvm")
    props: dict[str, Any] = body["properties"]
    assert props["vmSize"] == "Standard_DC4as_v5"
    assert props["count"] == 2
    assert props["mode"] == "User"
    assert props["osSKU"] == "AzureLinux"
    assert props["osType"] == "Linux"
    assert props["nodeLabels"] == {"veil.dev/confidential": "true", "team": "fraud"}
    assert props["nodeTaints"] == ["veil.dev/confidential=true:NoSchedule"]
    assert "provisioningState" not in props
    polled = [p for m, p, _ in arm_double.requests if m == "GET" and "/operations/" in p]
    assert polled, "the ARM poller followed Azure-AsyncOperation"

    again = ensure_confidential_pool(client, pool(cluster), {"team": "fraud"})
    assert (again.ready, again.changed) == (True, False)
    assert len(arm_double.puts(cluster, "cvm")) == 1  # a matching pool is not written


def test_without_waiting_the_state_is_read_back_on_each_call(
    arm_double: ArmDouble, client: ContainerServiceClient, cluster: str
) -> None:
    first = ensure_confidential_pool(client, pool(cluster, name="nowait"))
    assert (first.provisioning_state, first.changed) == ("Creating", True)
    second = ensure_confidential_pool(client, pool(cluster, name="nowait"))
    assert (second.provisioning_state, second.changed) == ("Creating", False)  # busy: no write
    third = ensure_confidential_pool(client, pool(cluster, name="nowait"))
    assert (third.provisioning_state, third.ready, third.changed) == ("Succeeded", True, False)
    assert len(arm_double.puts(cluster, "nowait")) == 1


def test_drift_is_corrected_keeping_what_veil_does_not_manage(
    arm_double: ArmDouble, client: ContainerServiceClient, cluster: str
) -> None:
    arm_double.set_pool(
        SUB,
        RG,
        cluster,
        "cvm",
        vmSize="Standard_DC4as_v5",
        count=1,
        mode="User",
        osSKU="Ubuntu2404",
        maxPods=50,
        nodeLabels={"team": "fraud"},
        nodeTaints=["other=x:NoSchedule"],
    )
    state = ensure_confidential_pool(
        client, pool(cluster, count=3), wait=True, polling_interval=FAST
    )
    assert (state.ready, state.changed, state.count) == (True, True, 3)
    [body] = arm_double.puts(cluster, "cvm")
    props = body["properties"]
    assert props["count"] == 3
    assert props["maxPods"] == 50
    assert props["osSKU"] == "Ubuntu2404"  # an existing pool's OS is left alone
    assert props["nodeLabels"] == {"team": "fraud", VEIL_LABEL: "true"}
    assert props["nodeTaints"] == ["other=x:NoSchedule", VEIL_TAINT]


def test_an_autoscaled_pool_keeps_its_count(
    arm_double: ArmDouble, client: ContainerServiceClient, cluster: str
) -> None:
    arm_double.set_pool(
        SUB,
        RG,
        cluster,
        "cvm",
        vmSize="Standard_DC4as_v5",
        count=7,
        enableAutoScaling=True,
        minCount=1,
        maxCount=10,
        mode="User",
        nodeLabels={VEIL_LABEL: "true"},
        nodeTaints=[VEIL_TAINT],
    )
    state = ensure_confidential_pool(client, pool(cluster, count=2))
    assert (state.changed, state.count) == (False, 7)
    assert arm_double.puts(cluster, "cvm") == []


def test_a_different_vm_size_is_an_error(
    arm_double: ArmDouble, client: ContainerServiceClient, cluster: str
) -> None:
    arm_double.set_pool(SUB, RG, cluster, "cvm", vmSize="Standard_DC8as_v5", count=2)
    with pytest.raises(NodePoolError, match="cannot change a pool's VM size"):
        ensure_confidential_pool(client, pool(cluster))
    assert arm_double.puts(cluster, "cvm") == []


def test_403_says_which_permission_is_missing(
    arm_double: ArmDouble, client: ContainerServiceClient, cluster: str
) -> None:
    arm_double.fail_next_put(
        403,
        "AuthorizationFailed",
        "The client does not have authorization to perform action "
        "'Microsoft.ContainerService/managedClusters/agentPools/write'.",
    )
    with pytest.raises(
        NodePoolError, match="lacks permission to manage the cluster's agent pools"
    ) as caught:
        ensure_confidential_pool(client, pool(cluster))
    assert (caught.value.status, caught.value.code, caught.value.retriable) == (
        403,
        "AuthorizationFailed",
        False,
    )


def test_a_missing_cluster_is_explained(client: ContainerServiceClient) -> None:
    with pytest.raises(NodePoolError, match=r"not found .*check nodePool\.subscriptionId"):
        ensure_confidential_pool(client, pool("no-such-cluster"))


def test_a_failed_provisioning_is_reported_then_retried(
    arm_double: ArmDouble, client: ContainerServiceClient, cluster: str
) -> None:
    arm_double.fail_provisioning("cvm")
    with pytest.raises(NodePoolError, match=r"could not provision.*OverconstrainedAllocation") as e:
        ensure_confidential_pool(client, pool(cluster), wait=True, polling_interval=FAST)
    assert e.value.retriable
    retried = ensure_confidential_pool(client, pool(cluster))  # a Failed pool is re-applied
    assert (retried.provisioning_state, retried.changed) == ("Updating", True)
    assert len(arm_double.puts(cluster, "cvm")) == 2
    ensure_confidential_pool(client, pool(cluster))
    done = ensure_confidential_pool(client, pool(cluster))
    assert (done.ready, done.changed) == (True, False)


def test_a_rejected_token_is_explained(
    arm_double: ArmDouble, arm_settings: AzureSettings, cluster: str
) -> None:
    wrong = AzureSettings.for_emulator(
        "nope", connection_verify=arm_settings.connection_verify, arm_endpoint=arm_double.url
    )
    with pytest.raises(NodePoolError, match="did not accept the operator's credentials"):
        ensure_confidential_pool(container_service_client(SUB, wrong), pool(cluster))


def test_a_refused_tdx_pool_says_aks_cannot_make_one_yet(
    arm_double: ArmDouble, client: ContainerServiceClient, cluster: str
) -> None:
    arm_double.fail_next_put(400, "BadRequest", "The VM size Standard_DC4es_v5 is not supported.")
    tdx = pool(cluster, vm_size="Standard_DC4es_v5")
    with pytest.raises(NodePoolError, match="AKS currently fails to create TDX") as caught:
        ensure_confidential_pool(client, tdx, platform="tdx")
    assert "SEV-SNP size" in str(caught.value)
    assert not caught.value.retriable


# -- what a transient refusal says: one line naming the wait, as Key Vault's --------------------


@pytest.fixture
def faults_cleared(arm_double: ArmDouble) -> Iterator[ArmDouble]:
    yield arm_double
    arm_double.faults.clear()


@pytest.mark.parametrize(
    ("kind", "why", "status", "seconds"),
    [
        ("busy", "another operation on the pool is in progress", 409, DEFAULT_RETRY_SECONDS),
        ("throttle", "throttled", 429, 2.0),
        ("unavailable", "HTTP 503 ServiceUnavailable", 503, DEFAULT_RETRY_SECONDS),
    ],
)
def test_a_transient_refusal_says_what_aks_is_waited_for(
    *,
    faults_cleared: ArmDouble,
    client: ContainerServiceClient,
    cluster: str,
    kind: FaultKind,
    why: str,
    status: int,
    seconds: float,
) -> None:
    arm_double = faults_cleared
    arm_double.faults.inject(
        FaultPlan(rate=1.0, kinds=(kind,), retry_after=2, methods=frozenset({"PUT"}))
    )
    with pytest.raises(NodePoolError) as caught:
        ensure_confidential_pool(client, pool(cluster))
    refused = caught.value
    assert str(refused) == (
        f"waiting for AKS ({why}), retrying in {int(seconds)} s (creating node pool 'cvm' of "
        f"cluster {cluster!r} in resource group 'veil-rg')"
    )
    assert (refused.status, refused.retriable, refused.retry_after) == (status, True, seconds)
    assert refused.detail, "Azure's own words stay in the detail"
    assert arm_double.faults.injected()[kind] >= 1
    assert (SUB.lower(), RG.lower(), cluster.lower(), "cvm") not in arm_double.pools


def test_a_pool_request_answered_too_late_is_said_and_not_sent_twice(
    faults_cleared: ArmDouble, arm_settings: AzureSettings, cluster: str
) -> None:
    """AKS takes the PUT but answers after the client's timeout: "no answer in time", and the
    next pass reads the pool it made instead of requesting it again."""
    arm_double = faults_cleared
    impatient = container_service_client(
        SUB,
        dataclasses.replace(
            arm_settings, timeout_seconds=0.5, extra_client_kwargs={"retry_total": 0}
        ),
    )
    arm_double.faults.inject(
        FaultPlan(rate=1.0, kinds=("hang",), hang_seconds=2, methods=frozenset({"PUT"}))
    )
    with pytest.raises(NodePoolError) as caught:
        ensure_confidential_pool(impatient, pool(cluster))
    arm_double.faults.clear()
    assert str(caught.value).startswith(
        f"waiting for AKS (no answer in time), retrying in {int(DEFAULT_RETRY_SECONDS)} s "
        "(creating node pool 'cvm'"
    )
    assert caught.value.retriable
    assert caught.value.retry_after == DEFAULT_RETRY_SECONDS
    assert "\n" not in str(caught.value)
    # AKS carried the request out all the same.
    assert (SUB.lower(), RG.lower(), cluster.lower(), "cvm") in arm_double.pools
    again = ensure_confidential_pool(impatient, pool(cluster))
    assert not again.changed
    assert len(arm_double.puts(cluster, "cvm")) == 1
