"""Benchmark: PrivacyBudget admission throughput and accounting tightness.

    .venv/bin/python -m bench.budget

Throughput: 64 concurrent claimants against one budget on the local control plane, through
the operator's own BudgetStore (resourceVersion-guarded writes). Tightness: how many standard
DP-SGD claims (Poisson q 0.01, σ 2.0, 2,000 steps) one budget of ε 10, δ 1e-5 admits under
PLD, RDP and basic composition, and the same for a mix of synthesizer and training claims.
Prints and writes bench/results/budget.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config
from tests.cluster.localcluster import running

from bench.report import publish
from veil import API_GROUP, API_VERSION
from veil.controllers.budget_store import BudgetRef, BudgetStore
from veil.privacy import (
    BudgetTerms,
    ClaimRequest,
    ConsumerRef,
    DpSgdMechanism,
    GaussianMechanism,
    Ledger,
    Mechanism,
    decide,
    epsilon_spent,
    rdp_epsilon,
)
from veil.privacy.mechanisms import MECHANISM
from veil.synthesis.privacy import claim_mechanisms

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
EPSILON, DELTA = 10.0, 1e-5
DATASET = "file:///data/bench/bench.csv"
DPSGD = DpSgdMechanism(sampling_rate=0.01, noise_multiplier=2.0, steps=2000)


def _consumer(index: int) -> ConsumerRef:
    return ConsumerRef(kind="SyntheticDataset", namespace="bench", name=f"c{index}")


def admitted(accountant: str, claims: list[tuple[Mechanism, ...]]) -> int:
    """Claims admitted one after another until the first denial."""
    terms = BudgetTerms(epsilon=EPSILON, delta=DELTA, accountant=accountant)  # type: ignore[arg-type]
    ledger, now = Ledger(), datetime.now(UTC)
    for index, mechanisms in enumerate(claims):
        request = ClaimRequest(
            key=f"k{index}", consumer=_consumer(index), mechanisms=mechanisms, dataset=DATASET
        )
        ledger, decision = decide(ledger, request, terms, now)
        if decision.state != "Granted":
            return index
    return len(claims)


def admitted_basic(mechanisms: tuple[Mechanism, ...]) -> int:
    """Basic composition: k claims at δ/k each, their ε added up."""
    k = 1
    while (k + 1) * epsilon_spent(mechanisms, DELTA / (k + 1), "pld") <= EPSILON:
        k += 1
    return k if epsilon_spent(mechanisms, DELTA, "pld") <= EPSILON else 0


def admitted_rdp_fixed_sequence(mechanisms: tuple[Mechanism, ...]) -> int:
    """Plain RDP (minimum over orders): tight for a fixed sequence, not a privacy filter."""
    k = 0
    while rdp_epsilon(mechanisms * (k + 1), DELTA) <= EPSILON:
        k += 1
    return k


def tightness() -> dict[str, int]:
    training = (DPSGD,)
    synthesis = tuple(MECHANISM.validate_python(m) for m in claim_mechanisms("mst", 1.0, 1e-6))
    mixed = [synthesis if i % 2 else training for i in range(200)]
    return {
        "claims_admitted_pld": admitted("pld", [training] * 200),
        # `rdp` budgets are a Rényi filter (valid under adaptive claims); plain RDP and PLD
        # are for a fixed sequence of claims.
        "claims_admitted_rdp_filter": admitted("rdp", [training] * 200),
        "claims_admitted_rdp_fixed_sequence": admitted_rdp_fixed_sequence(training),
        "claims_admitted_basic": admitted_basic(training),
        "mixed_admitted_pld": admitted("pld", mixed),
        "mixed_admitted_rdp_filter": admitted("rdp", mixed),
    }


def throughput(claimants: int, per_claimant: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix="veil-bench-") as scratch,
        running(Path(scratch) / "cluster", nodes=False) as cluster,
    ):
        cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all")
        cluster.kubectl("create", "namespace", "bench")
        api = config.new_client_from_config(config_file=str(cluster.kubeconfig))
        api.configuration.connection_pool_maxsize = claimants
        client.CustomObjectsApi(api).create_namespaced_custom_object(
            API_GROUP,
            API_VERSION,
            "bench",
            "privacybudgets",
            {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": "PrivacyBudget",
                "metadata": {"name": "bench"},
                "spec": {
                    "dataset": {"name": "bench", "uri": DATASET},
                    "epsilon": EPSILON,
                    "delta": DELTA,
                    "accountant": "rdp",
                },
            },
        )
        store, ref = BudgetStore(api), BudgetRef("bench", "bench")
        small = (GaussianMechanism(noise_multiplier=30.0, count=1),)

        def claimant(index: int) -> list[str]:
            states = []
            for turn in range(per_claimant):
                key = f"c{index}-{turn}"
                request = ClaimRequest(
                    key=key, consumer=_consumer(index), mechanisms=small, dataset=DATASET
                )
                states.append(store.claim(ref, request).state)
            return states

        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=claimants) as pool:
            answers = [s for states in pool.map(claimant, range(claimants)) for s in states]
        seconds = time.monotonic() - started
        status = store.get(ref)["status"]
        ledger = Ledger.from_wire(status["ledger"])
        granted = [m for c in ledger.claims.values() if c.state == "Granted" for m in c.mechanisms]
        spent = epsilon_spent(granted, DELTA, "rdp")
    return {
        "concurrent_claimants": claimants,
        "claims": len(answers),
        "claims_answered": sum(1 for s in answers if s in ("Granted", "Denied")),
        "claims_granted": answers.count("Granted"),
        "claims_per_second": round(len(answers) / seconds, 2),
        "overspend": max(0.0, round(spent - EPSILON, 9)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claimants", type=int, default=64)
    parser.add_argument("--per-claimant", type=int, default=4)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    started = time.monotonic()
    result = {**throughput(args.claimants, args.per_claimant), **tightness()}
    result["benchmark_seconds"] = round(time.monotonic() - started, 1)
    publish(result, None if args.no_write else RESULTS / "budget.json")


if __name__ == "__main__":
    main()
