"""PrivacyBudget admission on the real API server: concurrency, crashes, size, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes import client, config

from tests.cluster.localcluster import LocalCluster
from tests.integration.claimant import dataset_of, request
from tests.integration.conftest import OperatorProcess, wait_for
from veil import API_GROUP, API_VERSION
from veil.controllers.budget_store import BudgetRef, BudgetStore, BudgetUnavailableError
from veil.privacy import (
    BudgetTerms,
    ClaimRequest,
    ConsumerRef,
    DpSgdMechanism,
    EpsilonDeltaMechanism,
    Ledger,
    compact,
    decide,
    epsilon_spent,
    mark_consumed,
    verify_audit_trail,
)
from veil.privacy.audit import chain

NAMESPACE = "veil-budgets"
API_OBJECT_LIMIT = 1_572_864  # etcd's default request limit, 1.5 MiB


@pytest.fixture(scope="module")
def store(crds: LocalCluster, api: client.ApiClient) -> BudgetStore:
    crds.kubectl("create", "namespace", NAMESPACE)
    return BudgetStore(api)


def _budget(
    api: client.ApiClient, name: str, epsilon: float, accountant: str = "rdp", **spec: Any
) -> BudgetRef:
    body = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "PrivacyBudget",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "dataset": {"name": name, "uri": dataset_of(NAMESPACE, name)},
            "epsilon": epsilon,
            "delta": 1e-5,
            "accountant": accountant,
            **spec,
        },
    }
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "privacybudgets", body
    )
    return BudgetRef(NAMESPACE, name)


def _ledger(store: BudgetStore, ref: BudgetRef) -> Ledger:
    return Ledger.from_wire(store.get(ref)["status"]["ledger"])


def test_64_concurrent_claimants_never_overspend(
    store: BudgetStore, api: client.ApiClient, crds: LocalCluster
) -> None:
    ref = _budget(api, "concurrent", epsilon=3.0)
    requests = [request(i, NAMESPACE, "concurrent") for i in range(64)]
    # Eight stores, as eight operator replicas or CLIs would be: they share no lock, so they
    # really race, and only the API server's resourceVersion check keeps them apart.
    stores = [
        BudgetStore(config.new_client_from_config(config_file=str(crds.kubeconfig)))
        for _ in range(8)
    ]
    with ThreadPoolExecutor(max_workers=16) as pool:
        decisions = list(pool.map(lambda i: stores[i % 8].claim(ref, requests[i]), range(64)))
    assert len({d.key for d in decisions}) == 64, "every claimant gets an answer"
    assert {d.state for d in decisions} <= {"Granted", "Denied"}
    granted = [r for r, d in zip(requests, decisions, strict=True) if d.state == "Granted"]
    assert 0 < len(granted) < 64
    spent = epsilon_spent([m for r in granted for m in r.mechanisms], 1e-5, "rdp")
    assert spent <= 3.0
    # The budget agrees with the claimants, and one more claim would not have fitted.
    ledger = _ledger(store, ref)
    assert sorted(k for k, c in ledger.claims.items() if c.state == "Granted") == sorted(
        r.key for r in granted
    )
    one_more = [m for r in granted for m in r.mechanisms] + list(requests[0].mechanisms)
    assert epsilon_spent(one_more, 1e-5, "rdp") > 3.0
    status = store.get(ref)["status"]
    assert status["claims"]["granted"] == len(granted)
    assert status["epsilonSpent"] == pytest.approx(spent, rel=1e-6)


def test_concurrent_claims_are_group_committed_in_order(
    store: BudgetStore, api: client.ApiClient
) -> None:
    """64 claimants through one store (as in one operator): few writes, and the same ledger
    as deciding the claims one at a time in the order the budget recorded them."""
    ref = _budget(api, "grouped", epsilon=3.0)
    requests = {r.key: r for r in (request(i, NAMESPACE, "grouped") for i in range(64))}
    grouped = BudgetStore(api)
    write = grouped.objects.patch_namespaced_custom_object_status
    writes = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        writes.append(1)
        return write(*args, **kwargs)

    grouped.objects.patch_namespaced_custom_object_status = counted  # type: ignore[method-assign]
    with ThreadPoolExecutor(max_workers=64) as pool:
        decisions = list(pool.map(lambda r: grouped.claim(ref, r), requests.values()))
    assert [d.key for d in decisions] == list(requests), "each claimant gets its own answer"
    assert len(writes) < 64 / 4, f"{len(writes)} status writes for 64 claims"
    ledger = _ledger(store, ref)
    assert {d.key: d.state for d in decisions} == {k: c.state for k, c in ledger.claims.items()}
    terms = BudgetTerms(epsilon=3.0, delta=1e-5, accountant="rdp")
    serial = Ledger()
    for claim in sorted(ledger.claims.values(), key=lambda c: c.seq):
        serial, _ = decide(serial, requests[claim.key], terms, claim.requested_at)
    assert {k: c.state for k, c in serial.claims.items()} == {
        k: c.state for k, c in ledger.claims.items()
    }
    granted = [m for c in ledger.claims.values() if c.state == "Granted" for m in c.mechanisms]
    assert 0 < len(granted) < 64
    assert epsilon_spent(granted, 1e-5, "rdp") <= 3.0


def test_repeated_claim_is_the_same_claim(store: BudgetStore, api: client.ApiClient) -> None:
    ref = _budget(api, "idempotent", epsilon=10.0)
    first = store.claim(ref, request(1, NAMESPACE, "idempotent"))
    again = store.claim(ref, request(1, NAMESPACE, "idempotent"))
    assert first.state == again.state == "Granted"
    assert not again.changed
    assert len(_ledger(store, ref).claims) == 1


def test_killed_claimant_neither_double_grants_nor_loses(
    store: BudgetStore, api: client.ApiClient, crds: LocalCluster
) -> None:
    ref = _budget(api, "crashes", epsilon=3.0)
    args = [
        sys.executable,
        "-m",
        "tests.integration.claimant",
        str(crds.kubeconfig),
        NAMESPACE,
        ref.name,
    ]
    burst = subprocess.Popen([*args, "0", "40"], stdout=subprocess.PIPE, text=True)
    assert burst.stdout is not None
    for _ in range(5):
        burst.stdout.readline()  # let it get going, then kill it mid-claim
    burst.kill()
    burst.wait()
    answered_before = len(_ledger(store, ref).claims)
    assert 5 <= answered_before < 40
    # The restarted claimant asks again for everything.
    subprocess.run([*args, "0", "40"], check=True, capture_output=True)
    ledger = _ledger(store, ref)
    assert sorted(ledger.claims) == sorted(f"claimant-{i:04d}" for i in range(40))
    assert ledger.totals.requested == 40, "a retried claim is never a second request"
    granted = [m for c in ledger.claims.values() if c.state == "Granted" for m in c.mechanisms]
    assert epsilon_spent(granted, 1e-5, "rdp") <= 3.0


def test_claimant_killed_mid_group_commit_neither_double_grants_nor_loses(
    store: BudgetStore, api: client.ApiClient, crds: LocalCluster
) -> None:
    ref = _budget(api, "crashes-grouped", epsilon=3.0)
    args = [
        sys.executable,
        "-m",
        "tests.integration.claimant",
        str(crds.kubeconfig),
        NAMESPACE,
        ref.name,
        "0",
        "96",
        "16",
    ]
    burst = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    assert burst.stdout is not None
    for _ in range(5):
        burst.stdout.readline()  # some answers out, more claims queued or in a write
    burst.kill()
    burst.wait()
    assert 5 <= len(_ledger(store, ref).claims) < 96
    subprocess.run(args, check=True, capture_output=True)
    ledger = _ledger(store, ref)
    assert sorted(ledger.claims) == sorted(f"claimant-{i:04d}" for i in range(96))
    assert ledger.totals.requested == 96, "a retried claim is never a second request"
    granted = [m for c in ledger.claims.values() if c.state == "Granted" for m in c.mechanisms]
    assert epsilon_spent(granted, 1e-5, "rdp") <= 3.0


def test_ten_thousand_claims_fit_in_the_object(store: BudgetStore, api: client.ApiClient) -> None:
    ref = _budget(api, "ten-thousand", epsilon=1000.0)
    terms = BudgetTerms(epsilon=1000.0, delta=1e-5, accountant="rdp")
    ledger, trail = Ledger(), []
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for index in range(10_000):
        now = start + timedelta(seconds=index)
        claim = ClaimRequest(
            key=f"job-{index:05d}",
            consumer=ConsumerRef(kind="SyntheticDataset", namespace=NAMESPACE, name=f"j{index}"),
            mechanisms=(EpsilonDeltaMechanism(epsilon=0.05 + (index % 7) * 0.001),),
            dataset=dataset_of(NAMESPACE, "ten-thousand"),
        )
        ledger, _ = decide(ledger, claim, terms, now)
        ledger = mark_consumed(ledger, claim.key, now)
        if len(ledger.claims) > 400:
            ledger, batches = compact(ledger, now)
            trail += batches

    def install(*_: Any) -> tuple[Ledger, None]:
        return ledger, None

    store.transact(ref, install)
    stored = store.get(ref)
    size = len(json.dumps(stored).encode())
    assert size < API_OBJECT_LIMIT / 3, f"{size} bytes"
    assert Ledger.from_wire(stored["status"]["ledger"]).totals.consumed == 10_000
    assert stored["status"]["epsilonSpent"] == pytest.approx(
        epsilon_spent(ledger.charged, 1e-5, "rdp"), rel=1e-9
    )


def test_compaction_writes_the_audit_trail(store: BudgetStore, api: client.ApiClient) -> None:
    ref = _budget(api, "audited", epsilon=1000.0)
    terms = BudgetTerms(epsilon=1000.0, delta=1e-5, accountant="rdp")
    consumer = ConsumerRef(kind="SyntheticDataset", namespace=NAMESPACE, name="x")
    ledger, now = Ledger(), datetime(2026, 1, 1, tzinfo=UTC)
    for index in range(430):
        claim = ClaimRequest(
            key=f"k{index}",
            consumer=consumer,
            mechanisms=(EpsilonDeltaMechanism(epsilon=0.01),),
            dataset=dataset_of(NAMESPACE, "audited"),
        )
        ledger, _ = decide(ledger, claim, terms, now)
        ledger = mark_consumed(ledger, claim.key, now)

    def install(*_: Any) -> tuple[Ledger, None]:
        return ledger, None

    store.transact(ref, install)  # more claims than the status keeps: the store compacts
    maps = (
        client.CoreV1Api(api)
        .list_namespaced_config_map(NAMESPACE, label_selector="app.kubernetes.io/instance=audited")
        .items
    )
    assert maps, "folded claims are written to audit ConfigMaps"
    # The chain from the ledger's head (a write that lost a conflict leaves an orphan batch).
    compacted = _ledger(store, ref)
    trail = chain(compacted.folded.head, store.audit_batches(store.get(ref)))
    verify_audit_trail(compacted, trail)
    folded = sum(len(batch.claims) for batch in trail)
    assert folded > 0
    assert folded + len(compacted.claims) == 430
    # One more claim still works on the compacted ledger, and is charged once.
    extra = ClaimRequest(
        key="k-extra",
        consumer=consumer,
        mechanisms=(EpsilonDeltaMechanism(epsilon=0.01),),
        dataset=dataset_of(NAMESPACE, "audited"),
    )
    assert store.claim(ref, extra).state == "Granted"
    # 431 claims of ε 0.01 under the Rényi filter (the `rdp` accountant).
    assert store.get(ref)["status"]["epsilonSpent"] == pytest.approx(
        epsilon_spent([EpsilonDeltaMechanism(epsilon=0.01, count=431)], 1e-5, "rdp"), rel=1e-9
    )


def test_refusals_are_clear(store: BudgetStore, api: client.ApiClient) -> None:
    ref = _budget(api, "guarded", epsilon=5.0, spenders=[{"namespace": "team-a"}])
    outsider = request(1, NAMESPACE, "guarded")
    with pytest.raises(BudgetUnavailableError, match="may not spend"):
        store.claim(ref, outsider)
    with pytest.raises(BudgetUnavailableError, match="does not exist"):
        store.claim(BudgetRef(NAMESPACE, "no-such-budget"), outsider)
    with pytest.raises(ValueError, match="greater than 0"):
        DpSgdMechanism(sampling_rate=0.01, noise_multiplier=-1.0, steps=10)
    with pytest.raises(ValueError, match="less than 1"):
        EpsilonDeltaMechanism(epsilon=1.0, delta=1.0)


def test_operator_grants_waiting_claims_as_budget_unlocks(
    operator: OperatorProcess, store: BudgetStore, api: client.ApiClient
) -> None:
    # Half unlocked now, the rest after 4 s: the second claim waits, then is granted.
    ref = _budget(
        api,
        "unlocking",
        epsilon=2.0,
        unlock={"initialFraction": 0.5, "steps": 1, "intervalSeconds": 4},
    )
    consumer = ConsumerRef(kind="SyntheticDataset", namespace=NAMESPACE, name="u")
    first = store.claim(
        ref,
        ClaimRequest(
            key="u1",
            consumer=consumer,
            mechanisms=(EpsilonDeltaMechanism(epsilon=0.9),),
            dataset=dataset_of(NAMESPACE, "unlocking"),
        ),
    )
    second = store.claim(
        ref,
        ClaimRequest(
            key="u2",
            consumer=consumer,
            mechanisms=(EpsilonDeltaMechanism(epsilon=0.9),),
            dataset=dataset_of(NAMESPACE, "unlocking"),
        ),
    )
    assert (first.state, second.state) == ("Granted", "Pending")
    time.sleep(4)
    wait_for(
        lambda: _ledger(store, ref).claims["u2"].state == "Granted",
        timeout=60,
        what="the pending claim to be granted by the unlock timer",
    )
    status = store.get(ref)["status"]
    exhausted = next(c for c in status["conditions"] if c["type"] == "Exhausted")
    assert exhausted["status"] == "False"
    assert status["epsilonRemaining"] == pytest.approx(0.2, abs=1e-6)
