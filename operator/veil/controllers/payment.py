"""Paying for a DP computation before it may read the data; shared by synthesis and training.

The rule (see the README): a claim becomes Consumed *before* the Job that reads the dataset
exists, and a Consumed claim is never refunded, whatever the Job does later.
"""

from __future__ import annotations

from typing import Any

from veil.conditions import Outcome
from veil.controllers.budget_store import (
    BindingRefusedError,
    BudgetRef,
    BudgetUnavailableError,
    DatasetMismatchError,
)
from veil.controllers.privacy_budget import store
from veil.controllers.reconcile import Result
from veil.privacy import ClaimRequest, LedgerError
from veil.privacy.seal import LedgerTamperedError

PENDING_POLL_SECONDS = 30.0


def _refusal(error: Exception, status: dict[str, Any]) -> Result:
    """Why the claim could not be made, as the consumer's status says it."""
    if isinstance(error, DatasetMismatchError):
        return Result(Outcome.stalled_with("DatasetMismatch", str(error)), status=status)
    if isinstance(error, BindingRefusedError):
        message = f"{error}; nothing runs until it is resolved"
        return Result(
            Outcome.failed("BudgetBindingUnavailable", message), status=status, requeue_after=60
        )
    if isinstance(error, BudgetUnavailableError):
        return Result(
            Outcome.failed("BudgetUnavailable", str(error)), status=status, requeue_after=60
        )
    if isinstance(error, LedgerTamperedError):
        message = (
            f"the budget's ledger failed verification ({error}); nothing runs until an "
            "administrator restores it"
        )
        return Result(
            Outcome.failed("BudgetLedgerInvalid", message), status=status, requeue_after=60
        )
    return Result(Outcome.stalled_with("ClaimConflict", str(error)), status=status)


def pay_before_reading(
    ref: BudgetRef, request: ClaimRequest, status: dict[str, Any]
) -> Result | None:
    """None once the claim is Consumed (the caller may start its Job); else why not yet.

    `status` gets the claim's state either way and travels with the Result.
    """
    try:
        # A grant is recorded Consumed in the very write that grants it: before the Job can
        # read the data, and in one group commit with the budget's other claims.
        decision = store().claim(ref, request, consume=True)
    except (BudgetUnavailableError, LedgerError) as refused:
        return _refusal(refused, status)
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
        status["claimState"] = "Consumed"
    return None
