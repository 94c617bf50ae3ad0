"""Admission: decide a consumer's claim against a budget's ledger, as a pure function.

`decide(ledger, request, budget, now, unlocked_fraction)` returns the new ledger and the
decision for the request's key. It does no I/O; the controller makes it safe under
concurrency:

1. read the PrivacyBudget, `Ledger.from_wire(status.ledger)`;
2. `decide(...)`; if `decision.changed`, write the whole ledger (and the summary) to the
   status *with the resourceVersion it read* (a replace, or a patch carrying
   metadata.resourceVersion), so the API server refuses the write if anyone else wrote
   first;
3. on 409 Conflict, go back to 1. Two admissions can never both spend the same ε: only
   one write per resourceVersion wins, and the loser re-decides against the winner's
   ledger. Retrying is always safe, because a claim is keyed by its consumer's UID: a
   repeated request with the same key is the same claim and is never charged twice.

Repeats: the same key with the same mechanisms returns the recorded decision (a Pending
one is re-scheduled, since more ε may have unlocked). Different mechanisms under a key
raise `ClaimConflictError`, except after a denial: a request with a higher `attempt`
(e.g. the consumer's metadata.generation) re-opens a Denied claim, with new mechanisms
if it likes. A key whose claim was folded into the audit trail raises `FoldedClaimError`.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import ConfigDict, Field, field_validator

from veil.api.base import WireModel
from veil.privacy.accounting import BudgetTerms, epsilon_spent
from veil.privacy.ledger import (
    CHARGED_STATES,
    Claim,
    ClaimConflictError,
    ClaimState,
    ConsumerRef,
    FoldedClaimError,
    Ledger,
    add_claim,
    transition,
)
from veil.privacy.mechanisms import Mechanism, merge
from veil.privacy.scheduling import Policy, schedule_pending

# Open (Pending + Granted) claims stay in full detail in the status (~0.5 KB each); this
# bounds the status size, since compaction can fold only terminal claims.
MAX_OPEN_CLAIMS = 500
# Per mechanism, how many times its unit may run within one claim (count or DP-SGD steps).
MAX_MULTIPLICITY = 10_000_000


class ClaimRequest(WireModel):
    """What a consumer asks of a budget."""

    model_config = ConfigDict(frozen=True)

    key: str = Field(min_length=1, max_length=128, description="The consumer's UID.")
    consumer: ConsumerRef
    mechanisms: tuple[Mechanism, ...] = Field(min_length=1, max_length=16)
    attempt: int = Field(default=0, ge=0, description="Raise it to re-request after a denial.")
    dataset: str | None = Field(
        default=None,
        max_length=2048,
        description="URI of the dataset the consumer will read: it must be the budget's own.",
    )

    @field_validator("mechanisms")
    @classmethod
    def _bounded(cls, mechanisms: tuple[Mechanism, ...]) -> tuple[Mechanism, ...]:
        for m in mechanisms:
            if m.multiplicity > MAX_MULTIPLICITY:
                raise ValueError(f"a {m.type} mechanism may run at most {MAX_MULTIPLICITY} times")
        return mechanisms


class Decision(WireModel):
    model_config = ConfigDict(frozen=True)

    key: str
    state: ClaimState
    reason: str
    epsilon: float = Field(description="The claim's own ε at the budget's δ.")
    epsilon_left_at_decision: float | None = None
    changed: bool = Field(description="The ledger changed: write the status.")

    @property
    def may_proceed(self) -> bool:
        """The consumer holds a grant (mark it Consumed before it can read the data)."""
        return self.state in CHARGED_STATES


def decide(
    ledger: Ledger,
    request: ClaimRequest,
    budget: BudgetTerms,
    now: datetime,
    unlocked_fraction: float = 1.0,
    *,
    policy: Policy = "dpf",
    max_open_claims: int = MAX_OPEN_CLAIMS,
) -> tuple[Ledger, Decision]:
    """Admit, queue or deny `request`; see the module docstring for the contract."""
    existing = ledger.claims.get(request.key)
    if existing is not None and not _reopens(existing, request):
        if existing.consumer != request.consumer or merge(existing.mechanisms) != merge(
            request.mechanisms
        ):
            raise ClaimConflictError(
                f"claim {request.key!r} was made by {existing.consumer.kind} "
                f"{existing.consumer.namespace}/{existing.consumer.name} with other mechanisms; "
                "a claim cannot change (after a denial, raise `attempt` to ask again)"
            )
        after = ledger
        if existing.state == "Pending":
            after = schedule_pending(ledger, budget, now, unlocked_fraction, policy)
        return after, _decision(after, request.key, changed=after is not ledger)
    if existing is None and ledger.folded.holds(request.key):
        raise FoldedClaimError(
            f"claim {request.key!r} was decided long ago and is in the audit trail"
        )

    demand = epsilon_spent(request.mechanisms, budget.delta, budget.accountant)
    after = _open(ledger, request, demand, now)
    refusal = _refusal(after, demand, budget, max_open_claims)
    if refusal:
        spent = epsilon_spent(after.charged, budget.delta, budget.accountant)
        after = transition(
            after,
            request.key,
            "Denied",
            now,
            refusal,
            decided_at=now,
            epsilon_left_at_decision=max(0.0, budget.epsilon - spent),
        )
    else:
        after = schedule_pending(after, budget, now, unlocked_fraction, policy)
    return after, _decision(after, request.key, changed=True)


def _reopens(existing: Claim, request: ClaimRequest) -> bool:
    return existing.state == "Denied" and request.attempt > existing.attempt


def _open(ledger: Ledger, request: ClaimRequest, demand: float, now: datetime) -> Ledger:
    """Record the request as Pending: a new claim, or a re-opened denied one."""
    fields = {
        "consumer": request.consumer,
        "mechanisms": request.mechanisms,
        "attempt": request.attempt,
        "seq": ledger.next_seq,
        "requested_at": now,
        "epsilon": demand,
        "decided_at": None,
        "epsilon_left_at_decision": None,
    }
    waiting = "waiting for the budget to unlock enough ε"
    if request.key in ledger.claims:
        reopened = transition(ledger, request.key, "Pending", now, waiting, **fields)
        return reopened.model_copy(update={"next_seq": ledger.next_seq + 1})
    claim = Claim.model_validate(
        {**fields, "key": request.key, "state": "Pending", "updated_at": now, "reason": waiting}
    )
    return add_claim(ledger, claim)


def _refusal(ledger: Ledger, demand: float, budget: BudgetTerms, max_open_claims: int) -> str:
    if budget.max_epsilon_per_claim is not None and demand > budget.max_epsilon_per_claim:
        return (
            f"the claim needs ε {demand:.4g}, over this budget's limit of "
            f"{budget.max_epsilon_per_claim:g} per claim"
        )
    if demand > budget.epsilon:
        return f"the claim needs ε {demand:.4g}, more than the whole budget ({budget.epsilon:g})"
    if ledger.has_more_open_claims_than(max_open_claims):
        return f"the budget already has {max_open_claims} open claims; try again later"
    return ""


def _decision(ledger: Ledger, key: str, changed: bool) -> Decision:
    claim = ledger.claims[key]
    return Decision(
        key=key,
        state=claim.state,
        reason=claim.reason,
        epsilon=claim.epsilon,
        epsilon_left_at_decision=claim.epsilon_left_at_decision,
        changed=changed,
    )
