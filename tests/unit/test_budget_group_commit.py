"""Group commit in the BudgetStore, against a stand-in for the API server's part in it.

The stand-in keeps what the store relies on: every write bumps the object's resourceVersion,
a status write naming an older resourceVersion is refused with 409 and a missing object with
404, and a status patch is a JSON merge patch (RFC 7386) that touches only the status. The
real API server runs the same scenarios in tests/integration/test_budget_claims.py.
"""

from __future__ import annotations

import copy
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.unit.test_status_patch import apply_merge_patch
from veil.controllers.budget_store import BudgetRef, BudgetStore, DatasetMismatchError
from veil.privacy import (
    BudgetTerms,
    ClaimConflictError,
    ClaimRequest,
    ConsumerRef,
    GaussianMechanism,
    Ledger,
    decide,
    epsilon_spent,
)
from veil.privacy.seal import LedgerTamperedError

NAMESPACE, NAME = "team-a", "study"
DATASET = "file:///data/study.csv"
EPSILON, DELTA = 3.0, 1e-5
REF = BudgetRef(NAMESPACE, NAME)


class ApiServer:
    """The PrivacyBudget endpoints the store calls, with the API server's preconditions."""

    def __init__(self, write_seconds: float = 0.0) -> None:
        self.lock = threading.Lock()
        self.version = 0
        self.budget: dict[str, Any] | None = None
        self.reads = self.writes = self.conflicts = 0
        self.write_seconds = write_seconds
        self.gate: threading.Event | None = None  # when set, status writes wait for it

    def create(self) -> None:
        self.budget = {
            "apiVersion": "veil.dev/v1alpha1",
            "kind": "PrivacyBudget",
            "metadata": {
                "namespace": NAMESPACE,
                "name": NAME,
                "uid": "0b7f3c52-uid",
                "generation": 1,
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "resourceVersion": self._bump(),
            },
            "spec": {
                "dataset": {"name": NAME, "uri": DATASET},
                "epsilon": EPSILON,
                "delta": DELTA,
                "accountant": "rdp",
            },
        }

    def _bump(self) -> str:
        self.version += 1
        return str(self.version)

    def _found(self, namespace: str, name: str) -> dict[str, Any]:
        if self.budget is None or (namespace, name) != (NAMESPACE, NAME):
            raise ApiException(status=404, reason="Not Found")
        return self.budget

    # CustomObjectsApi

    def get_namespaced_custom_object(self, *args: str) -> dict[str, Any]:
        with self.lock:
            self.reads += 1
            return copy.deepcopy(self._found(args[2], args[4]))

    def patch_namespaced_custom_object_status(self, *args: Any) -> dict[str, Any]:
        if self.gate is not None:
            self.gate.wait(10)
        time.sleep(self.write_seconds)
        body = args[5]
        with self.lock:
            budget = self._found(args[2], args[4])
            wanted = (body.get("metadata") or {}).get("resourceVersion")
            if wanted is not None and wanted != budget["metadata"]["resourceVersion"]:
                self.conflicts += 1
                raise ApiException(status=409, reason="Conflict")
            self.writes += 1
            budget["status"] = apply_merge_patch(budget.get("status") or {}, body["status"])
            budget["metadata"]["resourceVersion"] = self._bump()
            return copy.deepcopy(budget)

    def patch_namespaced_custom_object(self, *args: Any) -> dict[str, Any]:
        with self.lock:
            budget = self._found(args[2], args[4])
            budget["metadata"] = apply_merge_patch(budget["metadata"], args[5]["metadata"])
            budget["metadata"]["resourceVersion"] = self._bump()
            return copy.deepcopy(budget)

    def list_cluster_custom_object(self, *_: str) -> dict[str, Any]:
        with self.lock:
            return {"items": [copy.deepcopy(self.budget)] if self.budget else []}

    # CoreV1Api: no spending records, no audit trail needed at these sizes

    def list_config_map_for_all_namespaces(self, **_: Any) -> Any:
        return SimpleNamespace(items=[])

    # What anyone allowed to write privacybudgets/status can do

    def overwrite_status(self, status: dict[str, Any]) -> None:
        with self.lock:
            budget = self._found(NAMESPACE, NAME)
            budget["status"] = apply_merge_patch(budget.get("status") or {}, status)
            budget["metadata"]["resourceVersion"] = self._bump()


def store_on(server: ApiServer) -> BudgetStore:
    store = BudgetStore(client.ApiClient(), ledger_key=b"k" * 32)
    store.objects = server  # type: ignore[assignment]
    store.core = server  # type: ignore[assignment]
    return store


def request(index: int, *, noise: float = 10.0, dataset: str = DATASET) -> ClaimRequest:
    return ClaimRequest(
        key=f"claim-{index:03d}",
        consumer=ConsumerRef(kind="SyntheticDataset", namespace=NAMESPACE, name=f"c{index}"),
        mechanisms=(GaussianMechanism(noise_multiplier=noise, count=2),),
        dataset=dataset,
    )


def ledger_of(server: ApiServer) -> Ledger:
    assert server.budget is not None
    return Ledger.from_wire(server.budget["status"]["ledger"])


@pytest.fixture
def server() -> ApiServer:
    api = ApiServer(write_seconds=0.02)
    api.create()
    return api


def test_concurrent_claims_share_writes_and_are_decided_as_one_after_another(
    server: ApiServer,
) -> None:
    store = store_on(server)
    requests = [request(i) for i in range(64)]
    with ThreadPoolExecutor(max_workers=64) as pool:
        decisions = list(pool.map(lambda r: store.claim(REF, r), requests))
    assert [d.key for d in decisions] == [r.key for r in requests], "each gets its own answer"
    assert {d.state for d in decisions} == {"Granted", "Denied"}
    assert server.writes < 64 / 4, f"{server.writes} writes for 64 claims"
    # The same ledger, decided one claim at a time in the order the budget recorded them.
    ledger = ledger_of(server)
    terms = BudgetTerms(epsilon=EPSILON, delta=DELTA, accountant="rdp")
    serial = Ledger()
    for claim in sorted(ledger.claims.values(), key=lambda c: c.seq):
        serial, _ = decide(serial, request(int(claim.key[-3:])), terms, claim.requested_at)
    assert {k: c.state for k, c in serial.claims.items()} == {
        k: c.state for k, c in ledger.claims.items()
    }
    answered = {d.key: d.state for d in decisions}
    assert answered == {k: c.state for k, c in ledger.claims.items()}
    granted = [m for c in ledger.claims.values() if c.state == "Granted" for m in c.mechanisms]
    assert epsilon_spent(granted, DELTA, "rdp") <= EPSILON


def test_a_refused_change_fails_alone_and_the_rest_of_its_write_goes_through(
    server: ApiServer,
) -> None:
    store = store_on(server)
    store.claim(REF, request(0))  # binds and seals: the next writes are claims only
    server.gate = threading.Event()
    with ThreadPoolExecutor(max_workers=4) as pool:
        first = pool.submit(store.claim, REF, request(1))
        while not store._groups[REF].committing:  # its write waits at the gate
            time.sleep(0.001)
        writes = server.writes
        # Queued behind it, so decided together in the next write: a claim that changes its
        # mechanisms under the same key, one for another dataset, and a good one.
        conflicting = pool.submit(store.claim, REF, request(1, noise=20.0))
        elsewhere = pool.submit(store.claim, REF, request(2, dataset="file:///other.csv"))
        good = pool.submit(store.claim, REF, request(3))
        while len(store._groups[REF].queue) < 3:
            time.sleep(0.001)
        server.gate.set()
        assert first.result().state == "Granted"
        assert good.result().state == "Granted"
        with pytest.raises(ClaimConflictError):
            conflicting.result()
        with pytest.raises(DatasetMismatchError):
            elsewhere.result()
    assert server.writes == writes + 2, "the first claim's write, then one for the queue"
    assert sorted(ledger_of(server).claims) == ["claim-000", "claim-001", "claim-003"]


def test_another_writer_is_caught_by_the_precondition(server: ApiServer) -> None:
    ours, theirs = store_on(server), store_on(server)
    assert ours.claim(REF, request(0)).state == "Granted"
    assert theirs.claim(REF, request(1)).state == "Granted"
    reads = server.reads
    # Ours builds on the budget its last write returned: the write is refused, and the claim
    # is decided again on a fresh read that holds their grant.
    assert ours.claim(REF, request(2)).state == "Granted"
    assert server.conflicts == 1
    assert server.reads == reads + 1
    assert sorted(ledger_of(server).claims) == ["claim-000", "claim-001", "claim-002"]
    assert ledger_of(server).totals.requested == 3


def test_the_remembered_budget_saves_reads_but_never_answers_alone(server: ApiServer) -> None:
    store = store_on(server)
    store.claim(REF, request(0))
    reads = server.reads
    store.claim(REF, request(1))
    assert server.reads == reads, "a new claim is written on the budget the last write returned"
    # A repeated claim changes nothing, so nothing is written to prove the remembered budget
    # current: it is read again, and a ledger removed meanwhile is caught.
    again = store.claim(REF, request(1))
    assert again.state == "Granted"
    assert not again.changed
    assert server.reads == reads + 1
    server.overwrite_status({"ledger": None, "ledgerSeal": None})
    with pytest.raises(LedgerTamperedError, match="removed"):
        store.claim(REF, request(1))
