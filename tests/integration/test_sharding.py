"""Scale out by namespace: two operators, each owning its own namespaces, reconcile 200 models
between them, and the audit log shows neither touching the other's objects.

This is how a platform team shards Veil (the chart's `watchNamespaces`, kopf's namespace
patterns): each replica set watches, reads and writes only its own namespaces, so shards need
no coordination and a fault in one leaves the other alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.localcluster import LocalCluster
from tests.integration.conftest import REPO, AzureDoubles, OperatorProcess, wait_for

pytestmark = pytest.mark.cluster

SHARDS = ("veil-shard-a", "veil-shard-b")
MODELS_PER_SHARD = 100
WRITES = {"create", "update", "patch", "delete", "deletecollection"}


def _models(namespace: str, azure: AzureDoubles) -> str:
    base = yaml.safe_load((REPO / "examples" / "confidential-model-cvm" / "model.yaml").read_text())
    documents = []
    for index in range(MODELS_PER_SHARD):
        document = json.loads(json.dumps(base))
        name = f"{namespace}-{index:03d}"
        document["metadata"] = {"name": name, "namespace": namespace}
        document["spec"]["keyRelease"]["vaultUrl"] = azure.key_vault.url
        document["spec"]["keyRelease"]["keyName"] = name
        document["spec"]["serving"]["replicas"] = 1
        documents.append(document)
    return yaml.safe_dump_all(documents)


def _ready_count(cluster: LocalCluster, namespace: str) -> int:
    states = cluster.kubectl(
        "get", "confidentialmodels", "-n", namespace, "-o",
        "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Ready')].status}{'\\n'}{end}",
    ).split()  # fmt: skip
    return states.count("True")


def _namespaces_touched(events: list[dict[str, Any]]) -> set[str]:
    return {e["objectRef"]["namespace"] for e in events if e.get("objectRef", {}).get("namespace")}


def test_two_operators_each_reconcile_their_own_namespaces_only(
    crds: LocalCluster, azure: AzureDoubles, tmp_path: Path
) -> None:
    # Room for 200 more model pods (16 CPU a fake node, 0.5 CPU or so a pod).
    crds.add_nodes(ordinary=0, confidential=16)
    operators = []
    try:
        for namespace in SHARDS:
            crds.kubectl("create", "namespace", namespace)
            kubeconfig = crds.user_kubeconfig(namespace, "veil:operators")
            crds.kubectl(
                "create", "clusterrolebinding", namespace,
                "--clusterrole=cluster-admin", f"--user={namespace}",
            )  # fmt: skip
            operator = OperatorProcess(
                crds, tmp_path / f"{namespace}.log", kubeconfig, azure.operator_env(),
                namespaces=namespace,
            )  # fmt: skip
            operators.append(operator)
        for operator in operators:
            operator.wait_healthy()
        for namespace in SHARDS:
            crds.kubectl("apply", "-f", "-", input_text=_models(namespace, azure))
        wait_for(
            lambda: all(_ready_count(crds, ns) == MODELS_PER_SHARD for ns in SHARDS),
            timeout=600,
            interval=2,
            what=f"{MODELS_PER_SHARD} Ready models in each of {SHARDS}",
        )
    finally:
        for operator in operators:
            operator.stop()

    for own, other in (SHARDS, SHARDS[::-1]):
        events = crds.audit_events(user=own)
        writes = [e for e in events if e["verb"] in WRITES]
        # Not vacuous: this shard's operator did the work of its own namespace...
        deployments = [e for e in writes if e["objectRef"].get("resource") == "deployments"]
        assert {e["objectRef"]["name"] for e in deployments} >= {
            f"{own}-{index:03d}" for index in range(MODELS_PER_SHARD)
        }
        # ...and neither read nor wrote anything in the other's (or any other) namespace.
        assert _namespaces_touched(events) == {own}, f"{own} touched other namespaces"
        assert other not in _namespaces_touched(writes)
