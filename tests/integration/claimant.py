"""A stand-alone claimant process: claims keys [start, stop) from one budget, printing each
decision, one at a time or from `threads` threads at once (so that claims share group commits).
Tests kill it mid-burst to check that nothing is granted twice."""

from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

from kubernetes import config

from veil.controllers.budget_store import BudgetRef, BudgetStore
from veil.privacy import ClaimRequest, ConsumerRef, GaussianMechanism


def dataset_of(namespace: str, budget: str) -> str:
    """The dataset the tests' budget `namespace/budget` protects."""
    return f"file:///data/{namespace}/{budget}.csv"


def request(index: int, namespace: str, budget: str) -> ClaimRequest:
    return ClaimRequest(
        key=f"claimant-{index:04d}",
        consumer=ConsumerRef(kind="SyntheticDataset", namespace=namespace, name=f"c{index}"),
        mechanisms=(GaussianMechanism(noise_multiplier=10.0, count=2),),
        dataset=dataset_of(namespace, budget),
    )


def main() -> None:
    kubeconfig, namespace, budget, start, stop = sys.argv[1:6]
    threads = int(sys.argv[6]) if len(sys.argv) > 6 else 1
    store = BudgetStore(config.new_client_from_config(config_file=kubeconfig))

    def claim(index: int) -> None:
        decision = store.claim(BudgetRef(namespace, budget), request(index, namespace, budget))
        print(decision.key, decision.state, flush=True)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(claim, range(int(start), int(stop))))


if __name__ == "__main__":
    main()
