"""Session fixtures: a real control plane, Veil's CRDs, and the operator as a process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from tests.cluster.localcluster import LocalCluster, free_port, running

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    with running(tmp_path_factory.mktemp("cluster")) as local:
        yield local


@pytest.fixture(scope="session")
def api(cluster: LocalCluster) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(cluster.kubeconfig))


@pytest.fixture(scope="session")
def crds(cluster: LocalCluster) -> LocalCluster:
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


class OperatorProcess:
    def __init__(self, cluster: LocalCluster, log_path: Path, kubeconfig: Path) -> None:
        self.metrics_port = free_port()
        self.health_port = free_port()
        self.log_path = log_path
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "veil.cli",
                "run",
                "--standalone",
                f"--metrics-port={self.metrics_port}",
                f"--health-port={self.health_port}",
            ],
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
    crds: LocalCluster, tmp_path_factory: pytest.TempPathFactory
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
        crds, tmp_path_factory.mktemp("operator") / "veil.log", kubeconfig
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
