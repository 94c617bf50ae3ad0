"""`kubectl explain` on a real API server: every field of Veil's kinds is documented.

The unit test (tests/unit/test_crds.py) checks the generated CRDs; this one checks what the
API server publishes from them (OpenAPI v3, which `kubectl explain` reads), so a description
the server drops or rewrites would fail here.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.cluster.localcluster import LocalCluster
from veil import API_GROUP, API_VERSION
from veil.api import KINDS

pytestmark = pytest.mark.cluster


def _undocumented(node: dict[str, Any], schemas: dict[str, Any], path: str) -> list[str]:
    missing = []
    for name, child in node.get("properties", {}).items():
        where = f"{path}.{name}"
        # ObjectMeta is the API server's own type, documented by reference.
        ref = child.get("$ref") or (child.get("allOf") or [{}])[0].get("$ref")
        if ref:
            continue
        if not str(child.get("description", "")).strip():
            missing.append(where)
        missing.extend(_undocumented(child, schemas, where))
    for key, suffix in (("items", "[]"), ("additionalProperties", "{}")):
        if isinstance(node.get(key), dict):
            missing.extend(_undocumented(node[key], schemas, f"{path}{suffix}"))
    return missing


def test_the_api_server_publishes_a_description_for_every_field(crds: LocalCluster) -> None:
    document = json.loads(
        crds.kubectl("get", "--raw", f"/openapi/v3/apis/{API_GROUP}/{API_VERSION}")
    )
    schemas = document["components"]["schemas"]
    missing = []
    for kind in KINDS:
        name = next(n for n in schemas if n.endswith(f".{API_VERSION}.{kind.kind_name}"))
        schema = schemas[name]
        assert str(schema.get("description", "")).strip(), kind.kind_name
        missing.extend(_undocumented(schema, schemas, kind.kind_name))
    assert not missing, "\n".join(missing)


def test_kubectl_explain_says_what_the_model_uri_accepts(crds: LocalCluster) -> None:
    explained = " ".join(crds.kubectl("explain", "confidentialmodels.spec.model.uri").split())
    assert "az://<storage account>/<container>/<blob>" in explained
    assert "https://" in explained
    assert "oci://" not in explained
    kind = " ".join(crds.kubectl("explain", "pbudget").split())
    assert "differential-privacy budget" in kind
