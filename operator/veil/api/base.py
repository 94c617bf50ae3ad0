"""Shared pieces of Veil's resource models: wire naming, cross-field rules, conditions.

Each cross-field rule is written once, as a `Rule` with a CEL expression for the API
server and a Python predicate for the operator, so `kubectl apply` and the operator
reject the same objects for the same reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    """A cross-field validation rule, enforced by the API server (CEL) and by pydantic.

    `check` is None for transition rules (those that compare with `oldSelf`): only the
    API server sees the previous object.
    """

    cel: str
    message: str
    check: Callable[[Any], bool] | None = None
    field_path: str | None = None
    reason: Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired"] = (
        "FieldValueInvalid"
    )

    def as_cel(self) -> dict[str, str]:
        out = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason != "FieldValueInvalid":
            out["reason"] = self.reason
        return out


def _add_rules_to_schema(schema: dict[str, Any], cls: type[Any]) -> None:
    rules: tuple[Rule, ...] = getattr(cls, "cel_rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [rule.as_cel() for rule in rules]


class WireModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        json_schema_extra=_add_rules_to_schema,
    )

    cel_rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self) -> Self:
        for rule in type(self).cel_rules:
            if rule.check is not None and not rule.check(self):
                raise ValueError(f"{rule.field_path or '<object>'}: {rule.message}")
        return self

    def to_wire(self) -> dict[str, Any]:
        """The JSON the API server stores: aliases, no unset optionals."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


ConditionStatus = Literal["True", "False", "Unknown"]


def immutable(message: str) -> dict[str, Any]:
    """`json_schema_extra` for a field the API server must keep as it was created."""
    return {"x-kubernetes-validations": [{"rule": "self == oldSelf", "message": message}]}


# Where datasets live: a local path (tests, dev), Azure Blob (az://account/container/path),
# or HTTPS.
DATA_URI_PATTERN = r"^(file|az|https)://\S+$"

# Names of a Kubernetes object, as the API server accepts them (DNS-1123 subdomain).
DNS_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# A DNS-1123 label: the rule for namespaces and Service names.
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
SHA256_PATTERN = r"^[a-f0-9]{64}$"
QUANTITY_PATTERN = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"


class Condition(WireModel):
    """One aspect of the object's state (metav1.Condition): Ready says whether it does its job."""

    type: str = Field(
        max_length=316,
        pattern=r"^([a-zA-Z0-9.-]+/)?[A-Za-z0-9_.-]+$",
        description="Ready (whether the object does its job), Reconciling (the operator is "
        "still acting on it) or Stalled (it cannot progress without a change from you).",
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        description="The metadata.generation the condition was set from: older than the "
        "object's generation means the operator has not yet acted on the latest spec.",
    )
    last_transition_time: str = Field(
        max_length=64, description="When the status last changed (RFC 3339)."
    )
    reason: str = Field(
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="Why, in one CamelCase word (e.g. ModelServing, BudgetAvailable): stable, "
        "for alerts and automation.",
    )
    message: str = Field(
        default="",
        max_length=32768,
        description="Why, for people: what happened, on which resource, and what to do.",
    )


def conditions_field() -> Any:
    """A `conditions` list keyed by type, as Kubernetes API conventions ask."""
    return Field(
        default_factory=list,
        max_length=16,
        description="The object's state, one condition a type: Ready always, Reconciling and "
        "Stalled when they apply (`kubectl wait --for=condition=Ready` waits on it).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )


def observed_generation_field() -> Any:
    """`status.observedGeneration`, as Kubernetes API conventions ask."""
    return Field(
        default=None,
        ge=0,
        description="The metadata.generation this status describes: older than the object's "
        "generation means the operator has not yet acted on the latest spec.",
    )


class ObjectReference(WireModel):
    """A reference to a namespaced object; the namespace defaults to the referrer's."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=DNS_NAME_PATTERN,
        description="Name of the referenced object.",
    )
    namespace: str | None = Field(
        default=None,
        min_length=1,
        max_length=63,
        pattern=DNS_LABEL_PATTERN,
        description="Its namespace; absent means the referring object's own.",
    )


Quantity = Annotated[str, StringConstraints(max_length=64, pattern=QUANTITY_PATTERN)]
ResourceName = Annotated[str, StringConstraints(max_length=253, pattern=r"^[a-z0-9./-]+$")]


class ResourceRequirements(WireModel):
    """CPU and memory, as a container's `resources` takes them."""

    requests: dict[ResourceName, Quantity] = Field(
        default_factory=dict,
        max_length=8,
        description="What the scheduler reserves, by resource name (cpu, memory), as "
        "Kubernetes quantities (e.g. 500m, 1Gi).",
    )
    limits: dict[ResourceName, Quantity] = Field(
        default_factory=dict,
        max_length=8,
        description="The most the container may use, by resource name (cpu, memory), as "
        "Kubernetes quantities.",
    )


class LabelSelector(WireModel):
    """The matchLabels half of metav1.LabelSelector, which is all allow-lists need."""

    match_labels: dict[str, str] = Field(
        default_factory=dict,
        max_length=32,
        description="Labels an object must all carry to match; empty matches every object.",
    )


class ColumnBounds(WireModel):
    """Public bounds of a numeric column: reading them off the data would spend privacy."""

    column: str = Field(min_length=1, max_length=256, description="The feature column.")
    lower: float = Field(description="Public lower bound: smaller values are clipped to it.")
    upper: float = Field(description="Public upper bound: larger values are clipped to it.")

    cel_rules: ClassVar[tuple[Rule, ...]] = (
        Rule(
            cel="self.lower < self.upper",
            message="lower must be below upper",
            check=lambda b: b.lower < b.upper,
            field_path=".upper",
        ),
    )


class CustomResource(WireModel):
    """An object of one of Veil's kinds: apiVersion, kind, metadata, spec, status."""

    kind_name: ClassVar[str]
    plural: ClassVar[str]
    short_names: ClassVar[tuple[str, ...]]
    key_columns: ClassVar[tuple[dict[str, Any], ...]] = ()
    # Rules on the whole object (they may compare spec with status); transition rules only,
    # since what they guard is a change.
    object_rules: ClassVar[tuple[Rule, ...]] = ()

    api_version: Literal["veil.dev/v1alpha1"] = "veil.dev/v1alpha1"
    kind: str
    metadata: dict[str, Any] = Field(default_factory=dict)
