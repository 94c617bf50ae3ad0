"""The committed CRDs are exactly what `veil crds` writes, and are structural."""

from __future__ import annotations

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
