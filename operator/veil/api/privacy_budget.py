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
)

Accountant = Literal["pld", "rdp"]
ConsumerKind = Literal["SyntheticDataset", "ConfidentialModel"]


class Dataset(WireModel):
    """The dataset a budget protects. Fixed for the budget's lifetime."""

    name: str = Field(min_length=1, max_length=253)
    uri: str = Field(
        min_length=1,
        max_length=2048,
        pattern=DATA_URI_PATTERN,
        description="Where the dataset lives: the budget pays only for jobs that read exactly "
        "this URI, and one budget protects it at a time.",
    )


class Spender(WireModel):
    """Consumers allowed to charge the budget: all fields that are set must match."""

    namespace: str | None = Field(default=None, max_length=63, pattern=DNS_LABEL_PATTERN)
    kind: ConsumerKind | None = None

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

    initial_fraction: float = Field(default=0.0, ge=0, le=1)
    steps: int = Field(ge=1, le=10000)
    interval_seconds: int = Field(ge=1, le=31_536_000)


class PrivacyBudgetSpec(WireModel):
    dataset: Dataset = Field(
        json_schema_extra=immutable("dataset is immutable: a budget protects one dataset for life")
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
    max_epsilon_per_claim: float | None = Field(default=None, gt=0)
    unlock: UnlockSchedule | None = None

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(self.maxEpsilonPerClaim) || self.maxEpsilonPerClaim <= self.epsilon",
            message="maxEpsilonPerClaim cannot exceed the total epsilon",
            check=lambda s: s.max_epsilon_per_claim is None or s.max_epsilon_per_claim <= s.epsilon,
            field_path=".maxEpsilonPerClaim",
        ),
    )


class ClaimCounts(WireModel):
    pending: int = Field(default=0, ge=0)
    granted: int = Field(default=0, ge=0)
    denied: int = Field(default=0, ge=0)
    consumed: int = Field(default=0, ge=0)
    released: int = Field(default=0, ge=0)


class PrivacyBudgetStatus(WireModel):
    observed_generation: int | None = Field(default=None, ge=0)
    conditions: list[Condition] = conditions_field()
    epsilon_spent: float | None = Field(default=None, ge=0)
    epsilon_remaining: float | None = Field(default=None, ge=0)
    claims: ClaimCounts | None = None
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
    kind_name: ClassVar[str] = "PrivacyBudget"
    plural: ClassVar[str] = "privacybudgets"
    short_names: ClassVar[tuple[str, ...]] = ("pbudget", "pb")
    key_columns: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "Epsilon", "type": "number", "jsonPath": ".spec.epsilon"},
        {"name": "Remaining", "type": "number", "jsonPath": ".status.epsilonRemaining"},
        {"name": "Accountant", "type": "string", "jsonPath": ".spec.accountant", "priority": 1},
    )

    kind: Literal["PrivacyBudget"] = "PrivacyBudget"
    spec: PrivacyBudgetSpec
    status: PrivacyBudgetStatus = Field(default_factory=PrivacyBudgetStatus)
