"""The API server accepts every example and rejects every invalid resource with a
message that names the offending field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster.localcluster import LocalCluster
from tests.data.invalid_resources import CASES, Case
from veil import API_GROUP, API_VERSION
from veil.api import KINDS

REPO = Path(__file__).resolve().parents[2]
PLURALS = {kind.kind_name: kind.plural for kind in KINDS}
NAMESPACE = "veil-invalid"


@pytest.fixture(scope="module")
def namespace(crds: LocalCluster) -> str:
    crds.kubectl("create", "namespace", NAMESPACE)
    return NAMESPACE


def test_crds_are_established_with_names_and_category(crds: LocalCluster) -> None:
    names = crds.kubectl(
        "get",
        "crd",
        "-l",
        "app.kubernetes.io/part-of=veil",
        "-o",
        "jsonpath={.items[*].metadata.name}",
    ).split()
    assert sorted(names) == sorted(f"{kind.plural}.{API_GROUP}" for kind in KINDS)
    resources = crds.kubectl("api-resources", f"--api-group={API_GROUP}", "-o", "wide")
    for kind in KINDS:
        line = next(row for row in resources.splitlines() if kind.kind_name in row)
        assert "veil" in line
        assert kind.short_names[0] in line


def test_every_example_is_accepted(crds: LocalCluster) -> None:
    scenarios = [
        p for p in sorted((REPO / "examples").iterdir()) if p.is_dir() and p.name != "gitops"
    ]
    written = [
        document
        for scenario in scenarios
        for path in sorted(scenario.rglob("*.yaml"))
        for document in yaml.safe_load_all(path.read_text())
        if document and str(document.get("apiVersion", "")).startswith(f"{API_GROUP}/")
    ]
    assert len(written) >= 6, "the examples hold Veil's resources"
    output = "".join(crds.kubectl("apply", "-R", "-f", str(p)) for p in scenarios)
    applied = [line for line in output.splitlines() if ".veil.dev/" in line]
    assert len(applied) == len(written), output
    listed = "".join(crds.kubectl("get", "-R", "-f", str(p), "-o", "name") for p in scenarios)
    assert len([n for n in listed.split() if ".veil.dev/" in n]) == len(written), listed
    # The examples name real Azure endpoints: remove them before an operator could try them.
    for scenario in scenarios:
        crds.kubectl("delete", "-R", "-f", str(scenario), "--wait=false")


def _create(api: client.ApiClient, manifest: dict[str, object]) -> None:
    kind = str(manifest["kind"])
    client.CustomObjectsApi(api).create_namespaced_custom_object(
        API_GROUP, API_VERSION, NAMESPACE, PLURALS[kind], manifest, field_validation="Strict"
    )


@pytest.mark.parametrize("case", [c for c in CASES if not c.transition], ids=lambda c: c.id)
def test_invalid_resource_is_rejected(api: client.ApiClient, namespace: str, case: Case) -> None:
    manifest = case.manifest(name=case.id, namespace=namespace)
    with pytest.raises(ApiException) as rejected:
        _create(api, manifest)
    # 422 for schema and CEL violations, 400 for fields the schema does not declare.
    assert rejected.value.status in (400, 422), rejected.value.body
    message = json.loads(rejected.value.body)["message"]
    assert case.expect in message, message


@pytest.mark.parametrize("case", [c for c in CASES if c.transition], ids=lambda c: c.id)
def test_immutable_field_change_is_rejected(
    api: client.ApiClient, namespace: str, case: Case
) -> None:
    original = Case(case.id, case.base, {}, "").manifest(name=case.id, namespace=namespace)
    _create(api, original)
    changed = case.manifest(name=case.id, namespace=namespace)
    objects = client.CustomObjectsApi(api)
    with pytest.raises(ApiException) as rejected:
        objects.patch_namespaced_custom_object(
            API_GROUP,
            API_VERSION,
            namespace,
            PLURALS[changed["kind"]],
            case.id,
            {"spec": changed["spec"]},
        )
    assert rejected.value.status == 422, rejected.value.body
    assert case.expect in json.loads(rejected.value.body)["message"]
