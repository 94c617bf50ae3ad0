from __future__ import annotations

import pytest

from tests.unit.privacy.helpers import T0, at, request
from veil.api.privacy_budget import UnlockSchedule
from veil.privacy import (
    BudgetTerms,
    EpsilonDeltaMechanism,
    GaussianMechanism,
    Ledger,
    Mechanism,
    Policy,
    UnlockStep,
    UnlockSteps,
    decide,
    epsilon_spent,
    next_unlock_at,
    schedule_pending,
    unlocked_fraction,
)

HOUR = 3600
TEN_STEPS = UnlockSchedule(initial_fraction=0.0, steps=10, interval_seconds=HOUR)


def test_equal_steps_unlock() -> None:
    schedule = UnlockSchedule(initial_fraction=0.2, steps=4, interval_seconds=HOUR)
    assert unlocked_fraction(schedule, T0, at(0)) == 0.2
    assert unlocked_fraction(schedule, T0, at(HOUR - 1)) == 0.2
    assert unlocked_fraction(schedule, T0, at(HOUR)) == pytest.approx(0.4)
    assert unlocked_fraction(schedule, T0, at(3.5 * HOUR)) == pytest.approx(0.8)
    assert unlocked_fraction(schedule, T0, at(40 * HOUR)) == 1.0
    assert unlocked_fraction(schedule, T0, at(-HOUR)) == 0.2  # clock skew
    assert unlocked_fraction(None, T0, at(0)) == 1.0
    assert next_unlock_at(schedule, T0, at(10)) == at(HOUR)
    assert next_unlock_at(schedule, T0, at(4 * HOUR)) is None


def test_explicit_steps_unlock() -> None:
    schedule = UnlockSteps.model_validate(
        {
            "at": [
                {"after": 0, "fraction": 0.1},
                {"after": 7200, "fraction": 0.5},
                {"after": "2026-01-02T00:00:00Z", "fraction": 1.0},
            ]
        }
    )
    assert unlocked_fraction(schedule, T0, at(0)) == 0.1
    assert unlocked_fraction(schedule, T0, at(7199)) == 0.1
    assert unlocked_fraction(schedule, T0, at(7200)) == 0.5
    assert unlocked_fraction(schedule, T0, at(24 * HOUR)) == 1.0
    assert next_unlock_at(schedule, T0, at(1)) == at(7200)
    assert next_unlock_at(schedule, T0, at(7200)) == at(24 * HOUR)
    assert unlocked_fraction(UnlockSteps(at=(UnlockStep(after=60, fraction=1),)), T0, at(0)) == 0


def test_pending_claims_are_granted_as_budget_unlocks() -> None:
    budget = BudgetTerms(epsilon=1.0, delta=1e-5, accountant="rdp")
    query = EpsilonDeltaMechanism(epsilon=0.3)
    ledger = Ledger()
    for key in "abc":
        ledger, decision = decide(ledger, request(key, query), budget, at(0), 0.5)
    assert [c.state for c in ledger.claims.values()] == ["Granted", "Pending", "Pending"]
    assert decision.reason.startswith("waiting")
    ledger = schedule_pending(ledger, budget, at(HOUR), 1.0)
    assert [c.state for c in ledger.claims.values()] == ["Granted", "Granted", "Granted"]
    assert schedule_pending(ledger, budget, at(2 * HOUR), 1.0) is ledger  # nothing to do


def test_fcfs_blocks_behind_the_head_and_dpf_does_not() -> None:
    budget = BudgetTerms(epsilon=1.0, delta=1e-5, accountant="rdp")
    big, small = EpsilonDeltaMechanism(epsilon=0.8), EpsilonDeltaMechanism(epsilon=0.1)
    for policy, expected in (("fcfs", ["Pending", "Pending"]), ("dpf", ["Pending", "Granted"])):
        ledger = Ledger()
        for key, mechanism in (("big", big), ("small", small)):
            ledger, _ = decide(ledger, request(key, mechanism), budget, at(0), 0.5, policy=policy)  # type: ignore[arg-type]
        assert [c.state for c in ledger.claims.values()] == expected, policy


def _simulate(policy: Policy, small: Mechanism, large: Mechanism, accountant: str) -> int:
    """Ten hourly unlock steps; each hour 8 claims arrive: large, 3 small, large, 3 small."""
    budget = BudgetTerms(epsilon=10.0, delta=1e-5, accountant=accountant)  # type: ignore[arg-type]
    ledger = Ledger()
    for hour in range(12):
        for i, mechanism in enumerate([large, small, small, small] * 2):
            now = at(hour * HOUR + i)
            ledger, _ = decide(
                ledger,
                request(f"h{hour}-{i}", mechanism),
                budget,
                now,
                unlocked_fraction(TEN_STEPS, T0, now),
                policy=policy,
            )
        end = at(hour * HOUR + HOUR - 1)
        ledger = schedule_pending(
            ledger, budget, end, unlocked_fraction(TEN_STEPS, T0, end), policy
        )
    assert epsilon_spent(ledger.charged, budget.delta, budget.accountant) <= budget.epsilon
    return ledger.counts().granted


@pytest.mark.parametrize(
    ("small", "large", "accountant"),
    [
        # Pure ε-DP claims: composition is exact addition.
        (EpsilonDeltaMechanism(epsilon=0.1), EpsilonDeltaMechanism(epsilon=1.0), "pld"),
        # Gaussian queries: RDP composition, sublinear in the number of claims.
        (GaussianMechanism(noise_multiplier=8.0), GaussianMechanism(noise_multiplier=1.5), "rdp"),
    ],
)
def test_dpf_grants_more_claims_than_fcfs(
    small: Mechanism, large: Mechanism, accountant: str
) -> None:
    dpf = _simulate("dpf", small, large, accountant)
    fcfs = _simulate("fcfs", small, large, accountant)
    print(f"granted: dpf {dpf}, fcfs {fcfs}")
    assert dpf > fcfs
