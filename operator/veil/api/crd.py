"""Render CustomResourceDefinitions from the pydantic models.

Pydantic writes JSON Schema 2020-12; a CRD wants a structural OpenAPI v3 subset. The
conversion inlines `$ref`s, turns `anyOf [X, null]` into X (optional fields are simply
omitted on the wire), `const` into a one-value `enum`, numeric `exclusiveMinimum: n` into
`minimum: n` + `exclusiveMinimum: true`, and `Any`-valued objects into objects that keep
unknown fields.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

from veil import API_GROUP, API_VERSION
from veil.api import KINDS
from veil.api.base import CustomResource

# Keys of JSON Schema that a CRD schema accepts as they are.
_PASSTHROUGH = {
    "type",
    "format",
    "description",
    "enum",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "default",
    "x-kubernetes-validations",
    "x-kubernetes-list-type",
    "x-kubernetes-list-map-keys",
    "x-kubernetes-preserve-unknown-fields",
    "minProperties",
    "maxProperties",
}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref is None:
        return node
    target = dict(defs[ref.rsplit("/", 1)[-1]])
    # Keys beside a $ref (e.g. a field's description) win over the definition's.
    target.update({k: v for k, v in node.items() if k != "$ref"})
    return target


def to_structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Convert one pydantic JSON-schema node into a structural CRD schema node."""
    node = _resolve(node, defs)
    if "anyOf" in node:
        return _union(node, defs)
    out = _keywords(node)
    if node.get("type") == "object" or "properties" in node:
        out.update(_object(node, defs))
    elif node.get("type") == "array":
        out["items"] = to_structural(node.get("items", {}), defs)
    elif "type" not in out and "enum" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


def _union(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    options = [o for o in node["anyOf"] if o.get("type") != "null"]
    merged = {k: v for k, v in node.items() if k not in ("anyOf", "default")}
    if len(options) == 1:
        # An optional field: omitted on the wire rather than null.
        return to_structural({**_resolve(options[0], defs), **merged}, defs)
    # A union of scalars (e.g. str | bool): let the API server keep either.
    out: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}
    if "description" in merged:
        out["description"] = prose(merged["description"])
    return out


def prose(text: str) -> str:
    """A docstring or description as `kubectl explain` should show it: lines of a paragraph
    joined, paragraphs kept apart."""
    paragraphs = re.split(r"\n\s*\n", inspect.cleandoc(text))
    return "\n\n".join(" ".join(p.split()) for p in paragraphs if p.strip())


def _keywords(node: dict[str, Any]) -> dict[str, Any]:
    out = {key: value for key, value in node.items() if key in _PASSTHROUGH}
    if "description" in out:
        out["description"] = prose(out["description"])
    if "const" in node:
        out["enum"] = [node["const"]]
    if "exclusiveMinimum" in node:
        out["minimum"] = node["exclusiveMinimum"]
        out["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        out["maximum"] = node["exclusiveMaximum"]
        out["exclusiveMaximum"] = True
    if out.get("default") is None:
        out.pop("default", None)
    return out


def _object(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object"}
    if "properties" in node:
        out["properties"] = {
            name: to_structural(prop, defs) for name, prop in node["properties"].items()
        }
        if node.get("required"):
            out["required"] = sorted(node["required"])
    extra = node.get("additionalProperties")
    patterned = node.get("patternProperties", {})
    if len(patterned) == 1:
        # A CRD has no patternProperties: values keep their schema, keys get a CEL rule.
        ((key_pattern, value_schema),) = patterned.items()
        out["additionalProperties"] = to_structural(value_schema, defs)
        out.setdefault("x-kubernetes-validations", []).append(
            {
                "rule": f"self.all(k, k.matches('{key_pattern}'))",
                "message": f"keys must match {key_pattern}",
            }
        )
    elif isinstance(extra, dict) and extra:
        out["additionalProperties"] = to_structural(extra, defs)
    elif "properties" not in node:
        out["x-kubernetes-preserve-unknown-fields"] = True
    return out


# What the API server documents for these on every kind (as controller-gen writes them).
# `metadata` carries no description: a CRD may say nothing about it but name rules, and the
# API server documents it as ObjectMeta.
API_VERSION_DESCRIPTION = (
    "APIVersion defines the versioned schema of this representation of an object. Servers "
    "should convert recognized schemas to the latest internal value, and may reject "
    "unrecognized values. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources"
)
KIND_DESCRIPTION = (
    "Kind is a string value representing the REST resource this object represents. Servers "
    "may infer this from the endpoint the client submits requests to. Cannot be updated. In "
    "CamelCase. More info: "
    "https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"
)


def kind_description(kind: type[CustomResource]) -> str:
    """The kind's own docstring (not CustomResource's), as `kubectl explain <kind>` shows it."""
    doc = kind.__dict__.get("__doc__")
    if not doc:
        raise TypeError(f"{kind.__name__} needs a docstring: it is the kind's description")
    return prose(doc)


def schema_of(kind: type[CustomResource]) -> dict[str, Any]:
    spec_type = kind.model_fields["spec"].annotation
    status_type = kind.model_fields["status"].annotation
    if not (isinstance(spec_type, type) and isinstance(status_type, type)):
        raise TypeError(f"{kind.__name__} needs concrete spec and status models")
    schemas = {}
    for name, model in (("spec", spec_type), ("status", status_type)):
        raw = model.model_json_schema(by_alias=True, mode="validation")
        schemas[name] = to_structural(raw, raw.get("$defs", {}))
    spec_schema = schemas["spec"]
    status_schema = schemas["status"]
    spec_schema.pop("title", None)
    schema: dict[str, Any] = {
        "description": kind_description(kind),
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": API_VERSION_DESCRIPTION},
            "kind": {"type": "string", "description": KIND_DESCRIPTION},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    if kind.object_rules:
        schema["x-kubernetes-validations"] = [rule.as_cel() for rule in kind.object_rules]
    return schema


def printer_columns(kind: type[CustomResource]) -> list[dict[str, Any]]:
    ready = '.status.conditions[?(@.type=="Ready")]'
    return [
        {"name": "Ready", "type": "string", "jsonPath": f"{ready}.status"},
        {"name": "Reason", "type": "string", "jsonPath": f"{ready}.reason"},
        *kind.key_columns,
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        {"name": "Message", "type": "string", "jsonPath": f"{ready}.message", "priority": 1},
    ]


def crd_for(kind: type[CustomResource]) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{kind.plural}.{API_GROUP}",
            "labels": {"app.kubernetes.io/part-of": "veil"},
        },
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind.kind_name,
                "listKind": f"{kind.kind_name}List",
                "plural": kind.plural,
                "singular": kind.kind_name.lower(),
                "shortNames": list(kind.short_names),
                "categories": ["veil"],
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": printer_columns(kind),
                    "schema": {"openAPIV3Schema": schema_of(kind)},
                }
            ],
        },
    }


def all_crds() -> dict[str, dict[str, Any]]:
    """File name → CRD, for every kind."""
    return {f"{API_GROUP}_{kind.plural}.yaml": crd_for(kind) for kind in KINDS}
