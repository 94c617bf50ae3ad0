"""SyntheticDataset: a differentially-private synthetic copy of a dataset."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from veil.api.base import (
    ColumnBounds,
    Condition,
    CustomResource,
    ObjectReference,
    ResourceRequirements,
    Rule,
    WireModel,
    conditions_field,
)
from veil.api.confidential_model import Cidr

DATA_URI_PATTERN = r"^(file|az|https)://\S+$"


class Source(WireModel):
    uri: str = Field(min_length=1, max_length=2048, pattern=DATA_URI_PATTERN)
    format: Literal["csv", "parquet"] = "csv"


class Synthesizer(WireModel):
    method: Literal["mst", "aim"] = Field(description="smartnoise-synth MST or AIM.")
    epsilon: float = Field(gt=0, le=100)
    delta: float = Field(default=1e-6, gt=0, lt=1)
    rows: int = Field(ge=1, le=10_000_000, description="Rows to sample.")
    preprocessor_epsilon: float = Field(
        default=0.0,
        ge=0,
        description="Part of epsilon spent inferring column bounds (0: columns are pre-binned).",
    )
    categorical_columns: list[str] = Field(default_factory=list, max_length=512)
    bounds: list[ColumnBounds] = Field(default_factory=list, max_length=512)

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.preprocessorEpsilon < self.epsilon",
            message="preprocessorEpsilon must be smaller than epsilon: it is taken out of it",
            check=lambda s: s.preprocessor_epsilon < s.epsilon,
            field_path=".preprocessorEpsilon",
        ),
    )


class Output(WireModel):
    uri: str = Field(min_length=1, max_length=2048, pattern=DATA_URI_PATTERN)


class SyntheticDatasetSpec(WireModel):
    source: Source
    synthesizer: Synthesizer
    budget_ref: ObjectReference | None = None
    allow_non_private: bool = Field(
        default=False, description="Allow a non-private generator; forbids a budget."
    )
    output: Output
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    confidential: bool = Field(default=False, description="Run the Job on confidential VM nodes.")
    storage_cidrs: list[Cidr] = Field(
        default_factory=list,
        max_length=16,
        description="CIDRs of the storage endpoint the Job may reach on 443; empty: public "
        "addresses only (no in-cluster or private ranges).",
    )
    active_deadline_seconds: int = Field(default=21600, ge=60, le=604800)

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.allowNonPrivate || has(self.budgetRef)",
            message="budgetRef is required: every DP synthesis is paid for from a PrivacyBudget",
            check=lambda s: s.allow_non_private or s.budget_ref is not None,
            field_path=".budgetRef",
            reason="FieldValueRequired",
        ),
        Rule(
            cel="!self.allowNonPrivate || !has(self.budgetRef)",
            message="allowNonPrivate output cannot be charged to a budget: remove budgetRef",
            check=lambda s: not s.allow_non_private or s.budget_ref is None,
            field_path=".budgetRef",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="self.source.uri != self.output.uri",
            message="output.uri must differ from source.uri: the source is never overwritten",
            check=lambda s: s.source.uri != s.output.uri,
            field_path=".output.uri",
        ),
    )


class SyntheticDatasetStatus(WireModel):
    observed_generation: int | None = Field(default=None, ge=0)
    conditions: list[Condition] = conditions_field()
    claim_state: Literal["Pending", "Granted", "Denied", "Consumed", "Released"] | None = None
    job_name: str | None = Field(default=None, max_length=63)
    output_uri: str | None = Field(default=None, max_length=2048)
    rows: int | None = Field(default=None, ge=0)
    quality: dict[str, Any] | None = None


class SyntheticDataset(CustomResource):
    kind_name: ClassVar[str] = "SyntheticDataset"
    plural: ClassVar[str] = "syntheticdatasets"
    object_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="!has(oldSelf.status) || !has(oldSelf.status.claimState) "
            "|| oldSelf.status.claimState != 'Consumed' || self.spec == oldSelf.spec",
            message="spec cannot change once the budget claim is Consumed: the Job may have "
            "read the data, and one SyntheticDataset is one paid run; create a new one",
            field_path=".spec",
            reason="FieldValueForbidden",
        ),
    )
    short_names: ClassVar[tuple[str, ...]] = ("synth", "sds")
    key_columns: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "Method", "type": "string", "jsonPath": ".spec.synthesizer.method"},
        {"name": "Epsilon", "type": "number", "jsonPath": ".spec.synthesizer.epsilon"},
        {"name": "Claim", "type": "string", "jsonPath": ".status.claimState"},
        {"name": "Rows", "type": "integer", "jsonPath": ".status.rows", "priority": 1},
    )

    kind: Literal["SyntheticDataset"] = "SyntheticDataset"
    spec: SyntheticDatasetSpec
    status: SyntheticDatasetStatus = Field(default_factory=SyntheticDatasetStatus)
