"""A stand-alone claimant process: claims keys [start, stop) from one budget, one at a time,
printing each decision. Tests kill it mid-burst to check that nothing is granted twice."""

from __future__ import annotations

import sys

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
    store = BudgetStore(config.new_client_from_config(config_file=kubeconfig))
    for index in range(int(start), int(stop)):
        decision = store.claim(BudgetRef(namespace, budget), request(index, namespace, budget))
        print(decision.key, decision.state, flush=True)


if __name__ == "__main__":
    main()
