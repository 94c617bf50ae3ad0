"""The committed CRDs are exactly what `veil crds` writes, and are structural."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from veil.api.crd import all_crds
from veil.cli import main, render_yaml

CRDS = Path(__file__).resolve().parents[2] / "crds"

# Keywords a structural CRD schema may not contain.
FORBIDDEN = {"$ref", "$defs", "anyOf", "oneOf", "allOf", "const", "prefixItems", "title"}


def test_committed_crds_match_the_models(tmp_path: Path) -> None:
    assert main(["crds", "--output", str(tmp_path)]) == 0
    generated = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in CRDS.glob("*.yaml"))
    assert generated == committed, "run `veil crds` and commit crds/"
    for name in generated:
        assert (CRDS / name).read_text() == (tmp_path / name).read_text(), (
            f"crds/{name} is stale: run `veil crds` and commit it"
        )


def _walk(node: Any, path: str = "") -> list[str]:
    problems = []
    if isinstance(node, dict):
        for key, value in node.items():
            if key in FORBIDDEN:
                problems.append(f"{path}.{key}")
            if key == "exclusiveMinimum" and not isinstance(value, bool):
                problems.append(f"{path}.exclusiveMinimum is numeric")
            if key == "additionalProperties" and value is False:
                problems.append(f"{path}.additionalProperties false")
            problems.extend(_walk(value, f"{path}.{key}"))
    elif isinstance(node, list):
        for index, item in enumerate(node):
            problems.extend(_walk(item, f"{path}[{index}]"))
    return problems


def _every_schema_node_typed(node: dict[str, Any], path: str) -> list[str]:
    problems = []
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
        problems.append(path)
    for name, child in node.get("properties", {}).items():
        problems.extend(_every_schema_node_typed(child, f"{path}.{name}"))
    if isinstance(node.get("items"), dict):
        problems.extend(_every_schema_node_typed(node["items"], f"{path}[]"))
    return problems


def test_schemas_are_structural() -> None:
    for name, crd in all_crds().items():
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        assert _walk(schema) == [], name
        assert _every_schema_node_typed(schema, name) == []


def test_crd_names_columns_and_subresources() -> None:
    for crd in all_crds().values():
        names = crd["spec"]["names"]
        version = crd["spec"]["versions"][0]
        assert names["categories"] == ["veil"]
        assert names["shortNames"]
        assert version["subresources"] == {"status": {}}
        columns = [c["name"] for c in version["additionalPrinterColumns"]]
        assert columns[:2] == ["Ready", "Reason"]
        assert "Age" in columns
        assert len(columns) >= 5, "each kind shows its own key figure"


def test_conditions_are_a_map_list_keyed_by_type() -> None:
    for crd in all_crds().values():
        status = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
        conditions = status["properties"]["conditions"]
        assert conditions["x-kubernetes-list-type"] == "map"
        assert conditions["x-kubernetes-list-map-keys"] == ["type"]
        assert set(conditions["items"]["required"]) >= {"type", "status", "reason"}


def test_rendered_yaml_round_trips() -> None:
    for crd in all_crds().values():
        assert yaml.safe_load(render_yaml(crd)) == crd


# --- kubectl explain: every field is documented -----------------------------------------------


def undocumented(node: dict[str, Any], path: str) -> list[str]:
    """Paths of schema properties without a description, walking properties, array items and
    map values. `metadata` at the root is the exception: a CRD may say nothing about it but
    name rules (the API server documents it as ObjectMeta)."""
    missing = []
    for name, child in node.get("properties", {}).items():
        where = f"{path}.{name}"
        if where.count(".") == 1 and name == "metadata":
            continue
        if not str(child.get("description", "")).strip():
            missing.append(where)
        missing.extend(undocumented(child, where))
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(node.get(key), dict):
            missing.extend(undocumented(node[key], f"{path}{suffix}"))
    return missing


def test_every_field_has_a_description() -> None:
    """`kubectl explain` documents every field: a field without one fails here, by path."""
    missing = []
    for crd in all_crds().values():
        kind = crd["spec"]["names"]["kind"]
        schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        if not str(schema.get("description", "")).strip():
            missing.append(kind)
        missing.extend(undocumented(schema, kind))
    assert not missing, "fields without a description (add one to the pydantic model):\n" + (
        "\n".join(missing)
    )


def test_undocumented_finds_nested_fields() -> None:
    schema = {
        "properties": {
            "metadata": {"type": "object"},
            "spec": {
                "description": "d",
                "properties": {
                    "list": {"description": "d", "items": {"properties": {"x": {}}}},
                    "map": {"description": "d", "additionalProperties": {"properties": {"y": {}}}},
                    "nested": {"properties": {"metadata": {}}},
                },
            },
        }
    }
    assert undocumented(schema, "K") == [
        "K.spec.list[].x",
        "K.spec.map{}.y",
        "K.spec.nested",
        "K.spec.nested.metadata",
    ]


def descriptions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["description"]] if isinstance(node.get("description"), str) else []
        return found + [d for value in node.values() for d in descriptions(value)]
    if isinstance(node, list):
        return [d for item in node for d in descriptions(item)]
    return []


def test_descriptions_read_as_prose() -> None:
    """Docstrings reach `kubectl explain` as paragraphs, not with the source's line breaks."""
    for crd in all_crds().values():
        for description in descriptions(crd["spec"]["versions"][0]["schema"]):
            assert "\n" not in description.replace("\n\n", ""), description
            assert description == description.strip(), description


# --- names and printer columns ---------------------------------------------------------------

# Short names of the kinds a stock cluster serves (kubectl api-resources): ours must not shadow
# or read like one of them (`cm` is a ConfigMap).
BUILTIN_SHORT_NAMES = {
    "cm", "cs", "ds", "deploy", "ep", "ev", "hpa", "ing", "limits", "netpol", "no", "ns",
    "pc", "pdb", "po", "pv", "pvc", "quota", "rc", "rs", "sa", "sc", "sts", "svc", "crd",
    "crds", "csr",
}  # fmt: skip


def test_short_names_are_the_ones_a_user_would_guess() -> None:
    names = {
        crd["spec"]["names"]["kind"]: crd["spec"]["names"]["shortNames"]
        for crd in (all_crds().values())
    }
    assert names["ConfidentialModel"] == ["cmodel"]
    assert names["PrivacyBudget"][0] == "pbudget"
    assert names["SyntheticDataset"][0] == "synthds"
    every = [short for shorts in names.values() for short in shorts]
    assert len(every) == len(set(every))
    for short in every:
        assert re.fullmatch(r"[a-z]+", short), short
        assert short not in BUILTIN_SHORT_NAMES, short
        assert not any(short.startswith(f"{b}-") for b in BUILTIN_SHORT_NAMES), short


def test_remaining_epsilon_column_shows_the_rounded_figure() -> None:
    """A printer column cannot round (the API server passes the float through): the column
    shows the operator's rounded string, and the exact figure stays in status."""
    crd = all_crds()["veil.dev_privacybudgets.yaml"]
    version = crd["spec"]["versions"][0]
    columns = {c["name"]: c for c in version["additionalPrinterColumns"]}
    assert columns["Remaining"] == {
        "name": "Remaining",
        "type": "string",
        "jsonPath": ".status.epsilonRemainingDisplay",
    }
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["epsilonRemaining"]["type"] == "number"
    assert status["epsilonRemainingDisplay"]["type"] == "string"
