"""Fair scheduling: unlock a budget over time and grant waiting claims in a fair order.

A budget may release its ε gradually (`spec.unlock`), so early claims cannot drain it
before later ones arrive. Waiting (Pending) claims are granted as ε unlocks, in one of
two orders:

- `dpf`, Dominant Private Block Fairness (Luo et al., "Privacy Budget Scheduling",
  OSDI'21, PrivateKube): the claim with the smallest dominant share goes first. A budget
  is one private block, so a claim's dominant share is its own ε (at the budget's δ)
  divided by the total ε. All or nothing: a claim that does not fit is skipped, and
  smaller claims behind it may still go.
- `fcfs`: arrival order, strictly: the first claim that does not fit blocks the ones
  behind it (the baseline DPF is measured against).

Under both, a waiting claim that could not fit even with the whole budget unlocked
(given what is charged now) is denied rather than left waiting forever; the consumer
may re-request with a higher `attempt` (e.g. after a refund).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Literal

from pydantic import ConfigDict, Field

from veil.api.base import WireModel
from veil.api.privacy_budget import UnlockSchedule
from veil.privacy.accounting import BudgetTerms, Fit, check_fit, epsilon_spent
from veil.privacy.ledger import Claim, Ledger, transition

Policy = Literal["dpf", "fcfs"]


class UnlockStep(WireModel):
    """From `after` on, `fraction` of the total ε is unlocked."""

    model_config = ConfigDict(frozen=True)

    after: float | datetime = Field(description="Seconds after the budget's creation, or a time.")
    fraction: float = Field(ge=0, le=1)


class UnlockSteps(WireModel):
    """An explicit unlock schedule; before the first step nothing is unlocked."""

    model_config = ConfigDict(frozen=True)

    at: tuple[UnlockStep, ...] = Field(min_length=1, max_length=1000)


Schedule = UnlockSchedule | UnlockSteps | None


def unlocked_fraction(schedule: Schedule, created_at: datetime, now: datetime) -> float:
    """The fraction of the total ε unlocked at `now` (1.0 without a schedule). Never decreases."""
    if schedule is None:
        return 1.0
    if isinstance(schedule, UnlockSteps):
        reached = [s.fraction for s in schedule.at if _step_time(s, created_at) <= now]
        return max(reached, default=0.0)
    elapsed = (now - created_at).total_seconds()
    done = min(schedule.steps, max(0, math.floor(elapsed / schedule.interval_seconds)))
    if done == schedule.steps:
        return 1.0
    return schedule.initial_fraction + (1 - schedule.initial_fraction) * done / schedule.steps


def next_unlock_at(schedule: Schedule, created_at: datetime, now: datetime) -> datetime | None:
    """When more ε unlocks next (for requeueing waiting claims); None when all is unlocked."""
    current = unlocked_fraction(schedule, created_at, now)
    if schedule is None or current >= 1.0:
        return None
    if isinstance(schedule, UnlockSteps):
        later = [
            _step_time(s, created_at)
            for s in schedule.at
            if _step_time(s, created_at) > now and s.fraction > current
        ]
        return min(later, default=None)
    elapsed = max(0.0, (now - created_at).total_seconds())
    step = math.floor(elapsed / schedule.interval_seconds) + 1
    return created_at + timedelta(seconds=step * schedule.interval_seconds)


def _step_time(step: UnlockStep, created_at: datetime) -> datetime:
    if isinstance(step.after, datetime):
        return step.after
    return created_at + timedelta(seconds=step.after)


def dominant_share(claim: Claim, budget: BudgetTerms) -> float:
    """PrivateKube's dominant share for a single block: demand over capacity."""
    return claim.epsilon / budget.epsilon


def _order(policy: Policy, budget: BudgetTerms) -> Callable[[Claim], tuple[float, int]]:
    if policy == "dpf":
        return lambda c: (dominant_share(c, budget), c.seq)
    if policy == "fcfs":
        return lambda c: (0.0, c.seq)
    raise ValueError(f"unknown scheduling policy {policy!r}")


def schedule_pending(
    ledger: Ledger,
    budget: BudgetTerms,
    now: datetime,
    unlocked_fraction: float = 1.0,
    policy: Policy = "dpf",
) -> Ledger:
    """Grant as many Pending claims as fit in `policy` order; deny those that never can."""
    waiting = ledger.pending_keys()  # kept in step with the claims: no scan of the ledger
    if not waiting:
        return ledger
    limit = budget.epsilon * min(1.0, max(0.0, unlocked_fraction))
    pending = sorted((ledger.claims[k] for k in waiting), key=_order(policy, budget))
    blocked = False
    for claim in pending:
        if not blocked:
            fit = _fit(ledger, claim, limit, budget)
            if fit.fits:
                ledger = transition(
                    ledger,
                    claim.key,
                    "Granted",
                    now,
                    f"granted: ε {fit.epsilon:.4g} of {limit:.4g} unlocked at δ {budget.delta:g}",
                    decided_at=now,
                    epsilon_left_at_decision=budget.epsilon - fit.epsilon,
                )
                continue
        if not _fit(ledger, claim, budget.epsilon, budget).fits:
            spent = epsilon_spent(ledger.charged, budget.delta, budget.accountant)
            ledger = transition(
                ledger,
                claim.key,
                "Denied",
                now,
                f"budget exhausted: ε {spent:.4g} is spent of {budget.epsilon:g} and this claim "
                f"(ε {claim.epsilon:.4g} alone) does not fit even when all is unlocked",
                decided_at=now,
                epsilon_left_at_decision=max(0.0, budget.epsilon - spent),
            )
        elif policy == "fcfs":
            blocked = True
    return ledger


def _fit(ledger: Ledger, claim: Claim, limit: float, budget: BudgetTerms) -> Fit:
    # A composition costs at least its part: skip the accountant when the claim alone is over.
    if claim.epsilon > limit:
        return Fit(False, claim.epsilon)
    return check_fit((*ledger.charged, *claim.mechanisms), limit, budget.delta, budget.accountant)
