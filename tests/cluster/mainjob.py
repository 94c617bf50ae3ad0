"""Veil's main job on this machine (`hack/up.sh`): a cluster with a real node, the chart's
operator as a pod, every example applied with real inputs, a real inference request, and the
status of everything. Leaves it all running; `hack/down.sh` stops it.

    python -m tests.cluster.mainjob --dir .cache/cluster
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from tests.cluster import demo
from tests.cluster.kube import apply, condition, get, infer_from_pod, wait_until
from tests.cluster.localcluster import REPO, _down, start_cluster
from tests.cluster.localenv import LocalEnvironment, example_overrides, load_yaml
from veil.api.dpsgd import DPSGD_FAMILIES

EXAMPLES = REPO / "examples"
KINDS = ("privacybudgets", "syntheticdatasets", "confidentialmodels")
CLIENTS_NS = "clinical-apps"


def say(message: str) -> None:
    print(f"[up] {message}", flush=True)


def _inputs(env: LocalEnvironment) -> dict[str, Any]:
    """Real inputs for the examples, uploaded where they point; the classifier for the check."""
    work = env.directory / "inputs"
    work.mkdir(exist_ok=True)
    env.upload("datasets/diabetes.csv", demo.diabetes_study_csv(work / "diabetes.csv").read_bytes())
    env.upload("datasets/oncology.csv", demo.oncology_csv(work / "oncology.csv").read_bytes())
    return {"classifier": demo.breast_cancer_classifier()}


def apply_examples(env: LocalEnvironment, classifier: demo.Classifier) -> list[dict[str, Any]]:
    applied = []
    for scenario in sorted(p for p in EXAMPLES.iterdir() if p.is_dir() and p.name != "gitops"):
        for manifest in sorted(scenario.glob("*.yaml")):
            for written in load_yaml(manifest):
                if written["kind"] == "Namespace":
                    env.workload_namespace(
                        written["metadata"]["name"], written["metadata"].get("labels")
                    )
                    continue
                training = (written.get("spec") or {}).get("training") or {}
                if training.get("family") in DPSGD_FAMILIES:
                    say(
                        f"skipping {manifest.relative_to(REPO)}: DP-SGD trains in the trainer "
                        "image (torch and Opacus, the Dockerfile's trainer target), which this "
                        "setup does not build"
                    )
                    continue
                document = example_overrides(env, written)
                model = document["spec"].get("model")
                if (
                    document["kind"] == "ConfidentialModel"
                    and model
                    and scenario.name.endswith("cvm")
                ):
                    # The example's digest is made up: here the real classifier is sealed.
                    name = document["metadata"]["name"]
                    uri, sha256 = env.seal_model(
                        document, classifier.onnx, f"models/{name}.onnx.sealed"
                    )
                    document["spec"]["model"] = {"uri": uri, "sha256": sha256}
                apply(env.cluster, document)
                applied.append(document)
    return applied


def infer(env: LocalEnvironment, model: dict[str, Any], sample: np.ndarray) -> dict[str, Any]:
    assert env.cluster.real_node is not None
    image = env.cluster.real_node.images["veil"].reference
    answer = infer_from_pod(
        env.cluster, image, CLIENTS_NS, "infer-client", model=model, sample=sample
    )
    if answer.get("status") != 200:
        raise RuntimeError(f"the inference request failed: {answer}")
    return answer


def settle(env: LocalEnvironment, applied: list[dict[str, Any]], timeout: float) -> None:
    """Wait until every example is Ready or Stalled (or the time is up)."""

    def settled() -> bool:
        for document in applied:
            live = get(
                env.cluster,
                document["kind"].lower(),
                document["metadata"]["name"],
                "-n",
                document["metadata"]["namespace"],
            )
            if not (
                condition(live, "Ready").get("status") == "True"
                or condition(live, "Stalled").get("status") == "True"
            ):
                return False
        return True

    try:
        wait_until("every example Ready or Stalled", settled, timeout=timeout, interval=3)
    except AssertionError as exc:
        say(str(exc))


def report(env: LocalEnvironment, applied: list[dict[str, Any]]) -> None:
    print(env.cluster.kubectl("get", ",".join(f"{kind}.veil.dev" for kind in KINDS), "-A"))
    for document in applied:
        kind, name = document["kind"], document["metadata"]["name"]
        ns = document["metadata"]["namespace"]
        ready = condition(get(env.cluster, kind.lower(), name, "-n", ns), "Ready")
        print(
            f"{kind} {ns}/{name}: Ready={ready.get('status')} ({ready.get('reason')}): "
            f"{ready.get('message', '')}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, default=REPO / ".cache" / "cluster")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    _down(args.dir)
    # A fresh cluster each time: the examples may have changed immutable fields.
    shutil.rmtree(args.dir, ignore_errors=True)
    say("starting the control plane and the real node")
    cluster = start_cluster(args.dir, real_node=True)
    env = LocalEnvironment(cluster, args.dir / "env")
    try:
        say("starting the Azure stand-ins and Azurite")
        env.start()
        assert cluster.real_node is not None
        say("installing the chart (the operator runs as a pod)")
        env.install_chart(cluster.real_node.images)
        env.workload_namespace(CLIENTS_NS)
        inputs = _inputs(env)
        classifier: demo.Classifier = inputs["classifier"]
        say("applying examples/ (sealed classifier and study tables in Azurite)")
        applied = apply_examples(env, classifier)
        settle(env, applied, args.timeout)
        report(env, applied)
        for document in applied:
            if document["kind"] == "ConfidentialModel" and "model" in document["spec"]:
                live = get(
                    cluster,
                    "confidentialmodel",
                    document["metadata"]["name"],
                    "-n",
                    document["metadata"]["namespace"],
                )
                if condition(live, "Ready").get("status") != "True":
                    continue
                answer = infer(env, document, classifier.sample[:1])
                outputs = {o["name"]: o["data"] for o in answer["body"]["outputs"]}
                print(
                    f"\ninference from {CLIENTS_NS} through the Service: "
                    f"label={outputs.get('label')} probabilities={outputs.get('probabilities')}"
                )
    except BaseException:
        env.stop()
        cluster.stop()
        raise
    # Leave everything running for `hack/down.sh`: every process has a pid file.
    env.processes.clear()
    cluster.processes.clear()
    cluster.real_node = None
    print(f"\nKUBECONFIG={cluster.kubeconfig}  kubectl: {cluster.bin_dir / 'kubectl'}")
    print(f"logs: {args.dir / 'logs'}   stop: hack/down.sh")
    return 0


if __name__ == "__main__":
    sys.exit(main())
