"""Differential-privacy budgets: accounting, admission, the ledger, fair scheduling, metrics.

Pure and cluster-free: plain data in, plain data out, no I/O. The PrivacyBudget
controller reads `status.ledger`, calls these functions and writes the result back.
"""

from veil.privacy.accounting import (
    Accountant,
    BudgetTerms,
    UnsupportedMechanismError,
    check_fit,
    epsilon_spent,
    pld_epsilon,
    rdp_epsilon,
    zcdp_epsilon,
)
from veil.privacy.admission import ClaimRequest, Decision, decide
from veil.privacy.audit import (
    AuditBatch,
    AuditTrailError,
    compact,
    parse_audit_batch,
    replay_audit_trail,
    restore,
    serialize_audit_batch,
    verify_audit_trail,
)
from veil.privacy.ledger import (
    Claim,
    ClaimConflictError,
    ClaimState,
    ConsumerRef,
    FoldedClaimError,
    IllegalTransitionError,
    Ledger,
    LedgerError,
    UnknownClaimError,
    mark_consumed,
    release,
)
from veil.privacy.mechanisms import (
    DpSgdMechanism,
    EpsilonDeltaMechanism,
    GaussianMechanism,
    LaplaceMechanism,
    Mechanism,
    ZcdpMechanism,
)
from veil.privacy.metrics import BudgetSummary, PrivacyMetrics, summarize
from veil.privacy.scheduling import (
    Policy,
    UnlockStep,
    UnlockSteps,
    next_unlock_at,
    schedule_pending,
    unlocked_fraction,
)

__all__ = [
    "Accountant",
    "AuditBatch",
    "AuditTrailError",
    "BudgetSummary",
    "BudgetTerms",
    "Claim",
    "ClaimConflictError",
    "ClaimRequest",
    "ClaimState",
    "ConsumerRef",
    "Decision",
    "DpSgdMechanism",
    "EpsilonDeltaMechanism",
    "FoldedClaimError",
    "GaussianMechanism",
    "IllegalTransitionError",
    "LaplaceMechanism",
    "Ledger",
    "LedgerError",
    "Mechanism",
    "Policy",
    "PrivacyMetrics",
    "UnknownClaimError",
    "UnlockStep",
    "UnlockSteps",
    "UnsupportedMechanismError",
    "ZcdpMechanism",
    "check_fit",
    "compact",
    "decide",
    "epsilon_spent",
    "mark_consumed",
    "next_unlock_at",
    "parse_audit_batch",
    "pld_epsilon",
    "rdp_epsilon",
    "release",
    "replay_audit_trail",
    "restore",
    "schedule_pending",
    "serialize_audit_batch",
    "summarize",
    "unlocked_fraction",
    "verify_audit_trail",
    "zcdp_epsilon",
]
