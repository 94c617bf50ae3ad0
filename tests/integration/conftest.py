"""Session fixtures: a real control plane, Veil's CRDs, and the operator as a process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from tests.cluster.localcluster import LocalCluster, free_port, running
from veil import API_GROUP, API_VERSION
from veil_standins.arm import ArmDouble
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.server import ServerThread
from veil_standins.tls import TlsFiles, make_tls

REPO = Path(__file__).resolve().parents[2]
TOKEN = "veil-integration-token"

PINNED_RUNTIME_IMAGE = "ghcr.io/veil-dev/veil@sha256:" + "5" * 64
PINNED_TRAINER_IMAGE = "ghcr.io/veil-dev/veil-trainer@sha256:" + "7" * 64


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running(tmp_path_factory.mktemp("cluster")) as local:
        yield local


@pytest.fixture(scope="session")
def api(cluster: LocalCluster) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(cluster.kubeconfig))


def install_crds(cluster: LocalCluster) -> LocalCluster:
    """Veil's CRDs from crds/, applied and Established (the fault tier's cluster uses it too)."""
    cluster.kubectl(
        "apply", "--server-side", "--field-manager=veil-tests", "-f", str(REPO / "crds")
    )
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "crd",
        "-l",
        "app.kubernetes.io/part-of=veil",
        "--timeout=60s",
    )
    return cluster


@pytest.fixture(scope="session")
def crds(cluster: LocalCluster) -> LocalCluster:
    return install_crds(cluster)


@dataclass(frozen=True)
class AzureDoubles:
    """Local HTTPS stand-ins of Key Vault and ARM (the Lowkey Vault app is not served here)."""

    key_vault: KeyVaultDouble
    arm: ArmDouble
    tls: TlsFiles

    def operator_env(self) -> dict[str, str]:
        return {
            "VEIL_AZURE_STATIC_TOKEN": TOKEN,
            "VEIL_AZURE_CA_BUNDLE": str(self.tls.ca_file),
            "VEIL_AZURE_ARM_ENDPOINT": self.arm.url,
        }


@pytest.fixture(scope="session")
def azure(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AzureDoubles]:
    tls = make_tls(tmp_path_factory.mktemp("azure-tls"))
    key_vault, arm = KeyVaultDouble(token=TOKEN), ArmDouble(token=TOKEN)
    kv_server = ServerThread(key_vault.app(), tls.server_context()).start()
    arm_server = ServerThread(arm.app(), tls.server_context()).start()
    key_vault.url, arm.url = kv_server.url, arm_server.url
    try:
        yield AzureDoubles(key_vault, arm, tls)
    finally:
        kv_server.stop()
        arm_server.stop()


# Everywhere but the namespaces of tests that run an operator of their own: the chart's (with
# the chart's RBAC), the one killed mid-burst, and the two sharded ones. One pattern: kopf
# matches each --namespace on its own, so a separate "*" would undo the exclusions.
SESSION_NAMESPACES = "*,!veil-chart-*,!veil-crash-*,!veil-shard-*"


class OperatorProcess:
    def __init__(
        self,
        cluster: LocalCluster,
        log_path: Path,
        kubeconfig: Path,
        extra_env: dict[str, str],
        *,
        namespaces: str = SESSION_NAMESPACES,
        args: list[str] | None = None,
    ) -> None:
        """`veil run` on `namespaces`, or `veil ARGS` (e.g. a chart Deployment's); either way
        on free metrics and health ports."""
        self.metrics_port = free_port()
        self.health_port = free_port()
        ports = {"--metrics-port": self.metrics_port, "--health-port": self.health_port}
        base = args if args is not None else ["run", "--standalone", f"--namespace={namespaces}"]
        argv = [a for a in base if a.split("=")[0] not in ports]
        argv += [f"{flag}={port}" for flag, port in ports.items()]
        self.log_path = log_path
        env = {
            **os.environ,
            # The operator refuses images by tag; kwok's pods pull nothing, so any digest does.
            "VEIL_RUNTIME_IMAGE": PINNED_RUNTIME_IMAGE,
            "VEIL_TRAINER_IMAGE": PINNED_TRAINER_IMAGE,
            **extra_env,
            "KUBECONFIG": str(kubeconfig),
            # Resync often, so tests see that a resync of a settled object writes nothing.
            "VEIL_RESYNC_SECONDS": "3",
        }
        self.process = subprocess.Popen(
            [sys.executable, "-m", "veil.cli", *argv],
            env=env,
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            body: bytes = response.read()
            return body.decode()

    def metrics(self) -> str:
        return self.get("/metrics", self.metrics_port)

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"operator exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                self.get("/healthz", self.health_port)
                return
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"operator not healthy:\n{self.log_path.read_text()[-4000:]}")

    def kill(self) -> None:
        """SIGKILL: no shutdown handlers, as when a node dies or the OOM killer strikes."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


OPERATOR_USER = "veil-operator"


@pytest.fixture(scope="session")
def operator(
    crds: LocalCluster, azure: AzureDoubles, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator as its own user, so the audit log shows exactly what it did."""
    kubeconfig = crds.user_kubeconfig(OPERATOR_USER, "veil:operators")
    crds.kubectl(
        "create",
        "clusterrolebinding",
        "veil-operator-tests",
        "--clusterrole=cluster-admin",
        f"--user={OPERATOR_USER}",
    )
    running_operator = OperatorProcess(
        crds, tmp_path_factory.mktemp("operator") / "veil.log", kubeconfig, azure.operator_env()
    )
    try:
        running_operator.wait_healthy()
        yield running_operator
    finally:
        running_operator.stop()


def wait_for(predicate: Any, timeout: float = 30, interval: float = 0.3, what: str = "") -> Any:
    """Poll until `predicate()` returns something truthy; fail with `what` otherwise."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def run_veil(args: list[str], extra_env: dict[str, str] | None = None) -> str:
    """Run `veil ARGS` here as a Job's pod would; fail the test with its stderr if it fails."""
    ran = subprocess.run(
        [sys.executable, "-m", "veil.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, **(extra_env or {})},
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    return ran.stdout


def run_operator_code(
    kubeconfig: Path, program: str, given: Any, extra_env: dict[str, str] | None = None
) -> Any:
    """Run `program` (Python, the operator's own modules) in a process of its own against the
    cluster, `given` as JSON on its stdin; its last stdout line, read as JSON.

    For a reconcile pass the operator could make with what a watch event once carried: the
    operator process itself runs only with what the API server sends it.
    """
    ran = subprocess.run(
        [sys.executable, "-c", program],
        input=json.dumps(given),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={
            **os.environ,
            "VEIL_RUNTIME_IMAGE": PINNED_RUNTIME_IMAGE,
            "VEIL_TRAINER_IMAGE": PINNED_TRAINER_IMAGE,
            **(extra_env or {}),
            "KUBECONFIG": str(kubeconfig),
        },
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    return json.loads(ran.stdout.strip().splitlines()[-1])


def restricted_namespace(cluster: LocalCluster, name: str) -> None:
    """A namespace that enforces Pod Security `restricted`, as Veil's own pods must pass."""
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "pod-security.kubernetes.io/enforce=restricted")


def create_budget(
    objects: client.CustomObjectsApi,
    namespace: str,
    name: str,
    epsilon: float,
    dataset_uri: str | None = None,
) -> None:
    """A PrivacyBudget at (ε, 1e-5) over the dataset at `dataset_uri`, the only one it pays
    for (default: a dataset of its own, since one budget protects a dataset)."""
    dataset_uri = dataset_uri or f"file:///data/{namespace}/{name}.csv"
    objects.create_namespaced_custom_object(
        API_GROUP,
        API_VERSION,
        namespace,
        "privacybudgets",
        {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": "PrivacyBudget",
            "metadata": {"name": name},
            "spec": {
                "dataset": {"name": "breast-cancer", "uri": dataset_uri},
                "epsilon": epsilon,
                "delta": 1e-5,
            },
        },
    )


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    """The condition of `type_` in obj's status, or {}."""
    return next(
        (c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {}
    )


def wait_for_condition(
    fetch: Callable[[], dict[str, Any]], type_: str, status: str, timeout: float = 60
) -> dict[str, Any]:
    """Poll `fetch()` until its `type_` condition has `status`; return that object."""

    def reached() -> dict[str, Any] | None:
        obj = fetch()
        return obj if condition(obj, type_).get("status") == status else None

    found: dict[str, Any] = wait_for(reached, timeout=timeout, what=f"{type_} {status}")
    return found
