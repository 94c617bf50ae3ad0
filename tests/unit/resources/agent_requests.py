"""Kata agent requests as the agent hands them to its policy engine (`input` is the request's
JSON, field names as kata's protocols crate serialises them; shapes follow genpolicy's test
cases), and an evaluator that decides as the agent does."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

# Microsoft's Rego interpreter, the engine inside the kata agent. The package registry has no
# `regorus` distribution; the dev extra `gordon-to-regorus` builds the same bindings under the
# module name `regorus` (a one-maintainer build of Microsoft's source: test-only).
import regorus  # type: ignore[import-not-found]

from veil.resources.kata_policy import KataPolicy

SANDBOX_ID = "8667fea11fc4fc70d427cc3645950ac83cc7d33ca515a8774ab95043f0096bb8"
MASKED = ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/sys/firmware"]
STANDARD_MOUNTS = [
    {
        "destination": "/proc",
        "options": ["nosuid", "noexec", "nodev"],
        "source": "proc",
        "type_": "proc",
    },
    {
        "destination": "/dev",
        "options": ["nosuid", "strictatime", "mode=755", "size=65536k"],
        "source": "tmpfs",
        "type_": "tmpfs",
    },
    {
        "destination": "/dev/pts",
        "options": ["nosuid", "noexec", "newinstance", "gid=5"],
        "source": "devpts",
        "type_": "devpts",
    },
    {
        "destination": "/dev/mqueue",
        "options": ["nosuid", "noexec", "nodev"],
        "source": "mqueue",
        "type_": "mqueue",
    },
    {
        "destination": "/sys",
        "options": ["nosuid", "noexec", "nodev", "ro"],
        "source": "sysfs",
        "type_": "sysfs",
    },
    {
        "destination": "/sys/fs/cgroup",
        "options": ["nosuid", "noexec", "nodev", "relatime", "ro"],
        "source": "cgroup",
        "type_": "cgroup",
    },
]
SERVICE_ENV = [
    "HOSTNAME=m-5d8f7c9b4-x2x7q",
    "KUBERNETES_SERVICE_HOST=10.0.0.1",
    "KUBERNETES_SERVICE_PORT=443",
    "KUBERNETES_SERVICE_PORT_HTTPS=443",
    "KUBERNETES_PORT=tcp://10.0.0.1:443",
    "KUBERNETES_PORT_443_TCP=tcp://10.0.0.1:443",
    "KUBERNETES_PORT_443_TCP_PROTO=tcp",
    "KUBERNETES_PORT_443_TCP_PORT=443",
    "KUBERNETES_PORT_443_TCP_ADDR=10.0.0.1",
]


def shared(cid: str, name: str) -> str:
    return f"/run/kata-containers/shared/containers/{cid}-4a4c20d48254d738-{name}"


def bind(destination: str, source: str, read_only: bool = False) -> dict[str, Any]:
    options = ["rbind", "rprivate", "ro" if read_only else "rw"]
    return {"destination": destination, "options": options, "source": source, "type_": "bind"}


def kubelet_mounts(cid: str) -> list[dict[str, Any]]:
    return [
        bind("/etc/hosts", shared(cid, "hosts")),
        bind("/dev/termination-log", shared(cid, "termination-log")),
        bind("/etc/hostname", shared(cid, "hostname")),
        bind("/etc/resolv.conf", shared(cid, "resolv.conf")),
        {
            "destination": "/dev/shm",
            "options": ["rbind"],
            "source": "/run/kata-containers/sandbox/shm",
            "type_": "bind",
        },
    ]


def create_container(
    *,
    name: str,
    image: str,
    args: Sequence[str],
    env: Sequence[str],
    mounts: Sequence[Mapping[str, Any]] = (),
    namespace: str = "ns",
    container_type: str = "container",
    uid: int = 65532,
    read_only_root: bool = True,
    storages: Sequence[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A CreateContainerRequest for a restricted container (capabilities dropped)."""
    cid = f"{name}-cid"
    annotations = {
        "io.katacontainers.pkg.oci.container_type": "pod_container",
        "io.kubernetes.cri.container-type": container_type,
        "io.kubernetes.cri.sandbox-id": SANDBOX_ID,
        "io.kubernetes.cri.sandbox-name": "m-5d8f7c9b4-x2x7q",
        "io.kubernetes.cri.sandbox-namespace": namespace,
    }
    if container_type == "container":
        annotations["io.kubernetes.cri.container-name"] = name
        annotations["io.kubernetes.cri.image-name"] = image
    if storages is None:
        storages = [
            {
                "driver": "image_guest_pull",
                "driver_options": [],
                "fstype": "overlay",
                "mount_point": f"/run/kata-containers/{cid}/rootfs",
                "options": [],
                "source": image,
            }
        ]
    return {
        "OCI": {
            "Annotations": annotations,
            "Hooks": None,
            "Hostname": "",
            "Linux": {
                "CgroupsPath": f"kubepods-pod.slice:cri-containerd:{cid}",
                "Devices": [],
                "MaskedPaths": list(MASKED),
                "Namespaces": [{"Path": "", "Type": "ipc"}, {"Path": "", "Type": "mount"}],
                "ReadonlyPaths": ["/proc/bus", "/proc/sys"],
                "Sysctl": {},
            },
            "Mounts": [*STANDARD_MOUNTS, *kubelet_mounts(cid), *mounts],
            "Process": {
                "Args": list(args),
                "Capabilities": {
                    k: [] for k in ("Ambient", "Bounding", "Effective", "Inheritable", "Permitted")
                },
                "Cwd": "/",
                "Env": list(env),
                "NoNewPrivileges": True,
                "Terminal": False,
                "User": {"AdditionalGids": [65532], "GID": 65532, "UID": uid, "Username": ""},
            },
            "Root": {"Path": f"/run/kata-containers/{cid}/rootfs", "Readonly": read_only_root},
            "Version": "1.1.0",
        },
        "container_id": cid,
        "exec_id": cid,
        "devices": [],
        "sandbox_pidns": False,
        "shared_mounts": [],
        "storages": list(storages),
        "string_user": None,
    }


def exec_process(container_id: str, args: Sequence[str]) -> dict[str, Any]:
    return {
        "container_id": container_id,
        "exec_id": "e1",
        "process": {"Args": list(args), "Cwd": "/", "Env": [], "Terminal": True},
    }


def agent_allows(
    policy: KataPolicy, endpoint: str, request: Mapping[str, Any], v0: bool = False
) -> bool:
    """The agent's decision: `data.agent_policy.<endpoint>` must give exactly one boolean, and
    it must be true (an undefined rule is an error, which refuses the call)."""
    engine = regorus.Engine()
    if v0:
        engine.set_rego_v0(True)
    engine.add_policy("agent_policy", policy.rego)
    engine.set_input_json(json.dumps(request))
    results = engine.eval_query(f"data.agent_policy.{endpoint}")["result"]
    if len(results) != 1 or len(results[0]["expressions"]) != 1:
        return False
    value = results[0]["expressions"][0]["value"]
    return value is True
