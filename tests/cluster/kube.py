"""Small helpers over kubectl for the real-node tier and the main job: apply, get, wait,
and one-shot pods that Pod Security `restricted` admits."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from typing import Any

from tests.cluster.localcluster import LocalCluster


def get(cluster: LocalCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json"))


def apply(cluster: LocalCluster, document: dict[str, Any]) -> None:
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input_text=json.dumps(document)
    )


def wait_until(
    what: str, check: Callable[[], Any], timeout: float = 180, interval: float = 1
) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def condition(document: dict[str, Any], kind: str) -> dict[str, Any]:
    for item in document.get("status", {}).get("conditions", []):
        if item["type"] == kind:
            return dict(item)
    return {}


def restricted_pod(name: str, ns: str, image: str, command: list[str]) -> dict[str, Any]:
    """A one-shot pod that Pod Security `restricted` admits, pinned to the real node."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 65532,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "main",
                    "image": image,
                    "imagePullPolicy": "Never",
                    "command": command,
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "readOnlyRootFilesystem": True,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def run_pod(cluster: LocalCluster, pod: dict[str, Any], timeout: float = 120) -> tuple[str, str]:
    """Run a one-shot pod to completion: (phase, logs). The pod is deleted afterwards."""
    name, ns = pod["metadata"]["name"], pod["metadata"]["namespace"]
    cluster.kubectl("delete", "pod", name, "-n", ns, "--ignore-not-found", "--wait=true")
    apply(cluster, pod)

    def finished() -> str | None:
        phase = get(cluster, "pod", name, "-n", ns)["status"].get("phase")
        return phase if phase in ("Succeeded", "Failed") else None

    try:
        phase = wait_until(f"pod {ns}/{name} to finish", finished, timeout)
        logs = cluster.kubectl("logs", name, "-n", ns, check=False)
        return str(phase), logs
    finally:
        cluster.kubectl("delete", "pod", name, "-n", ns, "--wait=false", check=False)


def exec_in(cluster: LocalCluster, ns: str, pod: str, container: str, code: str) -> str:
    completed = subprocess.run(
        [
            str(cluster.bin_dir / "kubectl"),
            f"--kubeconfig={cluster.kubeconfig}",
            "exec",
            "-n",
            ns,
            pod,
            "-c",
            container,
            "--",
            "python",
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if completed.returncode != 0:
        raise AssertionError(f"exec in {ns}/{pod}: {completed.stderr.strip()}")
    return completed.stdout


# TCP connection attempts from inside a pod. Targets before "--" are retried for PATIENCE
# seconds (a new pod's NetworkPolicy allowances take a few seconds to reach kube-router's
# rules); targets after it are tried once, after those: a denial is judged on a settled rule
# set, not on every instant of kube-router's periodic resync. Prints {target: "open" | the
# error} as one line of JSON.
CONNECT = """
import json, socket, sys, time
PATIENCE = 25
args = sys.argv[1:]
split = args.index("--") if "--" in args else len(args)
retried, once = args[:split], args[split + 1:]
def attempt(target):
    host, port = target.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        return "open"
    except OSError as error:
        return type(error).__name__ + ": " + str(error)
results = {target: "untried" for target in retried}
deadline = time.monotonic() + PATIENCE
while True:
    for target, seen in results.items():
        if seen != "open":
            results[target] = attempt(target)
    if all(seen == "open" for seen in results.values()) or time.monotonic() > deadline:
        break
    time.sleep(1)
for target in once:
    results[target] = attempt(target)
print(json.dumps(results))
"""


# One OIP request from inside a pod, retried while the connection is refused: a new pod's
# NetworkPolicy allowance takes a few seconds to reach kube-router's rules.
INFER = """
import json, sys, time, urllib.error, urllib.request
url, body = sys.argv[1], sys.argv[2].encode()
headers = {"Content-Type": "application/json"}
deadline = time.monotonic() + 30
while True:
    try:
        request = urllib.request.Request(url, data=body, headers=headers)
        with urllib.request.urlopen(request, timeout=20) as response:
            print(json.dumps({"status": response.status, "body": json.loads(response.read())}))
        break
    except urllib.error.URLError as error:
        if not isinstance(error.reason, ConnectionRefusedError) or time.monotonic() > deadline:
            raise
        time.sleep(1)
"""

# The caller's side of the encrypted channel: veil.client fetches the runtime's evidence,
# verifies it against the ConfidentialModel's own expectations (its attestation authority,
# isolation, claims), then sends the request encrypted to the attested key.
INFER_ENCRYPTED = """
import json, sys, time
from veil.client import Client, Expectations, InferenceError, RefusedError
url, model, body = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
expectations = Expectations.from_confidential_model(model)
deadline = time.monotonic() + 30
while True:
    client = Client(url, model["metadata"]["name"], expectations)
    try:
        client.verify()
        answer = {"status": 200, "body": client.infer(body)}
    except InferenceError as error:
        answer = {"status": error.status, "body": str(error)}
    except RefusedError as refused:  # unreachable yet (the Service's endpoints): retried
        if refused.check != "evidence" or time.monotonic() > deadline:
            raise
        time.sleep(1)
        continue
    finally:
        client.close()
    print(json.dumps(answer))
    break
"""


def _channel(model: dict[str, Any]) -> str:
    """The model's serving channel as the operator resolves it (see Serving.channel_for)."""
    spec = model["spec"]
    channel = spec.get("serving", {}).get("channel")
    if channel is None:
        channel = "plaintext" if spec["tee"]["isolation"] == "coco" else "encrypted"
    return str(channel)


def _trusting(pod: dict[str, Any], configmap: str) -> dict[str, Any]:
    """`pod` trusting the CAs of `configmap` (the stand-ins' HTTPS) as the model pods do."""
    pod["spec"]["volumes"] = [{"name": "trust", "configMap": {"name": configmap}}]
    container = pod["spec"]["containers"][0]
    container["volumeMounts"] = [{"name": "trust", "mountPath": "/etc/veil/trust"}]
    container["env"] = [{"name": "SSL_CERT_FILE", "value": "/etc/veil/trust/ca.crt"}]
    return pod


def infer_from_pod(
    cluster: LocalCluster,
    image: str,
    ns: str,
    pod_name: str,
    *,
    model: dict[str, Any],
    sample: Any,
    trust_configmap: str = "veil-trust",
) -> dict[str, Any]:
    """An OIP infer request for `sample` (a float32 array, the model's input "X") sent from a
    one-shot pod in `ns` to the model's Service: {"status", "body"}. To a model whose channel
    is encrypted, the request goes through veil.client (verified, then encrypted); the pod
    trusts `trust_configmap`'s CAs for the attestation authority's HTTPS."""
    name, model_ns = model["metadata"]["name"], model["metadata"]["namespace"]
    port = model["spec"].get("serving", {}).get("port", 8000)
    url = f"http://{name}.{model_ns}.svc.cluster.local:{port}/v2/models/{name}/infer"
    body = {
        "inputs": [
            {
                "name": "X",
                "shape": list(sample.shape),
                "datatype": "FP32",
                "data": sample.flatten().tolist(),
            }
        ]
    }
    if _channel(model) == "encrypted":
        base = f"http://{name}.{model_ns}.svc.cluster.local:{port}"
        command = ["python", "-c", INFER_ENCRYPTED, base, json.dumps(model), json.dumps(body)]
        pod = _trusting(restricted_pod(pod_name, ns, image, command), trust_configmap)
    else:
        pod = restricted_pod(pod_name, ns, image, ["python", "-c", INFER, url, json.dumps(body)])
    phase, logs = run_pod(cluster, pod)
    if phase != "Succeeded":
        raise AssertionError(f"the inference pod failed:\n{logs}")
    return dict(json.loads(logs.strip().splitlines()[-1]))
