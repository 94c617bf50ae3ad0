"""Veil on real pods: the chart's operator as a pod, a ConfidentialModel that fetches, releases
(through the node agent, which attests the node's vTPM), unseals and serves, NetworkPolicy
enforced both ways, Pod Security `restricted` enforced, a SyntheticDataset Job that really
runs, and a killed model pod that comes back.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.cluster import demo, node
from tests.cluster.kube import (
    CONNECT,
    apply,
    condition,
    exec_in,
    get,
    infer_from_pod,
    restricted_pod,
    run_pod,
    wait_until,
)
from tests.cluster.localenv import (
    OPERATOR_NAMESPACE,
    LocalEnvironment,
    example_overrides,
    load_yaml,
)
from tests.e2e.conftest import repo_path
from tests.faults.results import record

MODEL_NS, CLIENTS_NS, OUTSIDERS_NS, SYNTH_NS = (
    "veil-cvm",
    "clinical-apps",
    "outsiders",
    "veil-synth",
)
MODEL = "cancer-classifier"


@pytest.fixture(scope="module")
def classifier() -> demo.Classifier:
    return demo.breast_cancer_classifier()


@pytest.fixture(scope="module")
def served_model(environment: LocalEnvironment, classifier: demo.Classifier) -> dict[str, Any]:
    environment.workload_namespace(MODEL_NS)
    environment.workload_namespace(CLIENTS_NS)
    environment.workload_namespace(OUTSIDERS_NS)
    [document] = load_yaml(repo_path("examples", "confidential-model-cvm", "model.yaml"))
    document = example_overrides(environment, document)
    uri, sha256 = environment.seal_model(document, classifier.onnx, f"models/{MODEL}.onnx.sealed")
    document["spec"]["model"] = {"uri": uri, "sha256": sha256}
    apply(environment.cluster, document)

    def ready() -> dict[str, Any] | None:
        model = get(environment.cluster, "confidentialmodel", MODEL, "-n", MODEL_NS)
        return model if condition(model, "Ready").get("status") == "True" else None

    return dict(wait_until(f"ConfidentialModel {MODEL} Ready", ready, timeout=300))


def _veil_image(env: LocalEnvironment) -> str:
    assert env.cluster.real_node is not None
    return env.cluster.real_node.images["veil"].reference


def _model_pods(env: LocalEnvironment) -> list[dict[str, Any]]:
    pods = get(env.cluster, "pods", "-n", MODEL_NS, "-l", f"app.kubernetes.io/instance={MODEL}")
    return list(pods["items"])


def _infer(env: LocalEnvironment, ns: str, sample: np.ndarray, name: str) -> dict[str, Any]:
    model = get(env.cluster, "confidentialmodel", MODEL, "-n", MODEL_NS)
    return infer_from_pod(env.cluster, _veil_image(env), ns, name, model=model, sample=sample)


def _outputs(answer: dict[str, Any]) -> dict[str, np.ndarray]:
    assert answer["status"] == 200, answer
    return {
        output["name"]: np.array(output["data"]).reshape(output["shape"])
        for output in answer["body"]["outputs"]
    }


def test_the_chart_operator_runs_as_a_pod_on_the_real_node(environment: LocalEnvironment) -> None:
    def chart_pods() -> dict[str, list[dict[str, Any]]]:
        pods = get(environment.cluster, "pods", "-n", OPERATOR_NAMESPACE)["items"]
        by_component: dict[str, list[dict[str, Any]]] = {}
        for pod in pods:
            labels = pod["metadata"]["labels"]
            if labels.get("app.kubernetes.io/name") == "veil":
                component = labels.get("app.kubernetes.io/component", "")
                by_component.setdefault(component, []).append(pod)
        return by_component

    def all_ready() -> dict[str, list[dict[str, Any]]] | None:
        # helm --wait lets a DaemonSet be one pod short, and the node agent's readiness probe
        # runs every 10 s: its pod may start unready.
        by_component = chart_pods()
        pods = [pod for group in by_component.values() for pod in group]
        statuses = [s for pod in pods for s in pod["status"].get("containerStatuses", [])]
        return by_component if statuses and all(s["ready"] for s in statuses) else None

    by_component = wait_until("the chart's pods ready", all_ready, timeout=120)
    assert by_component.keys() == {"operator", "node-agent"}, by_component.keys()
    for pod in (pod for group in by_component.values() for pod in group):
        assert pod["spec"]["nodeName"] == node.NODE_NAME


def test_the_node_drops_older_builds_images_and_keeps_the_ones_in_use(
    environment: LocalEnvironment, tmp_path: Path
) -> None:
    """Each build is a new image of over a gigabyte and the node's image store outlives
    clusters: an older build must go, under every name, and the images in use must stay."""
    real_node = environment.cluster.real_node
    assert real_node is not None
    in_use = real_node.images_in_store()
    older = f"{node.LOCAL_IMAGES}veil:an-older-build"
    digest = _write_oci_archive(tmp_path / "older.oci.tar", older)
    real_node.import_image(tmp_path / "older.oci.tar")
    assert real_node.images_in_store()[older] == digest

    removed = real_node.remove_superseded_images()
    store = real_node.images_in_store()
    assert older in removed
    assert digest not in store.values(), [name for name, d in store.items() if d == digest]
    assert set(in_use) <= set(store), set(in_use) - set(store)


def _write_oci_archive(path: Path, name: str) -> str:
    """A one-layer image as an OCI archive named `name`; returns its manifest's digest."""
    blobs: dict[str, bytes] = {}

    def blob(data: bytes, media_type: str) -> dict[str, Any]:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        blobs[digest] = data
        return {"mediaType": media_type, "digest": digest, "size": len(data)}

    layer_bytes = io.BytesIO()
    with tarfile.open(fileobj=layer_bytes, mode="w") as layer_tar:
        content = f"an older build of {name}\n".encode()
        info = tarfile.TarInfo("build.txt")
        info.size = len(content)
        layer_tar.addfile(info, io.BytesIO(content))
    layer = blob(layer_bytes.getvalue(), "application/vnd.oci.image.layer.v1.tar")
    config = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer["digest"]]},
        "config": {},
    }
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": blob(json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json"),
        "layers": [layer],
    }
    manifest_descriptor = blob(json.dumps(manifest).encode(), manifest["mediaType"])
    index = {
        "schemaVersion": 2,
        "manifests": [
            {**manifest_descriptor, "annotations": {"org.opencontainers.image.ref.name": name}}
        ],
    }
    files = {
        "oci-layout": b'{"imageLayoutVersion":"1.0.0"}',
        "index.json": json.dumps(index).encode(),
        **{f"blobs/sha256/{d.removeprefix('sha256:')}": data for d, data in blobs.items()},
    }
    with tarfile.open(path, "w") as archive:
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return str(manifest_descriptor["digest"])


def test_model_is_fetched_released_unsealed_and_answers_like_onnxruntime(
    environment: LocalEnvironment, served_model: dict[str, Any], classifier: demo.Classifier
) -> None:
    import onnxruntime

    assert condition(served_model, "KeyReleased").get("status") == "True", served_model["status"]
    pods = _model_pods(environment)
    assert pods
    assert all(p["spec"]["nodeName"] == node.NODE_NAME for p in pods)
    session = onnxruntime.InferenceSession(classifier.onnx, providers=["CPUExecutionProvider"])
    expected_label, expected_probabilities = session.run(None, {"X": classifier.sample})
    served = _outputs(_infer(environment, CLIENTS_NS, classifier.sample, "allowed-client"))
    assert served["label"].tolist() == expected_label.tolist()
    np.testing.assert_allclose(served["probabilities"], expected_probabilities, rtol=1e-6)


def test_network_policy_lets_in_only_allow_from_and_out_only_to_the_egress_list(
    environment: LocalEnvironment, served_model: dict[str, Any], classifier: demo.Classifier
) -> None:
    cluster = environment.cluster
    service = f"{MODEL}.{MODEL_NS}.svc.cluster.local:8000"
    image = _veil_image(environment)
    addresses = node.STANDIN_ADDRESSES
    allowed = [f"{addresses['vault']}:443", f"{addresses['blob']}:443"]
    # Not in the model's list: the ARM stand-in (forwarded, like any Azure host) and the
    # operator pod's metrics port (bridged pod to pod).
    [operator_pod] = get(
        cluster, "pods", "-n", OPERATOR_NAMESPACE, "-l", "app.kubernetes.io/component=operator"
    )["items"][:1]
    denied = [f"{addresses['arm']}:443", f"{operator_pod['status']['podIP']}:8080"]
    seen: dict[str, Any] = {}
    for ns in (CLIENTS_NS, OUTSIDERS_NS):
        command = ["python", "-c", CONNECT, service, "--", *denied]
        phase, logs = run_pod(cluster, restricted_pod(f"probe-{ns}", ns, image, command))
        assert phase == "Succeeded", logs
        seen[ns] = json.loads(logs.strip().splitlines()[-1])
    assert seen[CLIENTS_NS][service] == "open", seen
    # kube-router rejects what no policy allows (ICMP port unreachable): refused throughout the
    # probe's patience, while the allowed namespace's probe got through to the same server.
    assert seen[OUTSIDERS_NS][service].startswith("ConnectionRefusedError"), seen
    # The controls for egress below: what the model may not reach is up and answers others.
    for target in denied:
        assert seen[OUTSIDERS_NS][target] == "open", seen

    [model_pod] = _model_pods(environment)[:1]
    answer = json.loads(
        exec_in(
            cluster,
            MODEL_NS,
            model_pod["metadata"]["name"],
            "runtime",
            CONNECT.replace("sys.argv[1:]", repr([*allowed, "--", *denied])),
        )
    )
    seen["egress"] = answer
    for target in allowed:
        assert answer[target] == "open", answer
    for target in denied:
        assert answer[target] != "open", answer
    print("NetworkPolicy probes:", json.dumps(seen, indent=2))


# A pod that asks the node agent for a key with its own, genuine, projected token.
ASK_THE_AGENT = """
import asyncio, json, sys
from pathlib import Path
from veil.runtime.key_release import KeyReleaseError, RetryPolicy
from veil.runtime.node_agent_client import NodeAgentClient, NodeAgentTarget
agent, vault, key, version, maa = sys.argv[1:6]
token = Path("/var/run/secrets/veil/node-agent/token")
client = NodeAgentClient(agent, token, retry=RetryPolicy(attempts=1))
try:
    asyncio.run(client.release(NodeAgentTarget(vault, key, version, maa)))
    print(json.dumps({"released": True}))
except KeyReleaseError as exc:
    print(json.dumps({"released": False, "error": str(exc)}))
"""


def test_the_node_agent_gives_the_key_to_the_models_pods_only(
    environment: LocalEnvironment, served_model: dict[str, Any]
) -> None:
    """The model's pods released their key through the agent (no SKR sidecar in them); a pod of
    another namespace with a genuine token for the agent's audience asks for the same key version
    and is refused."""
    [model_pod] = _model_pods(environment)[:1]
    assert [c["name"] for c in model_pod["spec"]["initContainers"]] == ["fetch-sealed-model"]
    release = served_model["spec"]["keyRelease"]
    version = served_model["status"]["keyVersion"]
    agent = "http://veil-node-agent.veil-system.svc:8095"
    command = ["python", "-c", ASK_THE_AGENT, agent, release["vaultUrl"], release["keyName"]]
    pod = restricted_pod("key-thief", OUTSIDERS_NS, _veil_image(environment), command)
    pod["spec"]["containers"][0]["args"] = [version, release["attestationAuthority"]]
    pod["spec"]["volumes"] = [
        {
            "name": "token",
            "projected": {
                "sources": [
                    {"serviceAccountToken": {"audience": "veil-node-agent", "path": "token"}}
                ]
            },
        }
    ]
    pod["spec"]["containers"][0]["volumeMounts"] = [
        {"name": "token", "mountPath": "/var/run/secrets/veil/node-agent", "readOnly": True}
    ]
    phase, logs = run_pod(environment.cluster, pod)
    assert phase == "Succeeded", logs
    answer = json.loads(logs.strip().splitlines()[-1])
    assert answer["released"] is False, answer
    assert "HTTP 403" in answer["error"], answer


def test_every_pod_veil_creates_is_admitted_by_restricted_and_others_are_not(
    environment: LocalEnvironment, served_model: dict[str, Any]
) -> None:
    cluster = environment.cluster
    for ns in (OPERATOR_NAMESPACE, MODEL_NS):
        labels = get(cluster, "namespace", ns)["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert _model_pods(environment)
    # The control: the same namespace refuses a pod that restricted does not allow.
    intruder = restricted_pod("intruder", MODEL_NS, _veil_image(environment), ["true"])
    intruder["spec"]["containers"][0]["securityContext"] = {"privileged": True}
    with pytest.raises(Exception, match="violates PodSecurity"):
        cluster.kubectl("apply", "-f", "-", input_text=json.dumps(intruder))


def test_synthetic_dataset_job_runs_for_real_and_its_output_lands(
    environment: LocalEnvironment, tmp_path_factory: pytest.TempPathFactory
) -> None:
    cluster = environment.cluster
    environment.workload_namespace(SYNTH_NS)
    source = demo.diabetes_study_csv(tmp_path_factory.mktemp("study") / "diabetes.csv")
    environment.upload("datasets/diabetes.csv", source.read_bytes())
    documents = [
        example_overrides(environment, d)
        for name in ("budget.yaml", "synthetic.yaml")
        for d in load_yaml(repo_path("examples", "synthetic-data", name))
    ]
    for document in documents:
        apply(cluster, document)

    def done() -> dict[str, Any] | None:
        synthetic = get(cluster, "syntheticdataset", "diabetes-synthetic", "-n", SYNTH_NS)
        ready = condition(synthetic, "Ready")
        stalled = condition(synthetic, "Stalled")
        assert stalled.get("status") != "True", synthetic["status"]
        return synthetic if ready.get("status") == "True" else None

    synthetic = wait_until("SyntheticDataset Ready", done, timeout=420, interval=3)
    job = get(cluster, "job", synthetic["status"]["jobName"], "-n", SYNTH_NS)
    [pod] = get(cluster, "pods", "-n", SYNTH_NS, "-l", f"job-name={job['metadata']['name']}")[
        "items"
    ]
    assert pod["spec"]["nodeName"] == node.NODE_NAME
    assert pod["status"]["phase"] == "Succeeded"
    output = pd.read_csv(io.BytesIO(environment.download("synthetic/diabetes-mst-eps1.csv")))
    assert len(output) == 5000
    assert list(output.columns) == ["age", "sex", "bmi", "glucose", "clinic", "outcome"]
    assert set(output["sex"].dropna()) <= {"female", "male"}
    budget = get(cluster, "privacybudget", "diabetes-study", "-n", SYNTH_NS)
    # The run was paid for: ε 1 at δ 1e-6 (discovery, bounds and report parts included),
    # which the budget's PLD accountant states at its own δ as at most 1.
    assert 0.5 < budget["status"]["epsilonSpent"] <= 1.0 + 1e-9, budget["status"]


def test_a_killed_model_pod_comes_back_and_serves_again(
    environment: LocalEnvironment, served_model: dict[str, Any], classifier: demo.Classifier
) -> None:
    cluster = environment.cluster
    [before] = _model_pods(environment)
    cluster.kubectl(
        "delete", "pod", before["metadata"]["name"], "-n", MODEL_NS, "--grace-period=0", "--force"
    )

    def replaced_and_ready() -> bool:
        pods = _model_pods(environment)
        return any(
            p["metadata"]["uid"] != before["metadata"]["uid"]
            and p.get("metadata", {}).get("deletionTimestamp") is None
            and all(s["ready"] for s in p["status"].get("containerStatuses", [{"ready": False}]))
            for p in pods
        )

    wait_until("a new model pod Ready", replaced_and_ready, timeout=240)
    served = _outputs(_infer(environment, CLIENTS_NS, classifier.sample, "client-after-kill"))
    assert served["label"].shape[0] == classifier.sample.shape[0]


def _running_containers(pod: dict[str, Any]) -> dict[str, str] | None:
    """Container ids by name once every container of `pod` is ready, else None."""
    statuses = pod.get("status", {}).get("containerStatuses") or []
    if not statuses or not all(s["ready"] for s in statuses):
        return None
    return {s["name"]: s["containerID"] for s in statuses}


def _files_holding(root: Path, needles: dict[str, bytes]) -> dict[str, list[str]]:
    """Which regular files under `root` contain each needle (the node's disk, as a host sees it)."""
    found: dict[str, list[str]] = {name: [] for name in needles}
    for path in root.rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        for name, needle in needles.items():
            if needle in data:
                found[name].append(str(path))
    return found


@pytest.mark.faults
def test_after_a_node_restart_the_model_re_attests_and_serves_with_no_key_on_disk(
    environment: LocalEnvironment, served_model: dict[str, Any], classifier: demo.Classifier
) -> None:
    """Issue 19, scenario 6: the node's kubelet and containerd restart and every container dies,
    as in a reboot. The model pod must serve again only after the node agent attested the node
    anew and released the key to the new container: nothing of the key or the model's plaintext
    was kept on the node's disk to start from."""
    cluster = environment.cluster
    real_node = cluster.real_node
    assert real_node is not None
    agents = "app.kubernetes.io/component=node-agent"
    [model_before] = _model_pods(environment)
    [agent_before] = get(cluster, "pods", "-n", OPERATOR_NAMESPACE, "-l", agents)["items"]
    containers_before = {
        **(_running_containers(model_before) or {}),
        **(_running_containers(agent_before) or {}),
    }
    assert len(containers_before) >= 2, containers_before

    started = time.monotonic()
    real_node.restart()

    def back() -> tuple[dict[str, Any], dict[str, Any]] | None:
        models = _model_pods(environment)
        agents_now = get(cluster, "pods", "-n", OPERATOR_NAMESPACE, "-l", agents)["items"]
        if len(models) != 1 or len(agents_now) != 1:
            return None
        [model], [agent] = models, agents_now
        running = {**(_running_containers(model) or {}), **(_running_containers(agent) or {})}
        if len(running) < len(containers_before):
            return None
        if set(running.values()) & set(containers_before.values()):
            return None  # a container from before the restart still reported
        return model, agent

    model, agent = wait_until("the model and node agent pods running anew", back, timeout=300)
    served = _outputs(_infer(environment, CLIENTS_NS, classifier.sample, "client-after-restart"))
    recovery_seconds = time.monotonic() - started
    assert model["metadata"]["uid"] == model_before["metadata"]["uid"]  # the same pod, rebooted
    import onnxruntime

    session = onnxruntime.InferenceSession(classifier.onnx, providers=["CPUExecutionProvider"])
    expected_label, _ = session.run(None, {"X": classifier.sample})
    assert served["label"].tolist() == expected_label.tolist()

    # The new containers' own logs: the agent attested the node again and released the key to
    # this pod; the runtime started from that release, not from anything kept.
    model_name = model["metadata"]["name"]
    agent_log = cluster.kubectl("logs", agent["metadata"]["name"], "-n", OPERATOR_NAMESPACE)
    runtime_log = cluster.kubectl("logs", model_name, "-n", MODEL_NS, "-c", "runtime")
    assert "node attested by" in agent_log, agent_log[-2000:]
    assert f"released to pod {MODEL_NS}/{model_name}" in agent_log, agent_log[-2000:]
    assert "released by the node agent" in runtime_log, runtime_log[-2000:]

    # The host reads the node's disk: the sealed model is there (the emptyDir a reboot keeps),
    # the model's plaintext is not anywhere under the kubelet's root.
    sealed = environment.download(f"models/{MODEL}.onnx.sealed")
    middle = len(classifier.onnx) // 2
    found = _files_holding(
        real_node.directory / "kubelet",
        {"sealed": sealed[-256:], "plaintext": classifier.onnx[middle : middle + 256]},
    )
    assert found["sealed"], "the scan did not reach the model pod's sealed-model volume"
    assert found["plaintext"] == [], found["plaintext"]
    record(
        "node_restart_model_pod",
        checked="kubelet and containerd restarted, every container killed; the model pod "
        "served again after the node agent re-attested and re-released the key; no plaintext "
        "model on the node's disk",
        recovery_seconds=round(recovery_seconds, 1),
    )
