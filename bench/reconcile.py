"""Benchmark: N ConfidentialModels applied at once on the local control plane.

    .venv/bin/python -m bench.reconcile [--n 200]

Prints and writes bench/results/reconcile.json: n, seconds_to_all_children,
reconciles_per_second, writes_per_resource, writes_on_noop_resync (must be 0),
operator_rss_mb. The operator runs as its own user; writes are counted from the API
server's audit log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from tests.cluster.localcluster import running
from tests.integration.conftest import TOKEN, OperatorProcess

from bench.report import publish
from veil_standins.arm import ArmDouble
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.server import ServerThread
from veil_standins.tls import make_tls

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
WRITES = {"create", "update", "patch", "delete"}
NAMESPACE = "bench"


def _epoch(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _models(n: int, vault_url: str) -> str:
    base = yaml.safe_load((REPO / "examples" / "confidential-model-cvm" / "model.yaml").read_text())
    documents = []
    for index in range(n):
        document = json.loads(json.dumps(base))
        document["metadata"] = {"name": f"model-{index:04d}", "namespace": NAMESPACE}
        document["spec"]["keyRelease"]["vaultUrl"] = vault_url
        document["spec"]["keyRelease"]["keyName"] = f"model-{index:04d}"
        document["spec"]["serving"]["replicas"] = 1
        documents.append(document)
    return yaml.safe_dump_all(documents)


def _reconciles(metrics: str) -> float:
    pattern = r'^veil_reconcile_total\{kind="ConfidentialModel",result="[a-z]+"\} ([0-9.e+]+)$'
    return sum(float(v) for v in re.findall(pattern, metrics, re.MULTILINE))


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
                writes = [
                    e
                    for e in cluster.audit_events(user="veil-operator")
                    if e["verb"] in WRITES and _epoch(e["requestReceivedTimestamp"]) >= started
                ]
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
        "reconciles_per_second": round(reconciles / seconds, 2),
        "writes_per_resource": round(len(writes) / n, 2),
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
