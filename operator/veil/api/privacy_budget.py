"""PrivacyBudget: the (ε, δ) a dataset may still give away, and the ledger of who spent it."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from veil.api.base import (
    DATA_URI_PATTERN,
    DNS_LABEL_PATTERN,
    Condition,
    CustomResource,
    Rule,
    WireModel,
    conditions_field,
    immutable,
    observed_generation_field,
)

Accountant = Literal["pld", "rdp"]
ConsumerKind = Literal["SyntheticDataset", "ConfidentialModel"]


class Dataset(WireModel):
    """The dataset a budget protects. Fixed for the budget's lifetime."""

    name: str = Field(
        min_length=1, max_length=253, description="A name for the dataset, for people."
    )
    uri: str = Field(
        min_length=1,
        max_length=2048,
        pattern=DATA_URI_PATTERN,
        description="Where the dataset lives (file://, az://<account>/<container>/<blob> or "
        "https://): the budget pays only for jobs that read exactly this URI, and one budget "
        "protects it at a time, cluster-wide.",
    )


class Spender(WireModel):
    """Consumers allowed to charge the budget: all fields that are set must match."""

    namespace: str | None = Field(
        default=None,
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
        description="Consumers in this namespace; absent: any namespace.",
    )
    kind: ConsumerKind | None = Field(
        default=None,
        description="Consumers of this kind (SyntheticDataset or ConfidentialModel); absent: "
        "either.",
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="has(self.namespace) || has(self.kind)",
            message="a spender names a namespace, a kind or both",
            check=lambda s: s.namespace is not None or s.kind is not None,
            reason="FieldValueRequired",
        ),
    )


class UnlockSchedule(WireModel):
    """Release the total gradually: `initialFraction` at creation, then equal steps."""

    initial_fraction: float = Field(
        default=0.0, ge=0, le=1, description="Share of epsilon unlocked when the budget is created."
    )
    steps: int = Field(
        ge=1, le=10000, description="Equal steps that unlock the rest of epsilon, one an interval."
    )
    interval_seconds: int = Field(
        ge=1, le=31_536_000, description="Seconds between two steps, from the budget's creation."
    )


class PrivacyBudgetSpec(WireModel):
    """The dataset, its total (ε, δ), how spending composes, and who may spend."""

    dataset: Dataset = Field(
        description="The dataset this budget protects; fixed at creation.",
        json_schema_extra=immutable("dataset is immutable: a budget protects one dataset for life"),
    )
    epsilon: float = Field(
        gt=0,
        le=1000,
        description="Total ε of the dataset; fixed at creation.",
        json_schema_extra=immutable(
            "epsilon is immutable: the total a dataset may give away is fixed when its budget "
            "is created"
        ),
    )
    delta: float = Field(
        gt=0,
        lt=1,
        description="Total δ of the dataset; fixed at creation.",
        json_schema_extra=immutable("delta is immutable once the budget exists"),
    )
    accountant: Accountant = Field(
        default="pld",
        description="pld: tight (ε, δ) for a fixed sequence of claims; rdp: a Rényi privacy "
        "filter, valid when claims are chosen adaptively. Fixed at creation.",
        json_schema_extra=immutable("accountant is immutable once the budget exists"),
    )
    spenders: list[Spender] = Field(
        default_factory=list,
        max_length=64,
        description="Who may spend it; empty means consumers in the budget's own namespace.",
    )
    max_epsilon_per_claim: float | None = Field(
        default=None,
        gt=0,
        description="The most ε one claim may ask for; absent: up to what remains.",
    )
    unlock: UnlockSchedule | None = Field(
        default=None,
        description="Unlock epsilon gradually instead of all at creation; absent: all of it "
        "is available at once.",
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.maxEpsilonPerClaim) || self.maxEpsilonPerClaim <= self.epsilon",
            message="maxEpsilonPerClaim cannot exceed the total epsilon",
            check=lambda s: s.max_epsilon_per_claim is None or s.max_epsilon_per_claim <= s.epsilon,
            field_path=".maxEpsilonPerClaim",
        ),
    )


class ClaimCounts(WireModel):
    """Claims on the budget, by state."""

    pending: int = Field(
        default=0, ge=0, description="Claims waiting for ε to unlock or for a turn."
    )
    granted: int = Field(default=0, ge=0, description="Claims reserved, not yet spent.")
    denied: int = Field(
        default=0,
        ge=0,
        description="Claims refused (they would overspend, or the spender is not allowed).",
    )
    consumed: int = Field(default=0, ge=0, description="Claims spent: their job ran.")
    released: int = Field(default=0, ge=0, description="Claims returned unspent.")


class PrivacyBudgetStatus(WireModel):
    """The ledger and what remains: written by the operator only, sealed against tampering."""

    observed_generation: int | None = observed_generation_field()
    conditions: list[Condition] = conditions_field()
    epsilon_spent: float | None = Field(
        default=None,
        ge=0,
        description="ε spent so far at the budget's δ, composed by the accountant (exact).",
    )
    epsilon_remaining: float | None = Field(
        default=None,
        ge=0,
        description="ε still available at the budget's δ: epsilon minus epsilonSpent (exact).",
    )
    epsilon_remaining_display: str | None = Field(
        default=None,
        max_length=32,
        description="epsilonRemaining rounded for people (4 significant digits, e.g. 7.116), "
        "as `kubectl get` shows it; use epsilonRemaining for the exact figure.",
    )
    claims: ClaimCounts | None = Field(default=None, description="Claims on the budget, by state.")
    ledger: dict[str, Any] | None = Field(
        default=None, description="Claims and the running composition (see the README)."
    )
    ledger_seal: dict[str, Any] | None = Field(
        default=None, description="The operator's HMAC seal of the ledger (tamper evidence)."
    )
    guarantee: str | None = Field(
        default=None, max_length=512, description="What this budget's accountant promises."
    )


class PrivacyBudget(CustomResource):
    """The differential-privacy budget (ε, δ) of a dataset: every DP job that reads the dataset
    claims its cost here first, the operator admits a claim only if the total is never
    overspent, and the status keeps a sealed ledger of every claim."""

    kind_name: ClassVar[str] = "PrivacyBudget"
    plural: ClassVar[str] = "privacybudgets"
    short_names: ClassVar[tuple[str, ...]] = ("pbudget", "pb")
    key_columns: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "Epsilon", "type": "number", "jsonPath": ".spec.epsilon"},
        # A printer column cannot round a number (the API server passes the float through and
        # kubectl prints every digit): the operator writes the rounded figure beside the exact.
        {"name": "Remaining", "type": "string", "jsonPath": ".status.epsilonRemainingDisplay"},
        {"name": "Accountant", "type": "string", "jsonPath": ".spec.accountant", "priority": 1},
    )

    kind: Literal["PrivacyBudget"] = "PrivacyBudget"
    spec: PrivacyBudgetSpec
    status: PrivacyBudgetStatus = Field(default_factory=PrivacyBudgetStatus)
