"""Veil's main job on this machine, on a cluster with a real node (see node.py): the local
Azure stand-ins and Azurite where pods can reach them, the chart installed from the locally
built image, and the examples' real inputs (a sealed model, a study table) in blob storage.

Pods reach the stand-ins on addresses of their own on `lo`, each on 443 as in Azure, so a
model's egress allow-list names them like any Azure range. The examples run as written except
where this machine differs from AKS, and `example_overrides` lists every such change.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster import node
from tests.cluster.localcluster import LocalCluster, stop_process

REPO = Path(__file__).resolve().parents[2]
CLUSTER_ARM_ID = "00000000-0000-0000-0000-000000000000/veil-rg/veil-aks"
CLOUD_SECRET = "veil-cloud"
TRUST_CONFIGMAP = "veil-trust"
OPERATOR_NAMESPACE = "veil-system"
RESTRICTED = {"pod-security.kubernetes.io/enforce": "restricted"}
# The examples' blob containers (az://veildemo/<container>/<blob>; the account is Azurite's).
CONTAINERS = ("models", "datasets", "synthetic")
AZURITE_ACCOUNT = "devstoreaccount1"
# Azurite's published development key (the same in every installation; not a secret).
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


class LocalEnvironmentError(RuntimeError):
    """A part of the local environment could not start; the message says which."""


def _wait_port(host: str, port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:]
            raise LocalEnvironmentError(f"{log.stem} exited {process.returncode}:\n{tail}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return
        time.sleep(0.2)
    raise LocalEnvironmentError(f"{log.stem} did not listen on {host}:{port} within 60s")


def _helper_bin(script: str) -> Path:
    completed = subprocess.run(
        ["bash", str(REPO / "hack" / script)], capture_output=True, text=True, check=False
    )
    if completed.returncode != 0:
        raise LocalEnvironmentError(f"hack/{script} failed:\n{completed.stderr[-3000:]}")
    return Path(completed.stdout.strip().splitlines()[-1])


@dataclass
class LocalEnvironment:
    cluster: LocalCluster
    directory: Path
    settings: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # --- services ---------------------------------------------------------------------------

    @property
    def vault_url(self) -> str:
        return f"https://{node.STANDIN_ADDRESSES['vault']}"

    @property
    def maa_url(self) -> str:
        return f"https://{node.STANDIN_ADDRESSES['maa']}"

    @property
    def blob_endpoint(self) -> str:
        return f"https://{node.STANDIN_ADDRESSES['blob']}/{AZURITE_ACCOUNT}"

    @property
    def ca_file(self) -> Path:
        return Path(self.settings["VEIL_AZURE_CA_BUNDLE"])

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=https;AccountName={AZURITE_ACCOUNT};"
            f"AccountKey={AZURITE_KEY};BlobEndpoint={self.blob_endpoint};"
        )

    def _spawn(self, name: str, command: list[str], env: Mapping[str, str] | None = None) -> Path:
        log = self.directory / f"{name}.log"
        process = subprocess.Popen(
            command,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        self.processes[name] = process
        (self.cluster.directory / "pids").mkdir(exist_ok=True)
        (self.cluster.directory / "pids" / name).write_text(str(process.pid))
        return log

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        azure_dir = self.directory / "azure"
        (azure_dir / "azure.env").unlink(missing_ok=True)
        addresses = node.STANDIN_ADDRESSES
        # The real node (started with the cluster, before this) provisioned its vTPM: MAA's
        # stand-in trusts it from its first request, before any model pod asks for a key.
        real_node = self.cluster.real_node
        guest_trust = [] if real_node is None else ["--guest-trust", str(real_node.guest_trust_dir)]
        log = self._spawn(
            "azure-standins",
            node.in_services_netns(
                [
                    sys.executable,
                    "-m",
                    "veil_standins",
                    "--dir",
                    str(azure_dir),
                    "--cluster",
                    CLUSTER_ARM_ID,
                    "--vault-address",
                    f"{addresses['vault']}:443",
                    "--maa-address",
                    f"{addresses['maa']}:443",
                    "--arm-address",
                    f"{addresses['arm']}:443",
                    "--extra-san",
                    addresses["blob"],
                    *guest_trust,
                ]
            ),
        )
        deadline = time.monotonic() + 60
        env_file = azure_dir / "azure.env"
        while not (env_file.exists() and env_file.stat().st_size):
            if self.processes["azure-standins"].poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-2000:]
                raise LocalEnvironmentError(f"the Azure stand-ins did not start:\n{tail}")
            time.sleep(0.1)
        for line in env_file.read_text().splitlines():
            key, _, value = line.partition("=")
            self.settings[key] = value
        self._start_azurite(azure_dir / "tls")

    def _start_azurite(self, tls_dir: Path) -> None:
        binary = _helper_bin("azurite.sh")
        workspace = self.directory / "azurite"
        workspace.mkdir(exist_ok=True)
        address = node.STANDIN_ADDRESSES["blob"]
        log = self._spawn(
            "azurite",
            node.in_services_netns(
                [
                    str(binary),
                    "--blobHost",
                    address,
                    "--blobPort",
                    "443",
                    "--location",
                    str(workspace),
                    "--cert",
                    str(tls_dir / "server.crt"),
                    "--key",
                    str(tls_dir / "server.key"),
                    "--silent",
                    "--skipApiVersionCheck",
                    "--disableTelemetry",
                    "--loose",
                ]
            ),
        )
        _wait_port(address, 443, self.processes["azurite"], log)
        service = self._blob_service()
        for container in CONTAINERS:
            service.create_container(container)

    def _blob_service(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(
            self.connection_string, connection_verify=str(self.ca_file)
        )

    def upload(self, path: str, data: bytes) -> str:
        """Store `data` at CONTAINER/BLOB; its az:// URI as the examples write them."""
        container, blob = path.split("/", 1)
        client = self._blob_service().get_blob_client(container, blob)
        client.upload_blob(data, overwrite=True)
        return f"az://veildemo/{path}"

    def download(self, path: str) -> bytes:
        container, blob = path.split("/", 1)
        client = self._blob_service().get_blob_client(container, blob)
        data: bytes = client.download_blob().readall()
        return data

    def stop(self) -> None:
        for name, process in reversed(list(self.processes.items())):
            stop_process(process, self.cluster.directory / "pids" / name, grace=10)
        self.processes.clear()

    # --- cluster objects --------------------------------------------------------------------

    def cloud_objects(self, namespace: str) -> None:
        """What Veil's pods in `namespace` need to use the stand-ins (see the chart's `cloud`)."""
        env = {
            "AZURE_STORAGE_CONNECTION_STRING": self.connection_string,
            "VEIL_AZURE_STATIC_TOKEN": self.settings["VEIL_AZURE_STATIC_TOKEN"],
            "VEIL_AZURE_ARM_ENDPOINT": self.settings["VEIL_AZURE_ARM_ENDPOINT"],
        }
        secret = {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": CLOUD_SECRET, "namespace": namespace},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in env.items()},
        }
        trust = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": TRUST_CONFIGMAP, "namespace": namespace},
            "data": {"ca.crt": self.ca_file.read_text()},
        }
        for document in (secret, trust):
            self.cluster.kubectl(
                "apply", "--server-side", "-f", "-", input_text=json.dumps(document)
            )

    def workload_namespace(self, name: str, labels: Mapping[str, str] | None = None) -> str:
        """A namespace under Pod Security `restricted` (enforced), with the cloud objects."""
        document = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": name, "labels": {**RESTRICTED, **(labels or {})}},
        }
        self.cluster.kubectl("apply", "-f", "-", input_text=json.dumps(document))
        self.cloud_objects(name)
        return name

    def install_chart(self, images: Mapping[str, node.Image]) -> None:
        helm = _helper_bin("build-tools.sh") / "helm"
        if self.cluster.real_node is None:
            raise LocalEnvironmentError("the chart's node agent needs the real node's vTPM")
        vtpm_tcti = self.cluster.real_node.vtpm_tcti
        self.workload_namespace(OPERATOR_NAMESPACE)
        # Images by digest only: the references are name@sha256:..., as ctr imported them.
        repository, digest = images["veil"].reference.split("@", 1)
        completed = subprocess.run(
            [
                str(helm),
                "upgrade",
                "--install",
                "veil",
                str(REPO / "charts" / "veil"),
                f"--kubeconfig={self.cluster.kubeconfig}",
                f"--namespace={OPERATOR_NAMESPACE}",
                "--wait",
                "--timeout=5m",
                "--set",
                f"image.repository={repository}",
                "--set",
                f"image.digest={digest}",
                "--set",
                "image.pullPolicy=Never",
                "--set",
                "replicaCount=1",
                "--set",
                f"runtime.keyReleaseImage={images['skr'].reference}",
                "--set",
                f"cloud.envFromSecret={CLOUD_SECRET}",
                "--set",
                f"cloud.trustBundleConfigMap={TRUST_CONFIGMAP}",
                # The node agent reaches the node's swtpm over TCP: no device, no privilege.
                # Literal: the TCTI's comma would split a --set value.
                "--set-literal",
                f"nodeAgent.tcti={vtpm_tcti}",
                "--set",
                "nodeAgent.privileged=false",
                # No IMDS here: the MAA stand-in serves the stand-in hardware's "VCEK".
                "--set",
                f"nodeAgent.imdsVcekUrl={self.maa_url}/metadata/THIM/amd/certification",
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if completed.returncode != 0:
            raise LocalEnvironmentError(
                f"helm install failed:\n{completed.stderr[-3000:]}{completed.stdout[-2000:]}"
            )

    # --- the examples -----------------------------------------------------------------------

    def seal_model(self, owner: Mapping[str, Any], onnx: bytes, blob: str) -> tuple[str, str]:
        """Create the model's release key as the operator would, seal `onnx` to it, upload;
        the sealed blob's URI and sha256."""
        from veil.api.confidential_model import ConfidentialModel
        from veil.azure.credentials import AzureSettings
        from veil.controllers.azure_ports import AzurePorts

        spec = ConfidentialModel.model_validate(owner).spec
        env = {**os.environ, **self.settings}
        key = AzurePorts(AzureSettings.from_env(env)).ensure_key(owner, spec)
        work = self.directory / "seal"
        work.mkdir(exist_ok=True)
        stem = blob.replace("/", "_")
        plain, sealed = work / f"{stem}.plain", work / f"{stem}.sealed"
        plain.write_bytes(onnx)
        sealed.unlink(missing_ok=True)
        completed = subprocess.run(
            [
                str(Path(sys.executable).parent / "veil"),
                "seal",
                str(plain),
                str(sealed),
                "--vault-url",
                spec.key_release.key_vault().vault_url,
                "--key-name",
                spec.key_release.key_vault().key_name,
                "--key-version",
                key.version,
            ],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        plain.unlink()
        if completed.returncode != 0:
            raise LocalEnvironmentError(f"veil seal failed: {completed.stderr.strip()}")
        data = sealed.read_bytes()
        return self.upload(blob, data), hashlib.sha256(data).hexdigest()


def example_overrides(env: LocalEnvironment, document: dict[str, Any]) -> dict[str, Any]:
    """An example as this machine runs it: the stand-ins' URLs for Azure's, one replica and
    smaller requests (two cores in all), the stand-ins' addresses for Azure's egress range,
    SEV-SNP for TDX (the attestation stand-in simulates an SEV-SNP VM), Azurite's address as
    the synthesis Job's storage range, and a discovery ε the small local study table can pass."""
    document = json.loads(json.dumps(document))
    spec = document.get("spec", {})
    release = spec.get("keyRelease")
    if release:
        release["vaultUrl"] = env.vault_url
        release["attestationAuthority"] = env.maa_url
    network = spec.get("network")
    if network and network.get("egressCidrs"):
        # Key Vault, attestation and blob storage; not the ARM stand-in (the pods never need it).
        network["egressCidrs"] = [
            f"{node.STANDIN_ADDRESSES[name]}/32" for name in ("vault", "maa", "blob")
        ]
    tee = spec.get("tee", {})
    if tee.get("isolation") == "confidentialVM" and tee.get("platform") == "tdx":
        # The SKR stand-in's attestation simulates an SEV-SNP confidential VM, so a TDX release
        # policy (rightly) refuses it: here the model asks for SEV-SNP, on a DCas pool.
        tee["platform"] = "sevsnp"
        if "nodePool" in tee:
            tee["nodePool"]["vmSize"] = "Standard_DC4as_v5"
    if document.get("kind") == "ConfidentialModel":
        serving = spec.setdefault("serving", {})
        serving["replicas"] = 1
        serving["resources"] = {
            "requests": {"cpu": "100m", "memory": "256Mi"},
            "limits": {"cpu": "1", "memory": "1Gi"},
        }
    if document.get("kind") == "SyntheticDataset":
        # The local study table has 442 rows: the example's discovery ε (0.05) puts its
        # threshold (1 + ln(1/2δ)/ε ≈ 310) above every clinic's count; 0.3 puts it at ≈ 52.
        if "discoveryEpsilon" in spec.get("synthesizer", {}):
            spec["synthesizer"]["discoveryEpsilon"] = 0.3
        # The Job's egress defaults to public addresses only; storage here is private.
        spec["storageCidrs"] = [f"{node.STANDIN_ADDRESSES['blob']}/32"]
        spec["resources"] = {
            "requests": {"cpu": "200m", "memory": "512Mi"},
            "limits": {"cpu": "2", "memory": "3Gi"},
        }
    return document


def load_yaml(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
