"""Paying for a DP computation before it may read the data; shared by synthesis and training.

The rule (see the README): a claim becomes Consumed *before* the Job that reads the dataset
exists, and a Consumed claim is never refunded, whatever the Job does later.
"""

from __future__ import annotations

from typing import Any

from veil.conditions import Outcome
from veil.controllers.budget_store import BudgetRef, BudgetUnavailableError
from veil.controllers.privacy_budget import store
from veil.controllers.reconcile import Result
from veil.privacy import ClaimRequest, LedgerError

PENDING_POLL_SECONDS = 30.0


def pay_before_reading(
    ref: BudgetRef, request: ClaimRequest, status: dict[str, Any]
) -> Result | None:
    """None once the claim is Consumed (the caller may start its Job); else why not yet.

    `status` gets the claim's state either way and travels with the Result.
    """
    try:
        decision = store().claim(ref, request)
    except BudgetUnavailableError as missing:
        return Result(
            Outcome.failed("BudgetUnavailable", str(missing)), status=status, requeue_after=60
        )
    except LedgerError as conflict:
        return Result(Outcome.stalled_with("ClaimConflict", str(conflict)), status=status)
    status["claimState"] = decision.state
    if decision.state == "Pending":
        return Result(
            Outcome.progressing("AwaitingBudget", decision.reason),
            status=status,
            requeue_after=PENDING_POLL_SECONDS,
        )
    if decision.state in ("Denied", "Released"):
        reason = "BudgetDenied" if decision.state == "Denied" else "ClaimReleased"
        return Result(Outcome.stalled_with(reason, decision.reason), status=status)
    if decision.state == "Granted":
        store().consume(ref, decision.key)  # before the Job can read the data
        status["claimState"] = "Consumed"
    return None
