"""A real Kubernetes node on this machine, beside the Go-built control plane: containerd and
runc and the CNI plugins from Debian, kubelet and kube-proxy from the control plane's wrapper
module, CoreDNS and kube-router (NetworkPolicy firewall only) from their Go modules.

Everything stays inside the machine: the node's address is on `lo`, the pod bridge is attached
to nothing else, pods get routes only to the pod, service and node ranges (no default route,
no NAT), and an nftables guard drops anything forwarded through an interface other than the
bridge. Needs root. One real node per machine: its containerd socket and bridge are fixed.

The node is an Azure confidential VM as far as its pods can tell: a software vTPM provisioned
as Azure's paravisor provisions one (veil_standins.vtpm, a LOCAL STAND-IN) listens on the
node's address (`vtpm_tcti`), and its trust (`guest_trust_dir`) is what the MAA stand-in
verifies the node agent's evidence against.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.cluster import certs
from tests.cluster.localcluster import stop_process
from veil_standins.vtpm import SoftwareCvm

if TYPE_CHECKING:
    from tests.cluster.localcluster import LocalCluster

REPO = Path(__file__).resolve().parents[2]
BUILD_NODE = REPO / "hack" / "build-node.sh"
BUILD_IMAGES = REPO / "hack" / "build-image.sh"

NODE_NAME = "veil-node"
NODE_IP = "10.99.0.1"
LOCAL_RANGE = "10.99.0.0/16"
# The Azure stand-ins live off the node, as Azure does: in a network namespace of their own,
# behind a veth pair, so a pod's traffic to them is forwarded and NetworkPolicy egress applies.
# Each address serves on 443 like the service it stands in for. The namespace has no other
# link and routes only back to the node and the pods.
SERVICES_NETNS = "veil-services"
SERVICES_LINK = "veilsvc0"
SERVICES_GATEWAY = "10.99.1.1"
STANDIN_ADDRESSES = {
    "vault": "10.99.1.2",
    "maa": "10.99.1.3",
    "arm": "10.99.1.4",
    "blob": "10.99.1.5",
}
POD_CIDR = "10.88.0.0/16"
CLUSTER_DNS = "10.96.0.10"
BRIDGE = "veil0"
RUN_DIR = Path("/run/veil-node")
CONTAINERD_SOCKET = RUN_DIR / "containerd" / "containerd.sock"
# Where build-image.sh names its images (containerd's CRI wants docker.io/... names).
LOCAL_IMAGES = "docker.io/local/"
CNI_BIN_DIR = Path("/usr/lib/cni")
GUARD_TABLE = "veil_node_guard"
# Labels of the real node: an AKS confidential VM, so model pods land on it.
REAL_NODE_LABELS = {
    "kubernetes.azure.com/security-type": "ConfidentialVM",
    "veil.dev/node": "real",
}
# The chains kubelet, kube-proxy and kube-router add (all named KUBE-…), and kube-router's
# ipsets: removed on teardown (kube-router's own --cleanup-config panics).
RULE_PREFIX = "KUBE-"
APT_PACKAGES = (
    "containerd runc containernetworking-plugins iptables ipset conntrack nftables swtpm tpm2-tools"
)
# The node's vTPM (swtpm): commands on this port of the node's address, its control channel on
# the next (the swtpm TCTI's convention). Fixed like the bridge: one real node per machine.
VTPM_PORT = 2321
VTPM_PROCESS = "swtpm"


class NodeError(RuntimeError):
    """The real node could not be built or started; the message says which part and why."""


def _run(*args: str, check: bool = True, input_text: str | None = None) -> str:
    completed = subprocess.run(
        list(args), capture_output=True, text=True, check=False, input=input_text
    )
    if check and completed.returncode != 0:
        raise NodeError(f"{' '.join(args)} failed ({completed.returncode}): {completed.stderr}")
    return completed.stdout


def _last_line(script: Path) -> str:
    completed = subprocess.run(
        ["bash", str(script)], capture_output=True, text=True, check=False, cwd=REPO
    )
    if completed.returncode != 0:
        tail = completed.stderr[-4000:]
        raise NodeError(f"{script.name} failed ({completed.returncode}):\n{tail}")
    return completed.stdout.strip().splitlines()[-1]


def build_node_binaries() -> Path:
    return Path(_last_line(BUILD_NODE))


@dataclass(frozen=True)
class Image:
    name: str
    reference: str
    archive: Path


def build_images() -> dict[str, Image]:
    """Veil's image and the sandbox image, built from the Dockerfile (cached by content)."""
    completed = subprocess.run(
        ["bash", str(BUILD_IMAGES)], capture_output=True, text=True, check=False, cwd=REPO
    )
    if completed.returncode != 0:
        raise NodeError(f"build-image.sh failed:\n{completed.stderr[-4000:]}")
    images = {}
    for line in completed.stdout.strip().splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[1].startswith("docker.io/"):
            images[parts[0]] = Image(parts[0], parts[1], Path(parts[2]))
    if not {"veil", "pause", "skr"} <= images.keys():
        raise NodeError(f"build-image.sh did not print veil, pause and skr:\n{completed.stdout}")
    return images


def missing_host_tools() -> list[str]:
    tools = ["containerd", "containerd-shim-runc-v2", "runc", "ctr", "iptables", "ipset", "nft"]
    tools += ["swtpm", "tpm2_createprimary"]
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not (CNI_BIN_DIR / "bridge").exists():
        missing.append(str(CNI_BIN_DIR / "bridge"))
    return missing


@dataclass
class RealNode:
    cluster: LocalCluster
    bin_dir: Path
    images: dict[str, Image]
    directory: Path = field(init=False)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    vtpm: SoftwareCvm | None = None
    _forwarding_before: str = "0"

    def __post_init__(self) -> None:
        self.directory = self.cluster.directory / "node"

    @classmethod
    def prepare(cls, cluster: LocalCluster) -> RealNode:
        """Build (or find cached) binaries and images, and put the node's address on `lo`:
        the API server listens there, so this comes before the control plane starts."""
        missing = missing_host_tools()
        if missing:
            raise NodeError(
                f"a real node needs {', '.join(missing)}: run hack/setup.sh "
                f"(apt-get install {APT_PACKAGES})"
            )
        if CONTAINERD_SOCKET.exists() and _ctr("version", check=False):
            raise NodeError(
                "another real node is running on this machine (its containerd answers on "
                f"{CONTAINERD_SOCKET}); stop it first (hack/down.sh)"
            )
        node = cls(cluster=cluster, bin_dir=build_node_binaries(), images=build_images())
        node.directory.mkdir(parents=True, exist_ok=True)
        node._network_up()
        return node

    @property
    def guest_trust_dir(self) -> Path:
        """The node vTPM's trust as PEM files (`python -m veil_standins --guest-trust`)."""
        return self.directory / "guest-trust"

    @property
    def vtpm_tcti(self) -> str:
        """How a pod (or this machine) reaches the node's vTPM: `swtpm:host=…,port=…`."""
        if self.vtpm is None:
            raise NodeError("the node's vTPM is not running (RealNode.start starts it)")
        return self.vtpm.tcti

    @property
    def containerd_root(self) -> Path:
        # Outside the cluster directory: imported images survive clusters (content-addressed).
        cache = Path(os.environ.get("VEIL_CACHE", Path.home() / ".cache" / "veil"))
        return cache / "containerd"

    # --- host network ---------------------------------------------------------------------

    def _network_up(self) -> None:
        addresses = _run("ip", "-br", "addr", "show", "dev", "lo")
        if f"{NODE_IP}/32" not in addresses:
            _run("ip", "addr", "add", f"{NODE_IP}/32", "dev", "lo")
        _services_network_up()
        self._forwarding_before = Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()
        (self.directory / "ip_forward.before").write_text(self._forwarding_before)
        # The bridge plugin turns forwarding on: first make sure nothing forwarded leaves the
        # bridge (no route or NAT from a pod to an outside address).
        _run("nft", "delete", "table", "inet", GUARD_TABLE, check=False)
        _run(
            "nft",
            "-f",
            "-",
            input_text=(
                f"table inet {GUARD_TABLE} {{\n"
                "  chain forward {\n"
                "    type filter hook forward priority -10; policy accept;\n"
                f'    iifname != {{ "{BRIDGE}", "{SERVICES_LINK}" }} drop\n'
                f'    oifname != {{ "{BRIDGE}", "{SERVICES_LINK}" }} drop\n'
                "  }\n"
                "}\n"
            ),
        )
        # Bridged pod-to-pod traffic must pass iptables, for kube-proxy and kube-router alike.
        bridge_nf = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
        if not bridge_nf.exists():
            raise NodeError("this kernel has no br_netfilter (no bridge-nf-call-iptables)")
        bridge_nf.write_text("1")

    # --- configuration files --------------------------------------------------------------

    def _write_containerd_config(self) -> Path:
        pause = self.images["pause"].reference
        config = f"""version = 2
root = "{self.containerd_root / "root"}"
state = "{RUN_DIR / "containerd" / "state"}"
[grpc]
  address = "{CONTAINERD_SOCKET}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # root here lacks CAP_SYS_RESOURCE: runc may only raise oom_score_adj, never lower it.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{self.directory / "cni" / "net.d"}"
"""
        path = self.directory / "containerd.toml"
        path.write_text(config)
        return path

    def _write_cni_config(self) -> None:
        conf_dir = self.directory / "cni" / "net.d"
        conf_dir.mkdir(parents=True, exist_ok=True)
        routes = [{"dst": POD_CIDR}, {"dst": "10.96.0.0/16"}, {"dst": LOCAL_RANGE}]
        conflist = {
            "cniVersion": "1.0.0",
            "name": "veil",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": POD_CIDR}]],
                        # Only inside the machine: no default route.
                        "routes": routes,
                        "dataDir": str(self.directory / "cni" / "ipam"),
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        }
        (conf_dir / "10-veil.conflist").write_text(json.dumps(conflist, indent=2))

    def _write_kubelet_config(self) -> Path:
        paths = certs.paths_in(self.cluster.directory / "certs")
        config: dict[str, Any] = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": NODE_IP,
            "port": 10250,
            "readOnlyPort": 0,
            "healthzBindAddress": NODE_IP,
            "healthzPort": 10248,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(paths.ca_cert)},
            },
            "authorization": {"mode": "Webhook"},
            # This kernel offers cgroup v1 only, which 1.35 refuses unless told otherwise.
            "cgroupDriver": "cgroupfs",
            "failCgroupV1": False,
            "failSwapOn": False,
            "clusterDNS": [CLUSTER_DNS],
            "clusterDomain": "cluster.local",
            # Pods never see the machine's own resolver.
            "resolvConf": "",
            "containerRuntimeEndpoint": f"unix://{CONTAINERD_SOCKET}",
            "podLogsDir": str(self.directory / "pod-logs"),
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False,
            "maxPods": 110,
            "nodeStatusReportFrequency": "10s",
            "syncFrequency": "10s",
        }
        path = self.directory / "kubelet.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def _write_kube_proxy_config(self, kubeconfig: Path) -> Path:
        config = {
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": str(kubeconfig)},
            "mode": "iptables",
            "clusterCIDR": POD_CIDR,
            "hostnameOverride": NODE_NAME,
            "bindAddress": NODE_IP,
            "healthzBindAddress": f"{NODE_IP}:10256",
            "metricsBindAddress": f"{NODE_IP}:10249",
            "nodePortAddresses": [f"{NODE_IP}/32"],
            "conntrack": {"maxPerCore": 0},
        }
        path = self.directory / "kube-proxy.json"
        path.write_text(json.dumps(config, indent=2))
        return path

    def _write_corefile(self, kubeconfig: Path) -> Path:
        # Cluster names only; no upstream forwarding, so nothing resolves outside names.
        corefile = f""".:53 {{
    bind {NODE_IP}
    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig}
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }}
    cache 10
}}
"""
        path = self.directory / "Corefile"
        path.write_text(corefile)
        return path

    # --- processes --------------------------------------------------------------------------

    def _start(self, name: str, command: list[str]) -> None:
        log = (self.cluster.directory / "logs" / f"{name}.log").open("ab")
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        self.processes[name] = process
        self.cluster.processes[name] = process
        (self.cluster.directory / "pids").mkdir(exist_ok=True)
        (self.cluster.directory / "pids" / name).write_text(str(process.pid))

    def _check_alive(self, name: str) -> None:
        process = self.processes[name]
        if process.poll() is not None:
            log = self.cluster.directory / "logs" / f"{name}.log"
            tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
            raise NodeError(f"{name} exited with {process.returncode}; last log lines:\n{tail}")

    def _start_containerd(self) -> None:
        (RUN_DIR / "containerd").mkdir(parents=True, exist_ok=True)
        config = self._write_containerd_config()
        self._start("containerd", ["containerd", f"--config={config}"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self._check_alive("containerd")
            if CONTAINERD_SOCKET.exists() and _ctr("version", check=False):
                break
            time.sleep(0.2)
        else:
            raise NodeError("containerd did not answer on its socket within 30s")
        remove_containers()
        present = self.images_in_store()
        for image in self.images.values():
            if image.reference not in present:
                self.import_image(image.archive)
        self.remove_superseded_images()

    def images_in_store(self) -> dict[str, str]:
        """Every image name in the node's containerd (the CRI's namespace), with the digest of
        the manifest it names."""
        rows = [row.split() for row in _ctr("images", "list").splitlines()[1:]]
        return {row[0]: row[2] for row in rows if row}

    def import_image(self, archive: Path) -> None:
        """Import an OCI archive under the names its index gives (not unpacked until used)."""
        _ctr("images", "import", "--no-unpack", str(archive))

    def remove_superseded_images(self) -> list[str]:
        """Remove older builds of the local images from containerd; returns the names removed."""
        # Every change to Veil's tree is a new image of over a gigabyte, and the store outlives
        # clusters: without this, a day of builds fills the disk.
        store = self.images_in_store()
        current = {image.reference for image in self.images.values()}
        in_use = {store[name] for name in current if name in store}
        # Besides its own names, the CRI names each image by its id (`sha256:…`): an older
        # build's id keeps its gigabytes until it goes too.
        ours = [name for name in store if name.startswith((LOCAL_IMAGES, "sha256:"))]
        in_use |= {digest for name, digest in store.items() if name not in ours}
        superseded = [name for name in ours if store[name] not in in_use]
        if superseded:
            # --sync: the content and snapshots are gone when this returns, not at the next GC.
            _ctr("images", "remove", "--sync", *superseded)
        return superseded

    def _apply_dns_service(self) -> None:
        service = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "kube-dns",
                "namespace": "kube-system",
                "labels": {"k8s-app": "kube-dns"},
            },
            "spec": {
                "clusterIP": CLUSTER_DNS,
                "ports": [
                    {"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                    {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53},
                ],
            },
        }
        # Selectorless: CoreDNS runs on the node's address, as a process of this harness.
        slice_ = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "kube-dns-node",
                "namespace": "kube-system",
                "labels": {"kubernetes.io/service-name": "kube-dns"},
            },
            "addressType": "IPv4",
            "endpoints": [{"addresses": [NODE_IP], "conditions": {"ready": True}}],
            "ports": [
                {"name": "dns", "port": 53, "protocol": "UDP"},
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
            ],
        }
        for document in (service, slice_):
            self.cluster.kubectl("apply", "-f", "-", input_text=json.dumps(document))

    def _start_vtpm(self) -> None:
        """The node's vTPM, freshly provisioned (new AK, new keys), and its trust on disk.
        It listens on the node's address only: pods reach it, nothing outside the machine."""
        _stop_stale_vtpm()  # prepare() made sure no other real node is running
        vtpm_dir = self.directory / "vtpm"
        shutil.rmtree(vtpm_dir, ignore_errors=True)
        shutil.rmtree(self.guest_trust_dir, ignore_errors=True)
        cvm = SoftwareCvm.start(
            vtpm_dir,
            host=NODE_IP,
            port=VTPM_PORT,
            log=self.cluster.directory / "logs" / f"{VTPM_PROCESS}.log",
            detach=True,  # like the agents: `localcluster up` leaves it running for `down`
        )
        self.vtpm = cvm
        self.processes[VTPM_PROCESS] = cvm.process
        self.cluster.processes[VTPM_PROCESS] = cvm.process
        (self.cluster.directory / "pids").mkdir(exist_ok=True)
        (self.cluster.directory / "pids" / VTPM_PROCESS).write_text(str(cvm.process.pid))
        cvm.trust().to_files(self.guest_trust_dir)

    def start(self) -> None:
        for sub in ("cni", "pod-logs", "kubelet"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)
        # Before the kubelet: the node agent's DaemonSet pod finds the vTPM from its first try.
        self._start_vtpm()
        self._write_cni_config()
        self._start_containerd()

        self._start_kubelet()
        proxy_kubeconfig = self.cluster.user_kubeconfig("system:kube-proxy", "system:node-proxier")
        self._start(
            "kube-proxy",
            [
                str(self.bin_dir / "kube-proxy"),
                f"--config={self._write_kube_proxy_config(proxy_kubeconfig)}",
                "--v=1",
            ],
        )
        self._start(
            "coredns",
            [
                str(self.bin_dir / "coredns"),
                "-conf",
                str(self._write_corefile(self.cluster.kubeconfig)),
            ],
        )
        self._apply_dns_service()
        self._wait_ready()
        # kube-router finds its Node object at start: only once the kubelet registered it.
        self._start(
            "kube-router",
            [
                str(self.bin_dir / "kube-router"),
                f"--kubeconfig={self.cluster.kubeconfig}",
                f"--hostname-override={NODE_NAME}",
                "--run-router=false",
                "--run-service-proxy=false",
                "--run-firewall=true",
                "--enable-cni=false",
                "--health-port=0",
                "--metrics-port=0",
                "--v=1",
            ],
        )
        deadline = time.monotonic() + 60
        while "KUBE-ROUTER-FORWARD" not in _run("iptables-save", "-t", "filter", check=False):
            self._check_alive("kube-router")
            if time.monotonic() > deadline:
                raise NodeError("kube-router installed no firewall chains within 60s")
            time.sleep(0.5)

    def _start_kubelet(self) -> None:
        node_kubeconfig = self.cluster.user_kubeconfig(f"system:node:{NODE_NAME}", "system:nodes")
        labels = ",".join(f"{k}={v}" for k, v in REAL_NODE_LABELS.items())
        self._start(
            "kubelet",
            [
                str(self.bin_dir / "kubelet"),
                f"--config={self._write_kubelet_config()}",
                f"--kubeconfig={node_kubeconfig}",
                f"--root-dir={self.directory / 'kubelet'}",
                f"--cert-dir={self.directory / 'kubelet' / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                f"--node-labels={labels}",
                "--v=1",
            ],
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            for name in self.processes:
                self._check_alive(name)
            ready = self.cluster.kubectl(
                "get",
                "node",
                NODE_NAME,
                "-o",
                "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
                check=False,
            )
            if ready.strip() == "True":
                return
            time.sleep(1)
        raise NodeError(f"node {NODE_NAME} not Ready after 120s; see kubelet.log")

    def restart(self) -> None:
        """What a reboot does to the node's pods: the kubelet and containerd stop and every
        container dies with its memory (released keys, unsealed models); then both start again
        and the kubelet brings the node's pods back. Disk stays, as it does across a reboot
        (emptyDir volumes, images); so do the vTPM (the node's hardware, whose state a reboot
        keeps) and the host network agents (stateless over iptables)."""
        self._terminate("kubelet")
        remove_containers()
        self._terminate("containerd")
        self._start_containerd()
        self._start_kubelet()
        self._wait_ready()

    def stop(self) -> None:
        """Stop the agents and leave the machine as it was: no containers, mounts, rules."""
        with contextlib.suppress(Exception):
            self.cluster.kubectl(
                "delete",
                "pods",
                "-A",
                f"--field-selector=spec.nodeName={NODE_NAME}",
                "--grace-period=1",
                "--wait=false",
                check=False,
            )
        for name in ("coredns", "kube-router", "kube-proxy", "kubelet"):
            self._terminate(name)
        if "containerd" in self.processes:
            remove_containers()
            self._terminate("containerd")
        # After the pods: the node agent may hold a TPM session until it stops.
        self._terminate(VTPM_PROCESS)
        self.vtpm = None
        clean_machine(self.directory, self.bin_dir)

    def _terminate(self, name: str) -> None:
        process = self.processes.pop(name, None)
        self.cluster.processes.pop(name, None)
        if process is not None:
            stop_process(process, self.cluster.directory / "pids" / name)


def _ctr(*args: str, check: bool = True) -> str:
    return _run("ctr", f"--address={CONTAINERD_SOCKET}", "-n", "k8s.io", *args, check=check)


def remove_containers() -> None:
    """Kill and delete every container of the node (containerd must still be running)."""
    if not CONTAINERD_SOCKET.exists():
        return
    for container in _ctr("containers", "list", "--quiet", check=False).split():
        _ctr("tasks", "kill", "--signal", "SIGKILL", container, check=False)
        _ctr("tasks", "delete", "--force", container, check=False)
        _ctr("containers", "delete", container, check=False)


def clean_machine(node_dir: Path, bin_dir: Path | None = None) -> None:
    """Undo the node's changes to the machine once its processes have stopped."""
    # Before the node's address goes: a leftover swtpm would hold its port on it.
    _stop_stale_vtpm()
    for root in (node_dir, RUN_DIR):
        _unmount_under(root)
    cleanup_rules(bin_dir or build_node_binaries())
    before = node_dir / "ip_forward.before"
    _network_down(before.read_text().strip() if before.exists() else "0")
    shutil.rmtree(RUN_DIR, ignore_errors=True)


def _stale_vtpm_pids() -> list[int]:
    """swtpm processes listening on the node's address: ours (no one else uses it), left by
    a harness that died before stopping its node."""
    bind = f"bindaddr={NODE_IP}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile, or not ours to read
        is_swtpm = Path(argv[0].decode(errors="replace")).name == "swtpm"
        if is_swtpm and any(bind in arg for arg in argv):
            pids.append(int(entry.name))
    return pids


def _stop_stale_vtpm() -> None:
    pids = _stale_vtpm_pids()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 5
    while pids and time.monotonic() < deadline:
        time.sleep(0.1)
        pids = [pid for pid in pids if pid in _stale_vtpm_pids()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _unmount_under(root: Path) -> None:
    prefix = str(root.resolve())
    mounts = [
        line.split()[1]
        for line in Path("/proc/mounts").read_text().splitlines()
        if line.split()[1].startswith(prefix)
    ]
    for mount in sorted(mounts, key=len, reverse=True):
        _run("umount", "-l", mount, check=False)


def _services_network_up() -> None:
    """The stand-ins' network namespace: a veth to the node, their addresses, routes back."""
    _run("ip", "netns", "delete", SERVICES_NETNS, check=False)
    _run("ip", "link", "delete", SERVICES_LINK, check=False)
    _run("ip", "netns", "add", SERVICES_NETNS)
    _run("ip", "link", "add", SERVICES_LINK, "type", "veth", "peer", "name", "svc0")
    _run("ip", "link", "set", "svc0", "netns", SERVICES_NETNS)
    _run("ip", "addr", "add", f"{SERVICES_GATEWAY}/24", "dev", SERVICES_LINK)
    _run("ip", "link", "set", SERVICES_LINK, "up")
    inside = ("ip", "netns", "exec", SERVICES_NETNS)
    for address in STANDIN_ADDRESSES.values():
        _run(*inside, "ip", "addr", "add", f"{address}/24", "dev", "svc0")
    _run(*inside, "ip", "link", "set", "svc0", "up")
    _run(*inside, "ip", "link", "set", "lo", "up")
    # Back to the node and the pods only: there is no default route out of this namespace.
    for destination in (f"{NODE_IP}/32", POD_CIDR):
        _run(*inside, "ip", "route", "add", destination, "via", SERVICES_GATEWAY)


def in_services_netns(command: list[str]) -> list[str]:
    """`command` run inside the stand-ins' network namespace."""
    return ["ip", "netns", "exec", SERVICES_NETNS, *command]


def _network_down(forwarding_before: str) -> None:
    for line in _run("ip", "netns", "list", check=False).splitlines():
        name = line.split(" ")[0]
        if name.startswith("cni-"):
            _run("ip", "netns", "delete", name, check=False)
    _run("ip", "link", "delete", BRIDGE, check=False)
    Path("/proc/sys/net/ipv4/ip_forward").write_text(forwarding_before or "0")
    _run("nft", "delete", "table", "inet", GUARD_TABLE, check=False)
    _run("ip", "netns", "delete", SERVICES_NETNS, check=False)
    _run("ip", "link", "delete", SERVICES_LINK, check=False)
    _run("ip", "addr", "del", f"{NODE_IP}/32", "dev", "lo", check=False)


def cleanup_rules(bin_dir: Path | None) -> None:
    """Remove the node agents' iptables rules and kube-router's ipsets."""
    if bin_dir is not None and (bin_dir / "kube-proxy").exists():
        _run(str(bin_dir / "kube-proxy"), "--cleanup", check=False)
    for save, restore in (
        ("iptables-save", "iptables-restore"),
        ("ip6tables-save", "ip6tables-restore"),
    ):
        for table in ("filter", "nat", "mangle"):
            saved = _run(save, "-t", table, check=False)
            if RULE_PREFIX not in saved:
                continue
            kept = [line for line in saved.splitlines() if RULE_PREFIX not in line]
            _run(restore, input_text="\n".join(kept) + "\n", check=False)
    for name in _run("ipset", "list", "-n", check=False).split():
        if name.startswith(("KUBE-", "kube-router")):
            _run("ipset", "destroy", name, check=False)
