"""A real Kubernetes control plane as local processes: etcd, kube-apiserver,
kube-controller-manager, kube-scheduler and kwok (fake nodes that run fake pods).

The binaries come from hack/build-control-plane.sh (built from Go modules, cached).
Everything listens on 127.0.0.1 only.

    python -m tests.cluster.localcluster up --dir .cache/cluster   # start, print kubeconfig
    python -m tests.cluster.localcluster down --dir .cache/cluster
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.cluster import certs

if TYPE_CHECKING:
    from tests.cluster.node import RealNode

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "hack" / "build-control-plane.sh"
SERVICE_CIDR = "10.96.0.0/16"
POD_CIDR = "10.244.0.0/16"

# Labels and taints of Azure confidential VM node pools, as Veil's placement expects them.
CONFIDENTIAL_LABEL = ("kubernetes.azure.com/security-type", "ConfidentialVM")
CONFIDENTIAL_TAINT = {"key": "veil.dev/confidential", "value": "true", "effect": "NoSchedule"}
FAKE_NODE_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}


class ClusterError(RuntimeError):
    """The control plane could not be built or started; the message says which part."""


def build_binaries() -> Path:
    """Run the build script (a no-op when cached) and return the bin directory."""
    completed = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], check=False, capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise ClusterError(
            f"{BUILD_SCRIPT.name} failed ({completed.returncode}):\n{completed.stderr[-4000:]}"
        )
    return Path(completed.stdout.strip().splitlines()[-1])


def stop_process(process: subprocess.Popen[bytes], pid_file: Path, grace: float = 15) -> None:
    """TERM, then KILL after `grace` seconds; the pid file goes with the process."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class LocalCluster:
    directory: Path
    bin_dir: Path
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # Each process's arguments, so that a fault scenario can restart it as it was.
    arguments: dict[str, list[str]] = field(default_factory=dict)
    api_port: int = 0
    # With a real node the API server listens on the node's address, so pods reach it too.
    host: str = "127.0.0.1"
    real_node: RealNode | None = None

    def __post_init__(self) -> None:
        # Paths end up in kubeconfigs read from other working directories.
        self.directory = self.directory.resolve()

    @property
    def kubeconfig(self) -> Path:
        return self.directory / "kubeconfig"

    @property
    def audit_log(self) -> Path:
        """Every API request at Metadata level, one JSON event a line (who, verb, resource)."""
        return self.directory / "logs" / "audit.jsonl"

    def _write_audit_policy(self) -> Path:
        policy = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            # One event per request, once it has been answered.
            "omitStages": ["RequestReceived", "ResponseStarted"],
            "rules": [{"level": "Metadata"}],
        }
        path = self.directory / "audit-policy.json"
        path.write_text(json.dumps(policy))
        return path

    def audit_events(self, user: str | None = None) -> list[dict[str, Any]]:
        """The audit log so far, optionally only the requests of one user."""
        events: list[dict[str, Any]] = []
        if not self.audit_log.exists():
            return events
        with self.audit_log.open() as log:
            for line in log:
                event = json.loads(line)
                if user is None or event.get("user", {}).get("username") == user:
                    events.append(event)
        return events

    def audit_since(self, offset: int, user: str | None = None) -> tuple[list[dict[str, Any]], int]:
        """The audit events written after byte `offset` (optionally one user's), and the
        offset to read on from: a scenario follows the log as it grows without reading it
        all again. A line still being written is left for the next read."""
        if not self.audit_log.exists():
            return [], offset
        with self.audit_log.open("rb") as log:
            log.seek(offset)
            data = log.read()
        complete = data[: data.rfind(b"\n") + 1]
        events = [json.loads(line) for line in complete.splitlines() if line.strip()]
        if user is not None:
            events = [e for e in events if e.get("user", {}).get("username") == user]
        return events, offset + len(complete)

    @property
    def server(self) -> str:
        return f"https://{self.host}:{self.api_port}"

    # --- processes -----------------------------------------------------------------------

    def _start(self, name: str, args: list[str]) -> None:
        log = (self.directory / "logs" / f"{name}.log").open("ab")
        process = subprocess.Popen(
            [str(self.bin_dir / name.split("#", maxsplit=1)[0]), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.processes[name] = process
        self.arguments[name] = args
        (self.directory / "pids").mkdir(exist_ok=True)
        (self.directory / "pids" / name).write_text(str(process.pid))

    def _fail(self, name: str, why: str) -> ClusterError:
        log = self.directory / "logs" / f"{name}.log"
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        return ClusterError(f"{name} {why}; last log lines:\n{tail}")

    def _wait_http(
        self, name: str, url: str, timeout: float, context: ssl.SSLContext | None
    ) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            process = self.processes[name]
            if process.poll() is not None:
                raise self._fail(name, f"exited with {process.returncode}")
            with (
                contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError),
                urllib.request.urlopen(url, timeout=2, context=context) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.2)
        raise self._fail(name, f"not healthy at {url} after {timeout:.0f}s")

    def _client_context(self, paths: certs.Paths) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(paths.ca_cert))
        context.load_cert_chain(str(paths.admin_cert), str(paths.admin_key))
        return context

    def start(self) -> None:
        for sub in ("logs", "etcd", "certs"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        paths = certs.generate(
            self.directory / "certs", sorted({"127.0.0.1", "localhost", "10.96.0.1", self.host})
        )
        pods_reach_api = self.host != "127.0.0.1"
        etcd_port, peer_port = free_port(), free_port()
        self.api_port = free_port()

        self._start(
            "etcd",
            [
                "--name=veil",
                f"--data-dir={self.directory / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=veil=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level=warn",
                "--quota-backend-bytes=4294967296",
            ],
        )
        self._wait_http("etcd", f"http://127.0.0.1:{etcd_port}/health", 30, None)

        self._start(
            "kube-apiserver",
            [
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                f"--secure-port={self.api_port}",
                f"--bind-address={self.host}",
                f"--advertise-address={self.host}",
                f"--tls-cert-file={paths.serving_cert}",
                f"--tls-private-key-file={paths.serving_key}",
                f"--client-ca-file={paths.ca_cert}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={paths.service_account_pub}",
                f"--service-account-signing-key-file={paths.service_account_key}",
                "--authorization-mode=Node,RBAC",
                "--allow-privileged=true",
                # The `kubernetes` Service gets endpoints only where pods can reach them.
                f"--endpoint-reconciler-type={'lease' if pods_reach_api else 'none'}",
                f"--kubelet-client-certificate={paths.admin_cert}",
                f"--kubelet-client-key={paths.admin_key}",
                "--kubelet-preferred-address-types=InternalIP",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=1",
                f"--audit-policy-file={self._write_audit_policy()}",
                f"--audit-log-path={self.audit_log}",
                "--audit-log-format=json",
                "--audit-log-mode=blocking",
            ],
        )
        self._write_kubeconfig(paths)
        self._wait_http("kube-apiserver", f"{self.server}/readyz", 90, self._client_context(paths))

        self._start(
            "kube-controller-manager",
            [
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                f"--service-account-private-key-file={paths.service_account_key}",
                f"--root-ca-file={paths.ca_cert}",
                f"--cluster-signing-cert-file={paths.ca_cert}",
                f"--cluster-signing-key-file={paths.ca_key}",
                "--use-service-account-credentials=false",
                # No cloud and no real kubelets: IPAM and routes have nothing to do.
                "--controllers=*,-nodeipam,-route,-cloud-node-lifecycle,-service-lb-controller",
                f"--cluster-cidr={POD_CIDR}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--concurrent-gc-syncs=5",
                "--v=1",
            ],
        )
        self._start(
            "kube-scheduler",
            [
                f"--kubeconfig={self.kubeconfig}",
                f"--authentication-kubeconfig={self.kubeconfig}",
                f"--authorization-kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={free_port()}",
                "--v=1",
            ],
        )
        self._start(
            "kwok",
            [
                f"--kubeconfig={self.kubeconfig}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--cidr={POD_CIDR.replace('0.0/16', '0.1/16')}",
                "--node-ip=10.244.0.1",
                "--node-lease-duration-seconds=40",
                "--server-address=127.0.0.1:0",
            ],
        )
        time.sleep(0.5)
        for name in ("kube-controller-manager", "kube-scheduler", "kwok"):
            process = self.processes[name]
            if process.poll() is not None:
                raise self._fail(name, f"exited with {process.returncode}")
        (self.directory / "server").write_text(self.server)

    def user_kubeconfig(self, user: str, group: str) -> Path:
        """A kubeconfig for a user of its own, so audit events and RBAC can tell it apart."""
        paths = certs.paths_in(self.directory / "certs")
        cert, key = certs.issue_client(paths, self.directory / "certs", user, group)
        path = self.directory / f"kubeconfig-{user}"
        path.write_text(json.dumps(self._kubeconfig_document(paths.ca_cert, cert, key, user)))
        return path

    def _kubeconfig_document(self, ca: Path, cert: Path, key: Path, user: str) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "veil-local",
                    "cluster": {"server": self.server, "certificate-authority": str(ca)},
                }
            ],
            "users": [
                {"name": user, "user": {"client-certificate": str(cert), "client-key": str(key)}}
            ],
            "contexts": [
                {
                    "name": "veil-local",
                    "context": {"cluster": "veil-local", "user": user, "namespace": "default"},
                }
            ],
            "current-context": "veil-local",
        }

    def _write_kubeconfig(self, paths: certs.Paths) -> None:
        document = self._kubeconfig_document(
            paths.ca_cert, paths.admin_cert, paths.admin_key, "veil-admin"
        )
        # JSON is YAML: every Kubernetes client reads it.
        self.kubeconfig.write_text(json.dumps(document, indent=2))

    def stop(self) -> None:
        if self.real_node is not None:
            self.real_node.stop()
            self.real_node = None
        # Reverse start order: clients first, etcd last.
        for name in reversed(list(self.processes)):
            process = self.processes[name]
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for name, process in self.processes.items():
            stop_process(process, self.directory / "pids" / name)
        self.processes.clear()

    # --- faults ---------------------------------------------------------------------------

    def restart_apiserver(self, down_seconds: float = 0.0) -> float:
        """Stop the API server (TERM, as an upgrade does), keep it down `down_seconds`, start
        it again with the same flags and wait until it is ready. Returns the seconds from the
        stop to ready again."""
        name = "kube-apiserver"
        stopped = time.monotonic()
        stop_process(self.processes[name], self.directory / "pids" / name)
        time.sleep(down_seconds)
        self._start(name, self.arguments[name])
        paths = certs.paths_in(self.directory / "certs")
        self._wait_http(name, f"{self.server}/readyz", 90, self._client_context(paths))
        return time.monotonic() - stopped

    @contextlib.contextmanager
    def etcd_paused(self) -> Iterator[None]:
        """etcd stopped with SIGSTOP for the block (every API write and quorum read hangs),
        then resumed with SIGCONT, even when the block fails."""
        etcd = self.processes["etcd"]
        etcd.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            etcd.send_signal(signal.SIGCONT)

    # --- fake nodes ----------------------------------------------------------------------

    def kubectl(self, *args: str, input_text: str | None = None, check: bool = True) -> str:
        completed = subprocess.run(
            [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}", *args],
            input=input_text,
            capture_output=True,
            text=True,
            check=False,
        )
        if check and completed.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {completed.stderr.strip()}")
        return completed.stdout

    def add_nodes(
        self, ordinary: int = 2, confidential: int = 2, *, tainted: bool = False, first: int = 0
    ) -> list[str]:
        """kwok's fake nodes; `tainted` keeps every pod that does not tolerate
        `kwok.x-k8s.io/node=fake` off them (beside a real node, for scale tests only).
        Names count from `first`, so that nodes added later do not replace earlier ones."""
        names = []
        for index in range(first, first + ordinary + confidential):
            is_confidential = index >= first + ordinary
            name = f"{'cvm' if is_confidential else 'node'}-{index}"
            labels = {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                "topology.kubernetes.io/zone": f"zone-{index % 2}",
            }
            taints: list[dict[str, str]] = [FAKE_NODE_TAINT] if tainted else []
            if is_confidential:
                labels[CONFIDENTIAL_LABEL[0]] = CONFIDENTIAL_LABEL[1]
                taints.append(CONFIDENTIAL_TAINT)
            spec: dict[str, object] = {"taints": taints} if taints else {}
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": name,
                    "labels": labels,
                    "annotations": {"kwok.x-k8s.io/node": "fake"},
                },
                "spec": spec,
                "status": {
                    "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                    "capacity": {"cpu": "16", "memory": "64Gi", "pods": "110"},
                    "nodeInfo": {
                        "architecture": "amd64",
                        "operatingSystem": "linux",
                        "kubeletVersion": "fake",
                        "kubeProxyVersion": "fake",
                    },
                },
            }
            self.kubectl("apply", "-f", "-", input_text=json.dumps(node))
            names.append(name)
        self.kubectl("wait", "--for=condition=Ready", "node", *names, "--timeout=60s")
        return names


def start_cluster(directory: Path, *, real_node: bool = False, nodes: bool = True) -> LocalCluster:
    """The control plane with kwok's nodes and, if asked, a real node (see node.py)."""
    from tests.cluster import node

    cluster = LocalCluster(directory=directory, bin_dir=build_binaries())
    real: node.RealNode | None = None
    if real_node:
        real = node.RealNode.prepare(cluster)
        cluster.host = node.NODE_IP
        cluster.real_node = real
    try:
        cluster.start()
        if real is not None:
            real.start()
        if nodes:
            cluster.add_nodes(tainted=real_node)
    except BaseException:
        cluster.stop()
        raise
    return cluster


@contextlib.contextmanager
def running(
    directory: Path, *, real_node: bool = False, nodes: bool = True
) -> Iterator[LocalCluster]:
    cluster = start_cluster(directory, real_node=real_node, nodes=nodes)
    try:
        yield cluster
    finally:
        cluster.stop()


def _down(directory: Path) -> None:
    """Stop processes that `up` left running: TERM, then KILL after a grace period; then
    undo what a real node changed on the machine (containers, mounts, rules, addresses)."""
    from tests.cluster import node

    pid_dir = directory / "pids"
    if (directory / "node").exists():
        # The kubelet first, or it restarts the containers removed next.
        _stop_pids([pid_dir / "kubelet"])
        node.remove_containers()
    _stop_pids(sorted(pid_dir.glob("*")) if pid_dir.exists() else [])
    if (directory / "node").exists():
        node.clean_machine(directory / "node")


def _stop_pids(pid_files: list[Path]) -> None:
    pids = {}
    for pid_file in pid_files:
        with contextlib.suppress(ValueError, FileNotFoundError):
            pids[pid_file] = int(pid_file.read_text())
    for pid in pids.values():
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for pid_file, pid in pids.items():
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pid_file.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it has stopped all the same.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["build", "up", "down"])
    parser.add_argument("--dir", type=Path, default=REPO / ".cache" / "cluster")
    parser.add_argument(
        "--real-node", action="store_true", help="also start a real node (root; see node.py)"
    )
    args = parser.parse_args(argv)
    if args.action == "build":
        print(build_binaries())
        return 0
    if args.action == "down":
        _down(args.dir)
        return 0
    _down(args.dir)
    cluster = start_cluster(args.dir, real_node=args.real_node)
    # Leave the processes running for `down`; they are in their own sessions.
    cluster.processes.clear()
    cluster.real_node = None
    print(cluster.kubeconfig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
