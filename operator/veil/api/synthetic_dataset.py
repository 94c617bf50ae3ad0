"""SyntheticDataset: a differentially-private synthetic copy of a dataset.

Every column's domain is public: declared in `spec.synthesizer.columns`, or found by a DP
mechanism paid from the claim (`discover: true`, numeric bounds inferred with
`preprocessorEpsilon`). Nothing about the domain is read off the data for free.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, field_validator

from veil.api.base import (
    DATA_URI_PATTERN,
    Condition,
    CustomResource,
    ObjectReference,
    ResourceRequirements,
    Rule,
    WireModel,
    conditions_field,
    observed_generation_field,
)
from veil.api.confidential_model import Cidr

DEFAULT_BINS = 10
DEFAULT_MAX_DISCOVERED_VALUES = 100


def category_text(value: Any) -> Any:
    """A number given as a category, as its text (`3`, `3.0` → "3"; `0.5` → "0.5").

    The API server takes strings only (a list of strings or numbers has no structural type);
    the CLI's --columns may give numbers. A value matches data by this text, so "0" matches a
    data value 0 or 0.0 (see `veil.synthesis.domain.value_key`).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value) if isinstance(value, int) else repr(value)


CategoryValue = Annotated[
    str,
    BeforeValidator(category_text),
    Field(min_length=1, max_length=1024, description="A category, as text."),
]


def _discovers(column: Column) -> bool:
    return column.type == "categorical" and column.discover


def _infers_bounds(column: Column) -> bool:
    return column.type == "numeric" and column.lower is None


class Column(WireModel):
    """One column of the source and its public domain."""

    name: str = Field(
        min_length=1, max_length=256, description="The column's name in the source header."
    )
    type: Literal["categorical", "numeric"] = Field(
        description="categorical: one code per value; numeric: equal-width bins, values clipped."
    )
    values: list[CategoryValue] | None = Field(
        default=None,
        max_length=10000,
        description='categorical: the public set of values, as text ("0" matches a data '
        "value 0); a value outside it becomes null (nullable) or drops its row.",
    )
    discover: bool = Field(
        default=False,
        description="categorical: add the values that a thresholded DP histogram finds "
        "(paid from discoveryEpsilon/discoveryDelta); rare values are never found.",
    )
    max_values: int | None = Field(
        default=None,
        ge=1,
        le=10000,
        description=f"discover: at most this many values are kept "
        f"(default {DEFAULT_MAX_DISCOVERED_VALUES}).",
    )
    lower: float | None = Field(default=None, description="numeric: public lower bound.")
    upper: float | None = Field(
        default=None,
        description="numeric: public upper bound; without both bounds they are inferred "
        "privately with preprocessorEpsilon.",
    )
    bins: int | None = Field(
        default=None, ge=2, le=1000, description="numeric: bins (default synthesizer.bins)."
    )
    nullable: bool = Field(
        default=False,
        description="Missing values are part of the domain; if false, a row with a missing "
        "or out-of-domain value in this column is dropped.",
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.type == 'numeric' || (has(self.values) && size(self.values) > 0) "
            "|| (has(self.discover) && self.discover)",
            message="a categorical column needs its public values, or discover: true",
            check=lambda c: c.type == "numeric" or bool(c.values) or c.discover,
            field_path=".values",
            reason="FieldValueRequired",
        ),
        Rule(
            cel="self.type == 'categorical' || "
            "(!has(self.values) && !(has(self.discover) && self.discover))",
            message="values and discover are for categorical columns",
            check=lambda c: c.type == "categorical" or (c.values is None and not c.discover),
            field_path=".values",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="!has(self.maxValues) || (has(self.discover) && self.discover)",
            message="maxValues is only for discover: true",
            check=lambda c: c.max_values is None or c.discover,
            field_path=".maxValues",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="self.type == 'numeric' || (!has(self.lower) && !has(self.upper) "
            "&& !has(self.bins))",
            message="lower, upper and bins are for numeric columns",
            check=lambda c: (
                c.type == "numeric" or (c.lower is None and c.upper is None and c.bins is None)
            ),
            field_path=".lower",
            reason="FieldValueForbidden",
        ),
        Rule(
            cel="has(self.lower) == has(self.upper)",
            message="give both lower and upper, or neither (then preprocessorEpsilon infers "
            "them privately)",
            check=lambda c: (c.lower is None) == (c.upper is None),
            field_path=".upper",
            reason="FieldValueRequired",
        ),
        Rule(
            cel="!has(self.lower) || !has(self.upper) || self.lower < self.upper",
            message="lower must be below upper",
            check=lambda c: c.lower is None or c.upper is None or c.lower < c.upper,
            field_path=".upper",
        ),
    )


class Source(WireModel):
    """The dataset to synthesize from."""

    uri: str = Field(
        min_length=1,
        max_length=2048,
        pattern=DATA_URI_PATTERN,
        description="Where the source lives (file://, az://<account>/<container>/<blob> or "
        "https://): exactly the dataset.uri of the budget named by budgetRef.",
    )
    format: Literal["csv", "parquet"] = Field(
        default="csv", description="csv (with a header row) or parquet."
    )


class Synthesizer(WireModel):
    """What the run does and spends: epsilon and delta are its total, every part included."""

    method: Literal["mst", "aim"] = Field(description="smartnoise-synth MST or AIM.")
    epsilon: float = Field(gt=0, le=100, description="The whole run's ε, every part included.")
    delta: float = Field(
        default=1e-6, gt=0, lt=1, description="The whole run's δ, discovery included."
    )
    rows: int = Field(ge=1, le=10_000_000, description="Rows to sample.")
    bins: int = Field(
        default=DEFAULT_BINS, ge=2, le=1000, description="Bins of a numeric column (default)."
    )
    preprocessor_epsilon: float = Field(
        default=0.0,
        ge=0,
        description="Part of epsilon spent inferring the bounds of numeric columns declared "
        "without lower/upper (a Laplace histogram each, split evenly).",
    )
    discovery_epsilon: float = Field(
        default=0.0,
        ge=0,
        description="Part of epsilon spent finding the values of columns with discover: true "
        "(a thresholded Laplace histogram each, split evenly).",
    )
    discovery_delta: float = Field(
        default=0.0, ge=0, lt=1, description="Part of delta spent on discovery (its threshold)."
    )
    report_epsilon: float = Field(
        default=0.0,
        ge=0,
        description="Part of epsilon spent on a DP quality report (Gaussian noisy 1-way "
        "marginals of the source); 0: the report holds public facts only.",
    )
    columns: list[Column] = Field(
        min_length=1,
        max_length=512,
        description="Every column of the source, with its public domain; a source column not "
        "listed here is refused before any row is read.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.preprocessorEpsilon + self.discoveryEpsilon + self.reportEpsilon "
            "< self.epsilon",
            message="preprocessorEpsilon must be smaller than epsilon, with discoveryEpsilon "
            "and reportEpsilon added: all three are taken out of it",
            check=lambda s: (
                s.preprocessor_epsilon + s.discovery_epsilon + s.report_epsilon < s.epsilon
            ),
            field_path=".preprocessorEpsilon",
        ),
        Rule(
            cel="self.discoveryDelta < self.delta",
            message="discoveryDelta must be smaller than delta: it is taken out of it",
            check=lambda s: s.discovery_delta < s.delta,
            field_path=".discoveryDelta",
        ),
        Rule(
            cel="self.columns.exists(c, has(c.discover) && c.discover) "
            "== (self.discoveryEpsilon > 0.0)",
            message="discoveryEpsilon must be above 0 exactly when a column has discover: true",
            check=lambda s: any(_discovers(c) for c in s.columns) == (s.discovery_epsilon > 0),
            field_path=".discoveryEpsilon",
        ),
        Rule(
            cel="(self.discoveryEpsilon > 0.0) == (self.discoveryDelta > 0.0)",
            message="discoveryDelta must be above 0 exactly when discoveryEpsilon is (the "
            "discovery threshold needs both)",
            check=lambda s: (s.discovery_epsilon > 0) == (s.discovery_delta > 0),
            field_path=".discoveryDelta",
        ),
        Rule(
            cel="self.columns.exists(c, c.type == 'numeric' && !has(c.lower)) "
            "== (self.preprocessorEpsilon > 0.0)",
            message="preprocessorEpsilon must be above 0 exactly when a numeric column has no "
            "lower/upper (its bounds are then inferred privately)",
            check=lambda s: (
                any(_infers_bounds(c) for c in s.columns) == (s.preprocessor_epsilon > 0)
            ),
            field_path=".preprocessorEpsilon",
        ),
    )

    @field_validator("columns")
    @classmethod
    def _unique_names(cls, columns: list[Column]) -> list[Column]:
        # The API server enforces the same through the list's map key (`name`).
        names = [c.name for c in columns]
        duplicated = sorted({n for n in names if names.count(n) > 1})
        if duplicated:
            raise ValueError(f"column names must be unique: {', '.join(duplicated)}")
        return columns


class Output(WireModel):
    """Where the synthetic copy goes."""

    uri: str = Field(
        min_length=1,
        max_length=2048,
        pattern=DATA_URI_PATTERN,
        description="Where the Job writes the synthetic table (file:// or "
        "az://<account>/<container>/<blob>): parquet for a .parquet or .pq name, csv for "
        ".csv, else the source's format. It must differ from source.uri.",
    )


class SyntheticDatasetSpec(WireModel):
    """The source, the synthesizer and what it may spend, the budget that pays, the output."""

    source: Source = Field(description="The dataset to synthesize from.")
    synthesizer: Synthesizer = Field(
        description="The DP synthesizer, its total (ε, δ) and every column's public domain."
    )
    budget_ref: ObjectReference = Field(
        description="The PrivacyBudget of the source dataset: every run is paid for."
    )
    output: Output = Field(description="Where the synthetic copy goes.")
    resources: ResourceRequirements = Field(
        default_factory=ResourceRequirements,
        description="CPU and memory of the synthesizer Job's container.",
    )
    confidential: bool = Field(default=False, description="Run the Job on confidential VM nodes.")
    storage_cidrs: list[Cidr] = Field(
        default_factory=list,
        max_length=16,
        description="CIDRs of the storage endpoint the Job may reach on 443; empty: public "
        "addresses only (no in-cluster or private ranges).",
    )
    active_deadline_seconds: int = Field(
        default=21600,
        ge=60,
        le=604800,
        description="The Job's activeDeadlineSeconds: a run that takes longer is stopped "
        "(and its claim, already consumed, stays spent).",
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.source.uri != self.output.uri",
            message="output.uri must differ from source.uri: the source is never overwritten",
            check=lambda s: s.source.uri != s.output.uri,
            field_path=".output.uri",
        ),
    )


class SyntheticDatasetStatus(WireModel):
    """Only public facts and DP figures: nothing here was computed from the data for free."""

    observed_generation: int | None = observed_generation_field()
    conditions: list[Condition] = conditions_field()
    claim_state: Literal["Pending", "Granted", "Denied", "Consumed", "Released"] | None = Field(
        default=None,
        description="This run's claim on its PrivacyBudget: Pending, Granted, Denied, "
        "Consumed (the Job read the data: the ε is spent) or Released (returned unspent).",
    )
    job_name: str | None = Field(
        default=None,
        max_length=63,
        description="Set as the Job is created: a Job of this name is never created again.",
    )
    output_uri: str | None = Field(
        default=None, max_length=2048, description="Where the synthetic copy was written."
    )
    rows: int | None = Field(
        default=None, ge=0, description="Synthetic rows written (spec.synthesizer.rows)."
    )
    quality: dict[str, Any] | None = Field(
        default=None,
        description="The DP quality estimate (reportEpsilon > 0), else absent.",
    )


class SyntheticDataset(CustomResource):
    """A differentially-private synthetic copy of a dataset: Veil claims the run's (ε, δ) from
    the dataset's PrivacyBudget, runs the synthesizer as a hardened Job, and reports the output
    and a quality estimate."""

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
    short_names: ClassVar[tuple[str, ...]] = ("synthds", "synth", "sds")
    key_columns: ClassVar[tuple[dict[str, Any], ...]] = (
        {"name": "Method", "type": "string", "jsonPath": ".spec.synthesizer.method"},
        {"name": "Epsilon", "type": "number", "jsonPath": ".spec.synthesizer.epsilon"},
        {"name": "Claim", "type": "string", "jsonPath": ".status.claimState"},
        {"name": "Rows", "type": "integer", "jsonPath": ".status.rows", "priority": 1},
    )

    kind: Literal["SyntheticDataset"] = "SyntheticDataset"
    spec: SyntheticDatasetSpec
    status: SyntheticDatasetStatus = Field(default_factory=SyntheticDatasetStatus)
