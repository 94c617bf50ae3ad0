"""Scenario 4: the operator killed (SIGKILL, no shutdown handlers) at a chosen point of its
work, then a new operator started.

The points are reached deterministically where the doubles allow it: Key Vault (or ARM) carries
out the key creation (or the node-pool PUT) and holds its answer back, so the kill lands while
the call is in flight, its effect made but unseen by the caller; a Job creation and a status
write are caught in the API server's audit log as they are answered (blocking audit mode), and
the kill follows at once, in the middle of a burst of claims.

Checked: no second key version, no second pool request, no Job, claim or grant doubled or lost;
every model converges Ready and every claim gets exactly one answer. The recovery time (new
operator started to converged) is kept in bench/results/faults.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.localcluster import LocalCluster
from tests.faults import claims
from tests.faults.models import (
    AKS,
    PLURAL,
    RG,
    SUB,
    Doubles,
    Messages,
    assert_one_line,
    children_owned_once,
    converge,
    doubles_with_keys,
    model,
    operator_users,
)
from tests.faults.results import record
from tests.integration.conftest import OperatorProcess, wait_for
from veil import API_GROUP, API_VERSION
from veil_standins.faults import FaultPlan, Faults

pytestmark = [pytest.mark.cluster, pytest.mark.faults]

NAMESPACE = "veil-faults-killed"
OPERATOR_USER = "veil-faults-killed-operator"
HELD = 60  # seconds a double holds the answer: longer than the kill takes to follow
CLAIMANTS = 16  # per kill: half before it, half while no operator runs
CONVERGE_TIMEOUT = 120


@pytest.fixture(scope="module")
def doubles(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Doubles]:
    with doubles_with_keys(tmp_path_factory.mktemp("killed-tls"), 3) as made:
        yield made


@pytest.fixture(scope="module")
def kubeconfig(crds: LocalCluster) -> Iterator[Path]:
    with operator_users(crds, NAMESPACE, (OPERATOR_USER,)) as made:
        yield made[OPERATOR_USER]


@pytest.fixture
def objects(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


@dataclass(frozen=True)
class Rig:
    """What each kill needs: the cluster, the operator's kubeconfig, the doubles, the API."""

    cluster: LocalCluster
    kubeconfig: Path
    doubles: Doubles
    objects: client.CustomObjectsApi

    def start(self, log: Path) -> OperatorProcess:
        operator = OperatorProcess(
            self.cluster, log, self.kubeconfig, self.doubles.operator_env(), namespaces=NAMESPACE
        )
        operator.wait_healthy()
        return operator

    def killed_while_an_answer_is_held(
        self,
        faults: Faults,
        held: tuple[str, str],
        body: dict[str, Any],
        reached: Callable[[], object],
        log: Path,
    ) -> None:
        """An operator starts and `body` is created; the double behind `faults` carries out
        the call `held` names (method, path part) but holds its answer; once `reached()` says
        the call landed, the operator is SIGKILLed, never having seen the answer."""
        method, path_part = held
        faults.inject(
            FaultPlan(
                rate=1.0,
                kinds=("hang",),
                hang_seconds=HELD,
                methods=frozenset({method}),
                path_contains=path_part,
            )
        )
        first = self.start(log)
        try:
            self.objects.create_namespaced_custom_object(
                API_GROUP, API_VERSION, NAMESPACE, PLURAL, body
            )
            wait_for(reached, timeout=60, interval=0.05, what=f"{method} {path_part}")
        finally:
            first.kill()
            faults.clear()
        assert faults.injected().get("hang", 0) >= 1, "the answer was held back"

    def restarted_converges(self, name: str, log: Path) -> tuple[dict[str, Any], float]:
        """A new operator; the model Ready; the seconds from the new operator's start."""
        started = time.monotonic()
        second = self.start(log)
        messages = Messages()
        try:
            (found,) = converge(self.objects, NAMESPACE, [name], messages, CONVERGE_TIMEOUT)
        finally:
            second.stop()
        assert_one_line(messages)
        return found, time.monotonic() - started


@pytest.fixture
def rig(
    crds: LocalCluster, kubeconfig: Path, doubles: Doubles, objects: client.CustomObjectsApi
) -> Rig:
    return Rig(crds, kubeconfig, doubles, objects)


def test_killed_during_a_key_creation(rig: Rig, doubles: Doubles, tmp_path: Path) -> None:
    """Key Vault makes the key and holds its answer; the operator dies waiting for it. The
    new operator, which never saw the answer, finds the key instead of making another."""
    kv, name = doubles.key_vault, "killed-key"
    rig.killed_while_an_answer_is_held(
        kv.faults,
        ("POST", f"/keys/{name}/create"),
        model(doubles, NAMESPACE, name, "kkey"),
        lambda: name in kv.keys,
        tmp_path / "first.log",
    )
    assert len(kv.keys[name]) == 1

    found, recovery = rig.restarted_converges(name, tmp_path / "second.log")
    print(f"\nkilled during a key creation: model Ready {recovery:.1f} s after the restart")
    record("operator-killed-key-creation", recovery_seconds=round(recovery, 1))
    versions = kv.keys[name]
    assert len(versions) == 1, f"{len(versions)} key versions"
    assert found["status"]["keyVersion"] == versions[0].version
    creations = [r for r in kv.requests if r == ("POST", f"/keys/{name}/create")]
    assert len(creations) == 1, "the new operator asked for no second key"


def test_killed_during_a_node_pool_request(
    rig: Rig,
    api: client.ApiClient,
    objects: client.CustomObjectsApi,
    doubles: Doubles,
    tmp_path: Path,
) -> None:
    """AKS takes the pool's PUT and holds its answer; the operator dies waiting for it. The
    new operator reads the pool AKS made instead of requesting it again."""
    arm, name, pool = doubles.arm, "killed-pool", "kpool"
    rig.killed_while_an_answer_is_held(
        arm.faults,
        ("PUT", f"/agentPools/{pool}"),
        model(doubles, NAMESPACE, name, pool),
        lambda: arm.puts(AKS, pool),
        tmp_path / "first.log",
    )

    found, recovery = rig.restarted_converges(name, tmp_path / "second.log")
    print(f"\nkilled during a node-pool request: model Ready {recovery:.1f} s after the restart")
    record("operator-killed-node-pool-request", recovery_seconds=round(recovery, 1))
    assert len(arm.puts(AKS, pool)) == 1, "the pool was requested once"
    made = arm.pools[(SUB.lower(), RG.lower(), AKS.lower(), pool)]
    assert made["provisioningState"] == "Succeeded"
    assert found["status"]["nodePoolState"] == "Succeeded"
    assert len(doubles.key_vault.keys[name]) == 1
    children_owned_once(api, objects, NAMESPACE)


def _job_created(event: dict[str, Any]) -> bool:
    # Veil writes children by server-side apply: a PATCH that answers 201 when it creates.
    ref = event.get("objectRef") or {}
    code = (event.get("responseStatus") or {}).get("code")
    return ref.get("resource") == "jobs" and event.get("verb") == "patch" and code == 201


def _status_written(event: dict[str, Any]) -> bool:
    ref = event.get("objectRef") or {}
    code = (event.get("responseStatus") or {}).get("code")
    return (
        ref.get("resource") == claims.PLURAL
        and ref.get("subresource") == "status"
        and event.get("verb") == "patch"
        and code == 200
    )


@pytest.mark.parametrize(
    ("point", "reached"),
    [("job-creation", _job_created), ("status-write", _status_written)],
)
def test_killed_at_a_write_mid_burst_of_claims(
    *,
    rig: Rig,
    crds: LocalCluster,
    api: client.ApiClient,
    objects: client.CustomObjectsApi,
    tmp_path: Path,
    point: str,
    reached: Any,
) -> None:
    """Killed the moment the API server has answered the operator's first Job creation (or
    first dataset status write) of a burst: the new operator finishes the burst with one claim,
    one answer and at most one Job per dataset, exactly the paid-for ones."""
    claimants = claims.burst(NAMESPACE, f"kill-{point}", CLAIMANTS)
    claims.create_budget_of(objects, claimants)
    _, offset = crds.audit_since(0)
    first = rig.start(tmp_path / "first.log")
    try:
        claims.create_datasets(objects, claimants, list(claimants.names[: CLAIMANTS // 2]))

        def the_point() -> bool:
            nonlocal offset
            events, offset = crds.audit_since(offset, OPERATOR_USER)
            return any(reached(e) for e in events)

        wait_for(the_point, timeout=60, interval=0.02, what=f"the operator's first {point}")
    finally:
        first.kill()
    answered_at_kill = claims.answered_count(objects, claimants)
    ledger_at_kill = claims.ledger_of(objects, claimants)
    claims.create_datasets(objects, claimants, list(claimants.names[CLAIMANTS // 2 :]))

    restarted = time.monotonic()
    second = rig.start(tmp_path / "second.log")
    try:
        items = claims.wait_answered(objects, claimants, CONVERGE_TIMEOUT)
    finally:
        second.stop()
    recovery = time.monotonic() - restarted
    paid = claims.check_claims(api, objects, claimants, items)
    print(
        f"\nkilled at the first {point}: {len(ledger_at_kill.claims)} claims decided and "
        f"{answered_at_kill} answered at the kill; all {CLAIMANTS} answered {recovery:.1f} s "
        f"after the restart ({paid.granted} granted, {paid.denied} denied)"
    )
    record(
        f"operator-killed-{point}",
        claimants=CLAIMANTS,
        claims_decided_at_kill=len(ledger_at_kill.claims),
        claims_answered_at_kill=answered_at_kill,
        granted=paid.granted,
        denied=paid.denied,
        recovery_seconds=round(recovery, 1),
    )
    # What the first operator decided stands: a claim it decided is never decided anew.
    final = claims.ledger_of(objects, claimants)
    for key, claim in ledger_at_kill.claims.items():
        if claim.state in claims.SPENT or claim.state == "Denied":
            assert final.claims[key].state in (claim.state, "Consumed"), key
