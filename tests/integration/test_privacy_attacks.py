"""Attacks on the privacy budget, on the real API server: each tries to spend without paying.

- pay with a budget for another dataset, or open a second budget for the same dataset;
- forge the ledger in status (consistent-looking, removed, or an older one put back);
- delete the budget and start again from zero;
- break the audit trail with a write conflict during compaction.

Synthesis and training attacks (domains, reports, splits) are in tests/unit/attacks/.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.cluster.localcluster import LocalCluster
from tests.integration.conftest import OperatorProcess, wait_for, wait_for_condition
from tests.integration.test_synthetic_dataset import dataset as synthetic_dataset
from veil import API_GROUP, API_VERSION
from veil.controllers import budget_store as budget_store_module
from veil.controllers.budget_store import (
    BindingRefusedError,
    BudgetGoneError,
    BudgetRef,
    BudgetStore,
    DatasetMismatchError,
)
from veil.privacy import (
    BudgetTerms,
    ClaimRequest,
    ConsumerRef,
    EpsilonDeltaMechanism,
    Ledger,
    decide,
    epsilon_spent,
    mark_consumed,
    verify_audit_trail,
)
from veil.privacy.ledger import recompute_charged
from veil.privacy.seal import LedgerTamperedError

pytestmark = pytest.mark.cluster

NAMESPACE = "veil-attacks"
PLURAL = "privacybudgets"


@pytest.fixture(scope="module")
def objects(crds: LocalCluster, api: client.ApiClient) -> client.CustomObjectsApi:
    crds.kubectl("create", "namespace", NAMESPACE)
    return client.CustomObjectsApi(api)


@pytest.fixture(scope="module")
def store(api: client.ApiClient, objects: client.CustomObjectsApi) -> BudgetStore:
    return BudgetStore(api)


def uri(name: str) -> str:
    return f"file:///data/{NAMESPACE}/{name}.csv"


def make_budget(
    objects: client.CustomObjectsApi, name: str, dataset: str, epsilon: float = 1.0
) -> BudgetRef:
    objects.create_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        NAMESPACE,
        PLURAL,
        {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "PrivacyBudget",
            "metadata": {"name": name},
            "spec": {
                "dataset": {"name": name, "uri": dataset},
                "epsilon": epsilon,
                "delta": 1e-5,
                "accountant": "rdp",
            },
        },
    )
    return BudgetRef(NAMESPACE, name)


def claim(key: str, epsilon: float, dataset: str | None) -> ClaimRequest:
    return ClaimRequest(
        key=key,
        consumer=ConsumerRef(kind="SyntheticDataset", namespace=NAMESPACE, name=key),
        mechanisms=(EpsilonDeltaMechanism(epsilon=epsilon),),
        dataset=dataset,
    )


def spend(store: BudgetStore, ref: BudgetRef, key: str, epsilon: float, dataset: str) -> str:
    """Claim and, when granted, consume: what a consumer does before its Job may read."""
    decision = store.claim(ref, claim(key, epsilon, dataset))
    if decision.state == "Granted":
        store.consume(ref, key)
    return decision.state


def condition(store: BudgetStore, ref: BudgetRef, type_: str) -> dict[str, Any]:
    conditions = (store.get(ref).get("status") or {}).get("conditions", [])
    return next((c for c in conditions if c["type"] == type_), {})


def write_status(objects: client.CustomObjectsApi, ref: BudgetRef, status: dict[str, Any]) -> None:
    """What anyone allowed to write privacybudgets/status can do."""
    objects.patch_namespaced_custom_object_status(
        API_GROUP, API_VERSION, ref.namespace, PLURAL, ref.name, {"status": status}
    )


def test_a_budget_pays_only_for_its_own_dataset(
    store: BudgetStore, objects: client.CustomObjectsApi
) -> None:
    ref = make_budget(objects, "oncology", uri("oncology"))
    with pytest.raises(DatasetMismatchError, match="pays only for"):
        store.claim(ref, claim("reads-payroll", 0.5, uri("payroll")))
    with pytest.raises(DatasetMismatchError, match="an unnamed dataset"):
        store.claim(ref, claim("reads-anything", 0.5, None))
    assert spend(store, ref, "reads-oncology", 0.5, uri("oncology")) == "Granted"
    ledger = Ledger.from_wire(store.get(ref)["status"]["ledger"])
    assert sorted(ledger.claims) == ["reads-oncology"]


def test_a_second_budget_for_the_same_dataset_is_refused(
    store: BudgetStore, objects: client.CustomObjectsApi
) -> None:
    first = make_budget(objects, "cohort", uri("cohort"))
    assert spend(store, first, "c1", 0.9, uri("cohort")) == "Granted"
    second = make_budget(objects, "cohort-again", uri("cohort"))
    with pytest.raises(BindingRefusedError, match="already protects dataset"):
        store.claim(second, claim("c2", 0.9, uri("cohort")))
    stalled = condition(store, second, "Stalled")
    assert stalled.get("reason") == "BindingRefused"
    assert "cohort" in stalled["message"]
    assert not (store.get(second).get("status") or {}).get("ledger")


def test_a_forged_consistent_looking_ledger_stops_all_granting(
    store: BudgetStore, objects: client.CustomObjectsApi
) -> None:
    ref = make_budget(objects, "forged", uri("forged"))
    for index in range(3):
        assert spend(store, ref, f"f{index}", 0.3, uri("forged")) == "Granted"
    status = store.get(ref)["status"]
    honest = Ledger.from_wire(status["ledger"])
    # The forger keeps the seal and rewrites the ledger so it still checks out on its own:
    # the spent claims are gone and `charged` is recomputed to match.
    emptied = honest.model_copy(update={"claims": {}})
    forged = emptied.model_copy(update={"charged": recompute_charged(emptied)})
    Ledger.model_validate(forged.to_wire())  # consistent: the ledger's own check passes
    write_status(objects, ref, {"ledger": forged.to_wire(), "epsilonSpent": 0.0})
    with pytest.raises(LedgerTamperedError, match="does not match its seal"):
        store.claim(ref, claim("f-more", 0.5, uri("forged")))
    assert condition(store, ref, "Stalled").get("reason") == "LedgerTampered"
    assert "f-more" not in Ledger.from_wire(store.get(ref)["status"]["ledger"]).claims


def test_a_removed_or_rolled_back_ledger_is_detected(
    store: BudgetStore, objects: client.CustomObjectsApi
) -> None:
    removed = make_budget(objects, "removed", uri("removed"))
    assert spend(store, removed, "r1", 0.8, uri("removed")) == "Granted"
    wait_for(
        lambda: (store.get(removed)["metadata"].get("annotations") or {}).get(
            budget_store_module.LEDGER_ANNOTATION
        ),
        what="the budget marked as sealed",
    )
    write_status(objects, removed, {"ledger": None, "ledgerSeal": None, "epsilonSpent": 0.0})
    with pytest.raises(LedgerTamperedError, match="removed"):
        store.claim(removed, claim("r2", 0.8, uri("removed")))

    rolled = make_budget(objects, "rolled", uri("rolled"))
    assert spend(store, rolled, "b1", 0.1, uri("rolled")) == "Granted"
    before = store.get(rolled)["status"]
    assert spend(store, rolled, "b2", 0.8, uri("rolled")) == "Granted"
    # Put back the older status: a genuine seal, of an older ledger.
    write_status(objects, rolled, {"ledger": before["ledger"], "ledgerSeal": before["ledgerSeal"]})
    with pytest.raises(LedgerTamperedError, match="older one"):
        store.claim(rolled, claim("b3", 0.8, uri("rolled")))


def test_deleting_a_budget_does_not_reset_what_its_dataset_has_spent(
    operator: OperatorProcess, store: BudgetStore, objects: client.CustomObjectsApi
) -> None:
    dataset = uri("registry")
    first = make_budget(objects, "registry", dataset)
    assert spend(store, first, "g1", 0.5, dataset) == "Granted"
    assert spend(store, first, "g2", 0.3, dataset) == "Granted"
    # The operator's finalizer writes the spending record before the budget goes.
    wait_for(lambda: "veil.dev/finalizer" in store.get(first)["metadata"].get("finalizers", []))
    objects.delete_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, "registry")

    def gone(ref: BudgetRef) -> bool:
        try:
            store.get(ref)
        except BudgetGoneError:
            return True
        return False

    wait_for(lambda: gone(first), timeout=60, what="the budget to be deleted")
    records = store.spending_records(dataset)
    assert len(records) == 1
    assert records[0]["verified"]
    assert records[0]["epsilonSpent"] == pytest.approx(0.8)

    # A new budget for the same dataset starts from 0.8 spent, under any name.
    second = make_budget(objects, "registry-v2", dataset)
    assert spend(store, second, "g3", 0.5, dataset) == "Denied"
    assert spend(store, second, "g4", 0.15, dataset) == "Granted"
    status = store.get(second)["status"]
    assert status["epsilonSpent"] == pytest.approx(0.95)
    assert status["ledger"]["binding"]["carriedFrom"] == [records[0]["name"]]

    # And a third, after the second goes too, counts the first budget's spending once.
    objects.delete_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, PLURAL, "registry-v2"
    )
    wait_for(lambda: len(store.spending_records(dataset)) == 2, timeout=60, what="2nd record")
    # Its record is written before the finalizer lets it go: until it is gone, it still
    # protects the dataset and a third budget would be refused the binding.
    wait_for(lambda: gone(second), timeout=60, what="the second budget to be deleted")
    third = make_budget(objects, "registry-v3", dataset)
    assert spend(store, third, "g5", 0.04, dataset) == "Granted"
    assert store.get(third)["status"]["epsilonSpent"] == pytest.approx(0.99)


def _consumed(ledger: Ledger, keys: range, epsilon: float, start: datetime) -> Ledger:
    terms = BudgetTerms(epsilon=1000.0, delta=1e-5, accountant="rdp")
    for index in keys:
        now = start + timedelta(seconds=index)
        request = claim(f"k{index:04d}", epsilon, uri("audited"))
        ledger, _ = decide(ledger, request, terms, now)
        ledger = mark_consumed(ledger, request.key, now)
    return ledger


def test_the_audit_trail_verifies_after_a_write_conflict_during_compaction(
    api: client.ApiClient, objects: client.CustomObjectsApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer lands between our audit batch and our status write: our write gets 409
    from the API server, and the retry folds a different set of claims. The trail must still
    verify against the ledger."""
    ref = make_budget(objects, "audited", uri("audited"), epsilon=1000.0)
    ours, theirs = BudgetStore(api), BudgetStore(api)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    ours.transact(ref, lambda ledger, *_: (_consumed(ledger, range(390), 0.01, start), None))

    interfered = []
    write_audit = ours._write_audit

    def interfere_once(budget: Any, batches: Any) -> None:
        write_audit(budget, batches)
        if batches and not interfered:
            interfered.append(True)
            # Five more claims through another writer: its write changes resourceVersion.
            theirs.transact(
                ref, lambda ledger, *_: (_consumed(ledger, range(1000, 1005), 0.01, start), None)
            )

    monkeypatch.setattr(ours, "_write_audit", interfere_once)
    ours.transact(ref, lambda ledger, *_: (_consumed(ledger, range(390, 420), 0.01, start), None))
    assert interfered, "the compaction wrote batches and met the other writer"

    budget = ours.get(ref)
    ledger = Ledger.from_wire(budget["status"]["ledger"])
    batches = ours.audit_batches(budget)
    assert len(batches) > ledger.folded.batches, "the lost attempt left an orphan batch"
    verify_audit_trail(ledger, batches)
    folded = sum(ledger.folded.counts.values())
    assert folded + len(ledger.claims) == 425
    # 425 claims of ε 0.01, through the Rényi filter (far below their sum, 4.25).
    assert budget["status"]["epsilonSpent"] == pytest.approx(
        epsilon_spent([EpsilonDeltaMechanism(epsilon=0.01, count=425)], 1e-5, "rdp"), rel=1e-9
    )
    maps = client.CoreV1Api(api).list_namespaced_config_map(
        NAMESPACE, label_selector="app.kubernetes.io/component=audit"
    )
    assert all(not m.metadata.owner_references for m in maps.items), "the trail outlives"
    assert all(
        json.loads(m.data["batch.json"])["sequence"] == int(m.metadata.name.split("-")[2])
        for m in maps.items
        if m.metadata.name.startswith("audited-audit-")
    )


def test_a_synthetic_dataset_cannot_pay_with_another_dataset_s_budget(
    operator: OperatorProcess,
    store: BudgetStore,
    objects: client.CustomObjectsApi,
    api: client.ApiClient,
    tmp_path: Path,
) -> None:
    """The analyst points a SyntheticDataset at the payroll table and its budget at the
    (generous) budget of a public-health table: nothing is charged, no Job is created."""
    ref = make_budget(objects, "public-health", uri("public-health"), epsilon=10.0)
    manifest = synthetic_dataset("payroll-copy", tmp_path / "payroll.csv", epsilon=1.0)
    manifest["metadata"]["namespace"] = NAMESPACE
    manifest["spec"]["budgetRef"] = {"name": ref.name}
    objects.create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, "syntheticdatasets", manifest
    )
    obj = wait_for_condition(
        lambda: objects.get_namespaced_custom_object(
            API_GROUP, API_VERSION, NAMESPACE, "syntheticdatasets", "payroll-copy"
        ),
        "Stalled",
        "True",
        timeout=60,
    )
    stalled = next(c for c in obj["status"]["conditions"] if c["type"] == "Stalled")
    assert stalled["reason"] == "DatasetMismatch"
    assert "pays only for" in stalled["message"]
    jobs = client.BatchV1Api(api).list_namespaced_job(NAMESPACE).items
    assert not [j for j in jobs if j.metadata.name.startswith("payroll-copy")]
    ledger = (store.get(ref).get("status") or {}).get("ledger") or {}
    assert not ledger.get("claims"), "nothing was claimed from the public-health budget"
