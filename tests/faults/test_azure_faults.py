"""Scenario 3: Key Vault and ARM throttle (429 + Retry-After), fail (503), refuse a pool write
while another operation runs (ARM 409) and answer past the client's timeout, at a seeded 30% of
calls, during a burst of ConfidentialModels on the real control plane.

Checked: every model converges Ready; no key has two versions (one policy each); every node
pool Veil asked for is provisioned whole (no pool left half-requested, no PUT without its VM
size); and what status says while Azure fails is one line that names the wait, never a stack
trace. The recovery time (faults off to the last model Ready) is printed and kept in
bench/results/faults.json.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.localcluster import LocalCluster
from tests.faults.models import (
    AKS,
    CLIENT_TIMEOUT,
    PLURAL,
    RG,
    SUB,
    Doubles,
    Messages,
    assert_one_line,
    converge,
    doubles_with_keys,
    listed,
    model,
    operator_in,
)
from tests.faults.results import record
from tests.integration.conftest import (
    condition,
    wait_for,
)
from veil import API_GROUP, API_VERSION
from veil_standins.faults import FaultPlan

pytestmark = [pytest.mark.cluster, pytest.mark.faults]

NAMESPACE = "veil-faults-azure"
OPERATOR_USER = "veil-faults-operator"
BURST = 12
RATE = 0.3
CONVERGE_TIMEOUT = 300


@pytest.fixture(scope="module")
def doubles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doubles]:
    with doubles_with_keys(tmp_path_factory.mktemp("faults-tls"), BURST + 2) as made:
        yield made


@pytest.fixture(scope="module")
def objects(
    crds: LocalCluster, api: client.ApiClient, doubles: Doubles, tmp_path_factory: Any
) -> Iterator[client.CustomObjectsApi]:
    log = Path(tmp_path_factory.mktemp("faults-operator")) / "veil.log"
    with operator_in(crds, NAMESPACE, OPERATOR_USER, doubles, log):
        yield client.CustomObjectsApi(api)


def test_a_burst_under_30_percent_azure_faults_converges_whole(
    objects: client.CustomObjectsApi, doubles: Doubles
) -> None:
    kv, arm = doubles.key_vault, doubles.arm
    kv.faults.inject(FaultPlan(rate=RATE, seed=3, retry_after=1, hang_seconds=2 * CLIENT_TIMEOUT))
    arm.faults.inject(
        FaultPlan(
            rate=RATE,
            kinds=("throttle", "busy", "unavailable", "hang"),
            seed=5,
            retry_after=1,
            hang_seconds=2 * CLIENT_TIMEOUT,
        )
    )
    names = [f"burst-{i:02d}" for i in range(BURST)]
    messages = Messages()
    started = time.monotonic()
    try:
        for i, name in enumerate(names):
            objects.create_namespaced_custom_object(
                API_GROUP,
                API_VERSION,
                NAMESPACE,
                PLURAL,
                model(doubles, NAMESPACE, name, f"pool{i:02d}"),
            )
        items = converge(objects, NAMESPACE, names, messages, CONVERGE_TIMEOUT)
    finally:
        kv_injected, arm_injected = kv.faults.injected(), arm.faults.injected()
        kv.faults.clear()
        arm.faults.clear()
    converged_in = time.monotonic() - started
    print(f"\nazure faults: {BURST} models Ready in {converged_in:.1f} s under {RATE:.0%} faults")
    print(f"  Key Vault injected {kv_injected}; ARM injected {arm_injected}")
    record(
        "azure-throttling-and-errors",
        models=BURST,
        fault_rate=RATE,
        injected={"keyVault": kv_injected, "arm": arm_injected},
        converged_seconds=round(converged_in, 1),
    )

    # The faults happened, at both services, of several kinds.
    assert sum(kv_injected.values()) >= 3, kv_injected
    assert sum(arm_injected.values()) >= 3, arm_injected
    assert len(set(kv_injected) | set(arm_injected)) >= 3

    # Never two key versions for one policy.
    for obj in items:
        name = obj["metadata"]["name"]
        versions = kv.keys[name]
        assert len(versions) == 1, f"{name}: {len(versions)} key versions"
        assert obj["status"]["keyVersion"] == versions[0].version

    # Every pool requested whole and provisioned: none left Creating or Failed, every PUT
    # carried the VM size and Veil's taint, every operation AKS started has ended.
    for i in range(BURST):
        pool = arm.pools[(SUB.lower(), RG.lower(), AKS.lower(), f"pool{i:02d}")]
        assert pool["provisioningState"] == "Succeeded", pool
        assert pool["vmSize"] == "Standard_DC4as_v5"
        for body in arm.puts(AKS, f"pool{i:02d}"):
            props = body["properties"]
            assert props["vmSize"] == "Standard_DC4as_v5", props
            assert "veil.dev/confidential=true:NoSchedule" in props["nodeTaints"], props
    assert len(arm.pools) == BURST
    assert all(op.status == "Succeeded" for op in arm.operations.values())

    assert_one_line(messages)


def test_throttled_key_vault_is_said_and_waited_out(
    objects: client.CustomObjectsApi, doubles: Doubles
) -> None:
    """A vault that throttles every call for a while: the SDK's retries run out, status says
    "waiting for Key Vault (throttled), retrying in 1 s", and once the throttling ends the
    model converges with one key version."""
    kv = doubles.key_vault
    name = "throttled"
    kv.faults.inject(
        FaultPlan(rate=1.0, kinds=("throttle",), retry_after=1, path_contains=f"/keys/{name}")
    )
    messages = Messages()
    try:
        objects.create_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, PLURAL, model(doubles, NAMESPACE, name, "throttled")
        )

        def said() -> str | None:
            obj = next(
                (o for o in listed(objects, NAMESPACE) if o["metadata"]["name"] == name), None
            )
            if obj is None:
                return None
            messages.note([obj])
            key_ready = condition(obj, "KeyReady")
            return str(key_ready["message"]) if key_ready.get("status") == "False" else None

        message = wait_for(said, timeout=120, interval=0.3, what="KeyReady False while throttled")
    finally:
        kv.faults.clear()
    lifted = time.monotonic()
    assert message.startswith("waiting for Key Vault (throttled), retrying in 1 s"), message
    obj = next(o for o in listed(objects, NAMESPACE) if o["metadata"]["name"] == name)
    assert condition(obj, "KeyReady")["reason"] == "KeyVaultUnavailable"
    assert condition(obj, "Ready")["status"] == "False"
    assert name not in kv.keys, "nothing was created while every call was throttled"

    converge(objects, NAMESPACE, [name], messages, 120)
    recovery = time.monotonic() - lifted
    print(f"\nthrottling lifted: model Ready {recovery:.1f} s later")
    record("key-vault-throttled-then-lifted", recovery_seconds=round(recovery, 1))
    assert len(kv.keys[name]) == 1
    assert_one_line(messages)
