"""A budget's status summary and its Prometheus metrics."""

from __future__ import annotations

from contextlib import suppress
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ConfigDict

from veil.api.base import WireModel
from veil.api.privacy_budget import ClaimCounts
from veil.privacy.accounting import BudgetTerms, epsilon_spent
from veil.privacy.ledger import Ledger, Totals

# Below this share of the total ε left, a budget counts as exhausted.
EXHAUSTED_FRACTION = 1e-3
OUTCOMES = tuple(Totals.model_fields)


class BudgetSummary(WireModel):
    model_config = ConfigDict(frozen=True)

    epsilon_total: float
    delta: float
    epsilon_spent: float
    epsilon_remaining: float
    epsilon_unlocked: float
    claims: ClaimCounts
    totals: Totals
    exhausted: bool

    def status_fields(self) -> dict[str, Any]:
        """The PrivacyBudget status fields this summary fills (camelCase)."""
        return {
            "epsilonSpent": self.epsilon_spent,
            "epsilonRemaining": self.epsilon_remaining,
            # For `kubectl get`'s Remaining column (a printer column cannot round).
            "epsilonRemainingDisplay": f"{self.epsilon_remaining:.4g}",
            "claims": self.claims.to_wire(),
        }


def summarize(ledger: Ledger, budget: BudgetTerms, unlocked_fraction: float = 1.0) -> BudgetSummary:
    """Spent and remaining ε at the budget's δ (tightest bound), counts, exhaustion."""
    spent = epsilon_spent(ledger.charged, budget.delta, budget.accountant)
    remaining = max(0.0, budget.epsilon - spent)
    return BudgetSummary(
        epsilon_total=budget.epsilon,
        delta=budget.delta,
        epsilon_spent=spent,
        epsilon_remaining=remaining,
        epsilon_unlocked=budget.epsilon * min(1.0, max(0.0, unlocked_fraction)),
        claims=ledger.counts(),
        totals=ledger.totals,
        exhausted=remaining <= EXHAUSTED_FRACTION * budget.epsilon,
    )


class PrivacyMetrics:
    """The privacy metrics of every budget this operator reconciles, in one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        labels = ["namespace", "budget"]
        self.remaining = Gauge(
            "veil_privacy_budget_epsilon_remaining",
            "ε a budget can still spend, at its δ",
            labels,
            registry=registry,
        )
        self.spent = Gauge(
            "veil_privacy_budget_epsilon_spent",
            "ε a budget has spent (Granted + Consumed claims), at its δ",
            labels,
            registry=registry,
        )
        self.claims = Counter(
            "veil_privacy_claims_total",
            "Claim outcomes: requested, granted, denied, consumed, released",
            [*labels, "outcome"],
            registry=registry,
        )
        # Ledger totals already counted, per budget: counters only ever move forward.
        self._counted: dict[tuple[str, str], Totals] = {}

    def update(self, namespace: str, budget: str, summary: BudgetSummary) -> None:
        self.remaining.labels(namespace, budget).set(summary.epsilon_remaining)
        self.spent.labels(namespace, budget).set(summary.epsilon_spent)
        before = self._counted.get((namespace, budget), Totals())
        for outcome in OUTCOMES:
            step = getattr(summary.totals, outcome) - getattr(before, outcome)
            if step > 0:
                self.claims.labels(namespace, budget, outcome).inc(step)
        self._counted[(namespace, budget)] = summary.totals

    def forget(self, namespace: str, budget: str) -> None:
        """Drop a deleted budget's series."""
        for gauge in (self.remaining, self.spent):
            with suppress(KeyError):  # never observed
                gauge.remove(namespace, budget)
        for outcome in OUTCOMES:
            with suppress(KeyError):
                self.claims.remove(namespace, budget, outcome)
        self._counted.pop((namespace, budget), None)
