from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from tests.unit.privacy.helpers import at, request
from veil.privacy import (
    BudgetTerms,
    EpsilonDeltaMechanism,
    Ledger,
    PrivacyMetrics,
    decide,
    mark_consumed,
    summarize,
)

BUDGET = BudgetTerms(epsilon=1.0, delta=1e-5, accountant="pld")
QUERY = EpsilonDeltaMechanism(epsilon=0.4)


def ledger_with(claims: int) -> Ledger:
    ledger = Ledger()
    for i in range(claims):
        ledger, _ = decide(ledger, request(f"k{i}", QUERY), BUDGET, at(i))
    return ledger


def test_summary_for_the_status() -> None:
    ledger = mark_consumed(ledger_with(3), "k0", at(10))
    summary = summarize(ledger, BUDGET, unlocked_fraction=0.5)
    assert summary.epsilon_spent == pytest.approx(0.8)
    assert summary.epsilon_remaining == pytest.approx(0.2)
    assert summary.epsilon_unlocked == 0.5
    assert (summary.claims.granted, summary.claims.consumed, summary.claims.denied) == (1, 1, 1)
    assert not summary.exhausted
    assert summary.status_fields() == {
        "epsilonSpent": summary.epsilon_spent,
        "epsilonRemaining": summary.epsilon_remaining,
        "epsilonRemainingDisplay": "0.2",
        "claims": {"pending": 0, "granted": 1, "denied": 1, "consumed": 1, "released": 0},
    }
    ledger, _ = decide(ledger, request("last", EpsilonDeltaMechanism(epsilon=0.2)), BUDGET, at(11))
    assert summarize(ledger, BUDGET).exhausted


def test_metrics_follow_the_ledger() -> None:
    registry = CollectorRegistry()
    metrics = PrivacyMetrics(registry)
    labels = {"namespace": "team-a", "budget": "patients"}

    def value(name: str, **extra: str) -> float | None:
        return registry.get_sample_value(name, {**labels, **extra})

    metrics.update("team-a", "patients", summarize(ledger_with(1), BUDGET))
    assert value("veil_privacy_budget_epsilon_spent") == pytest.approx(0.4)
    assert value("veil_privacy_budget_epsilon_remaining") == pytest.approx(0.6)
    assert value("veil_privacy_claims_total", outcome="granted") == 1

    summary = summarize(ledger_with(3), BUDGET)
    metrics.update("team-a", "patients", summary)
    metrics.update("team-a", "patients", summary)  # a resync counts nothing twice
    assert value("veil_privacy_claims_total", outcome="requested") == 3
    assert value("veil_privacy_claims_total", outcome="granted") == 2
    assert value("veil_privacy_claims_total", outcome="denied") == 1

    metrics.forget("team-a", "patients")
    assert value("veil_privacy_budget_epsilon_spent") is None
    assert value("veil_privacy_claims_total", outcome="granted") is None
    metrics.forget("team-a", "patients")  # twice is fine
