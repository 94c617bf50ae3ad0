"""What the claim scenarios share: a PrivacyBudget and a burst of SyntheticDatasets claiming it
(kwok's fake pods run their Jobs, so the dataset is never read and need not exist), and the
checks that a fault broke none of the budget's guarantees."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from kubernetes import client

from tests.integration.conftest import create_budget
from tests.integration.test_synthetic_dataset import dataset
from veil import API_GROUP, API_VERSION
from veil.privacy import Ledger, epsilon_spent
from veil.privacy.seal import LedgerSeal, verify_seal
from veil.resources.synthetic_dataset import job_name

PLURAL = "syntheticdatasets"
CLAIM_EPSILON = 0.3  # per dataset: twelve MST claims of ε 0.3 fit a budget of ε 1
BUDGET_EPSILON, DELTA = 1.0, 1e-5
FINAL = ("Consumed", "Denied")
SPENT = ("Granted", "Consumed")
# Where the operator keeps its ledger key when VEIL_NAMESPACE is unset (ledger_key.py).
LEDGER_KEY = ("default", "veil-ledger-key")


@dataclass(frozen=True)
class Burst:
    """A budget and the datasets that claim it, in one namespace."""

    namespace: str
    budget: str
    names: tuple[str, ...]

    @property
    def source(self) -> Path:
        # One budget protects one dataset: each burst claims a dataset of its own.
        return Path(f"/data/{self.namespace}/{self.budget}.csv")


def burst(namespace: str, budget: str, size: int) -> Burst:
    return Burst(namespace, budget, tuple(f"{budget}-{i:02d}" for i in range(size)))


def create_budget_of(objects: client.CustomObjectsApi, burst: Burst) -> None:
    create_budget(
        objects,
        burst.namespace,
        burst.budget,
        epsilon=BUDGET_EPSILON,
        dataset_uri=f"file://{burst.source}",
    )


def create_datasets(objects: client.CustomObjectsApi, burst: Burst, names: list[str]) -> None:
    for name in names:
        body = dataset(name, burst.source, epsilon=CLAIM_EPSILON)
        body["metadata"]["namespace"] = burst.namespace
        body["spec"]["budgetRef"] = {"name": burst.budget}
        objects.create_namespaced_custom_object(
            API_GROUP, API_VERSION, burst.namespace, PLURAL, body
        )


def budget_of(objects: client.CustomObjectsApi, burst: Burst) -> dict[str, Any]:
    return cast(
        dict[str, Any],
        objects.get_namespaced_custom_object(
            API_GROUP, API_VERSION, burst.namespace, "privacybudgets", burst.budget
        ),
    )


def ledger_of(objects: client.CustomObjectsApi, burst: Burst) -> Ledger:
    return Ledger.from_wire((budget_of(objects, burst).get("status") or {}).get("ledger"))


def datasets_of(objects: client.CustomObjectsApi, burst: Burst) -> list[dict[str, Any]]:
    listed = cast(
        dict[str, Any],
        objects.list_namespaced_custom_object(API_GROUP, API_VERSION, burst.namespace, PLURAL),
    )
    return [d for d in listed["items"] if d["metadata"]["name"] in burst.names]


def answered(objects: client.CustomObjectsApi, burst: Burst) -> list[dict[str, Any]] | None:
    """Every dataset of the burst, once each one's status names a final claim state."""
    items = datasets_of(objects, burst)
    states = [(d.get("status") or {}).get("claimState") for d in items]
    done = len(items) == len(burst.names) and all(s in FINAL for s in states)
    return items if done else None


def answered_count(objects: client.CustomObjectsApi, burst: Burst) -> int:
    items = datasets_of(objects, burst)
    return sum((d.get("status") or {}).get("claimState") in FINAL for d in items)


def wait_answered(
    objects: client.CustomObjectsApi, burst: Burst, timeout: float
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        items = answered(objects, burst)
        if items is not None:
            return items
        time.sleep(0.3)
    raise AssertionError(
        f"{burst.budget}: {answered_count(objects, burst)} of {len(burst.names)} claims "
        f"answered after {timeout:.0f} s"
    )


def ledger_key(api: client.ApiClient) -> bytes:
    namespace, name = LEDGER_KEY
    secret = client.CoreV1Api(api).read_namespaced_secret(name, namespace)
    return base64.b64decode((secret.data or {})["key"])


@dataclass(frozen=True)
class Paid:
    granted: int
    denied: int


def check_claims(
    api: client.ApiClient,
    objects: client.CustomObjectsApi,
    burst: Burst,
    items: list[dict[str, Any]],
) -> Paid:
    """The budget's guarantees after a fault: its ledger is the operator's (the seal verifies),
    every dataset has exactly one claim (none lost, none extra, none asked twice) whose state
    its status says, the grants fit ε, and exactly the paid-for datasets have a Job, one each,
    owned by its dataset."""
    budget = budget_of(objects, burst)
    status = budget.get("status") or {}
    ledger = Ledger.from_wire(status.get("ledger"))
    verify_seal(
        ledger,
        budget["metadata"]["uid"],
        ledger_key(api),
        LedgerSeal.model_validate(status["ledgerSeal"]),
    )

    uids = {d["metadata"]["uid"]: d for d in items}
    assert sorted(ledger.claims) == sorted(uids), "one claim per dataset, none lost, none extra"
    assert ledger.totals.requested == len(burst.names), "a re-sent claim is never a second one"
    for uid, claim in ledger.claims.items():
        dataset_status = uids[uid]["status"]
        assert dataset_status["claimState"] == claim.state, uids[uid]["metadata"]["name"]
    spent = [m for c in ledger.claims.values() if c.state in SPENT for m in c.mechanisms]
    assert spent, "some claims fit the budget"
    assert epsilon_spent(spent, DELTA, "pld") <= BUDGET_EPSILON
    denied = sum(c.state == "Denied" for c in ledger.claims.values())
    assert denied, "the burst outran the budget"

    # Exactly the paid-for datasets got a Job: none ran without a grant, none twice.
    jobs: dict[str, list[str]] = {}  # name -> its controller owners
    for job in client.BatchV1Api(api).list_namespaced_job(burst.namespace).items:
        meta = job.metadata
        assert meta is not None
        refs = meta.owner_references or []
        if any(ref.uid in uids for ref in refs):
            jobs[str(meta.name)] = [ref.uid for ref in refs if ref.controller]
    paid = [d for d in items if d["status"]["claimState"] == "Consumed"]
    assert sorted(jobs) == sorted(job_name(d) for d in paid)
    for name, owners in jobs.items():
        assert len(owners) == 1, f"{name}: controller owners {owners}"
    for d in paid:
        assert d["status"].get("jobName") == job_name(d), d["metadata"]["name"]
    return Paid(granted=len(paid), denied=denied)
