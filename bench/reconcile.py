"""Benchmark: N ConfidentialModels applied at once on the local control plane.

    .venv/bin/python -m bench.reconcile [--n 200]

Prints and writes bench/results/reconcile.json: n, seconds_to_all_children,
reconciles_per_second, writes_per_resource, writes_on_noop_resync (must be 0),
operator_rss_mb. The operator runs as its own user; writes are counted from the API
server's audit log.

The anchor, in the same run and on the same nodes: the same children (the operator's own
builders' output) applied by a plain client, one server-side apply each from
`ANCHOR_THREADS` threads, timed to the same end (every Deployment available): what the API
server, scheduler and kubelets allow on this machine (`anchor_seconds`, `ratio_to_anchor`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from tests.cluster.localcluster import running
from tests.integration.conftest import TOKEN, OperatorProcess

from bench.report import publish
from veil.azure.keyvault import DEFAULT_KEY_SIZE
from veil.config import OperatorConfig
from veil.render import render_model
from veil_standins.arm import ArmDouble
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.server import ServerThread
from veil_standins.tls import make_tls

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WRITES = {"create", "update", "patch", "delete"}
NAMESPACE = "bench"
ANCHOR_NAMESPACE = "bench-anchor"
ANCHOR_THREADS = 16
# Resource paths of the children's kinds.
_PLURALS = {
    "Deployment": "deployments",
    "Service": "services",
    "ServiceAccount": "serviceaccounts",
    "NetworkPolicy": "networkpolicies",
    "PodDisruptionBudget": "poddisruptionbudgets",
}


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _model_documents(n: int, vault_url: str, namespace: str) -> list[dict[str, Any]]:
    base = yaml.safe_load((REPO / "examples" / "confidential-model-cvm" / "model.yaml").read_text())
    documents = []
    for index in range(n):
        document = json.loads(json.dumps(base))
        document["metadata"] = {"name": f"model-{index:04d}", "namespace": namespace}
        document["spec"]["keyRelease"]["vaultUrl"] = vault_url
        document["spec"]["keyRelease"]["keyName"] = f"model-{index:04d}"
        document["spec"]["serving"]["replicas"] = 1
        documents.append(document)
    return documents


def _models(n: int, vault_url: str) -> str:
    return yaml.safe_dump_all(_model_documents(n, vault_url, NAMESPACE))


def _anchor_children(n: int, vault_url: str) -> list[dict[str, Any]]:
    """What the operator applies for each model, from its own builders, without owner
    references (no owner exists here for the garbage collector to find)."""
    config = OperatorConfig.from_env()
    children = []
    for document in _model_documents(n, vault_url, ANCHOR_NAMESPACE):
        for child in render_model(document, config):
            if child["kind"] in _PLURALS:
                child["metadata"].pop("ownerReferences", None)
                children.append(child)
    return children


def _apply_path(child: dict[str, Any]) -> str:
    group_version = child["apiVersion"]
    prefix = "/api/v1" if group_version == "v1" else f"/apis/{group_version}"
    meta = child["metadata"]
    plural = _PLURALS[child["kind"]]
    return f"{prefix}/namespaces/{meta['namespace']}/{plural}/{meta['name']}"


def _available(cluster: Any, namespace: str) -> int:
    """How many Deployments in `namespace` have an available replica."""
    counts = cluster.kubectl(
        "get", "deployments", "-n", namespace, "-o",
        "jsonpath={range .items[*]}{.status.availableReplicas}{'\\n'}{end}",
    ).split()  # fmt: skip
    return sum(1 for count in counts if count.isdigit() and int(count) > 0)


def anchor(cluster: Any, n: int, vault_url: str) -> dict[str, float]:
    """The children applied directly (server-side apply, ANCHOR_THREADS client threads), timed
    to every Deployment available; then removed, so the operator gets the same free nodes."""
    from kubernetes import client, config  # the plain client the anchor is

    children = _anchor_children(n, vault_url)
    cluster.kubectl("create", "namespace", ANCHOR_NAMESPACE)
    configuration = client.Configuration()
    config.load_kube_config(str(cluster.kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = ANCHOR_THREADS
    rest = client.ApiClient(configuration).rest_client
    headers = {"Content-Type": "application/apply-patch+yaml", "Accept": "application/json"}

    def apply(child: dict[str, Any]) -> None:
        url = f"{configuration.host}{_apply_path(child)}?fieldManager=bench-anchor&force=true"
        response = rest.request("PATCH", url, headers=headers, body=json.dumps(child))
        if response.status >= 300:
            raise RuntimeError(f"apply {url}: {response.status} {response.data[:300]!r}")

    started = time.time()
    with ThreadPoolExecutor(ANCHOR_THREADS) as pool:
        list(pool.map(apply, children))
    applied = time.time() - started
    while _available(cluster, ANCHOR_NAMESPACE) < n:
        if time.time() - started > 900:
            raise TimeoutError("the anchor's Deployments were not available after 900 s")
        time.sleep(0.5)
    seconds = time.time() - started
    cluster.kubectl("delete", "namespace", ANCHOR_NAMESPACE, "--wait=true", "--timeout=300s")
    return {
        "anchor_objects": len(children),
        "anchor_apply_seconds": round(applied, 2),
        "anchor_seconds": round(seconds, 2),
    }


def _reconciles(metrics: str) -> float:
    pattern = (
        r'^controller_runtime_reconcile_total\{controller="confidentialmodel",result="[a-z_]+"\} '
        r"([0-9.e+]+)$"
    )
    return sum(float(v) for v in re.findall(pattern, metrics, re.MULTILINE))


def _writes_by_kind(writes: list[dict[str, Any]], n: int) -> dict[str, float]:
    """Writes per model by verb and resource (and subresource), from the audit log."""
    counts: dict[str, int] = {}
    for event in writes:
        ref = event.get("objectRef", {})
        what = f"{event['verb']} {ref.get('resource')}"
        if ref.get("subresource"):
            what += f"/{ref['subresource']}"
        counts[what] = counts.get(what, 0) + 1
    return {what: round(count / n, 2) for what, count in sorted(counts.items())}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(n: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="veil-bench-") as scratch:
        root = Path(os.environ.get("VEIL_BENCH_DIR") or scratch)
        tls = make_tls(root / "tls")
        key_vault, arm = KeyVaultDouble(token=TOKEN), ArmDouble(token=TOKEN)
        # Key Vault makes keys in its HSMs, not on this machine: made before the clock starts.
        key_vault.pregenerate(n, DEFAULT_KEY_SIZE)
        kv_server = ServerThread(key_vault.app(), tls.server_context()).start()
        arm_server = ServerThread(arm.app(), tls.server_context()).start()
        key_vault.url, arm.url = kv_server.url, arm_server.url
        with running(root / "cluster") as cluster:
            cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
            cluster.kubectl("wait", "--for=condition=Established", "crd", "--all")
            cluster.kubectl("create", "namespace", NAMESPACE)
            # Confidential capacity for every model (each pod asks 0.5 CPU + its sidecar).
            cluster.add_nodes(ordinary=2, confidential=2 + n // 20)
            kubeconfig = cluster.user_kubeconfig("veil-operator", "veil:operators")
            cluster.kubectl(
                "create",
                "clusterrolebinding",
                "veil-bench",
                "--clusterrole=cluster-admin",
                "--user=veil-operator",
            )
            env = {
                "VEIL_AZURE_STATIC_TOKEN": TOKEN,
                "VEIL_AZURE_CA_BUNDLE": str(tls.ca_file),
                "VEIL_AZURE_ARM_ENDPOINT": arm.url,
            }
            baseline = anchor(cluster, n, key_vault.url)
            operator = OperatorProcess(cluster, root / "operator.log", kubeconfig, env)
            try:
                operator.wait_healthy()
                started = time.time()
                cluster.kubectl("apply", "-f", "-", input_text=_models(n, key_vault.url))
                while True:
                    deployments = cluster.kubectl(
                        "get", "deployments", "-n", NAMESPACE, "-o", "name"
                    ).split()
                    settled = cluster.kubectl(
                        "get",
                        "confidentialmodels",
                        "-n",
                        NAMESPACE,
                        "-o",
                        "jsonpath={range .items[*]}{.status.conditions[?(@.type=='Ready')]"
                        ".status}{'\\n'}{end}",
                    ).split()
                    if len(deployments) == n and settled.count("True") == n:
                        break
                    if time.time() - started > 900:
                        raise TimeoutError(f"{len(deployments)}/{n} deployments after 900 s")
                    time.sleep(1)
                seconds = time.time() - started
                reconciles = _reconciles(operator.metrics())
                audited = [
                    e
                    for e in cluster.audit_events(user="veil-operator")
                    if e["verb"] in WRITES and _epoch(e["requestReceivedTimestamp"]) >= started
                ]
                events = [e for e in audited if e.get("objectRef", {}).get("resource") == "events"]
                writes = [e for e in audited if e not in events]
                breakdown = _writes_by_kind(writes, n)
                time.sleep(5)
                quiet_from = time.time()
                time.sleep(12)  # four resync periods of the operator (3 s here)
                noop = [
                    e
                    for e in cluster.audit_events(user="veil-operator")
                    if e["verb"] in WRITES and _epoch(e["requestReceivedTimestamp"]) >= quiet_from
                ]
                rss = _rss_mb(operator.process.pid)
                for event in noop:
                    ref = event.get("objectRef", {})
                    print(
                        "no-op write:",
                        event["verb"],
                        ref.get("resource"),
                        ref.get("name"),
                        ref.get("subresource", ""),
                        file=sys.stderr,
                    )
            finally:
                operator.stop()
        kv_server.stop()
        arm_server.stop()
    return {
        "n": n,
        "seconds_to_all_children": round(seconds, 2),
        **baseline,
        "ratio_to_anchor": round(seconds / baseline["anchor_seconds"], 2),
        "reconciles_per_second": round(reconciles / seconds, 2),
        "writes_per_resource": round(len(writes) / n, 2),
        "events_per_resource": round(len(events) / n, 2),
        "writes_per_resource_by_kind": breakdown,
        "writes_on_noop_resync": len(noop),
        "operator_rss_mb": round(rss, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    result = run(args.n)
    publish(result, None if args.no_write else RESULTS / "reconcile.json")


if __name__ == "__main__":
    main()
