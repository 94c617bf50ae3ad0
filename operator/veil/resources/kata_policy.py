"""A measured Kata agent policy for a pod that runs on a Confidential Containers runtime class.

The policy is Rego text in the pod annotation `io.katacontainers.config.agent.policy` (base64).
The kata agent inside the TEE evaluates it for every call the untrusted host makes to it, and the
policy is bound to the TEE's measurement, so a host that edits it changes what attestation shows:
    AKS (Kata confidential containers): SEV-SNP HOST_DATA = sha256(policy text); the agent
        re-checks that digest on SetPolicy (sha384 against TDX MRCONFIGID on TDX).
    upstream CoCo: the policy travels inside an init-data document whose digest is bound to
        HOST_DATA / MRCONFIGID instead (see `kata_claims.init_data`).

What the generated policy admits (the rest is refused; see kata_rules for the call list):
- CreateContainer, only for the pod's own containers: the CRI container name, the image exactly
  as the pod spec names it (a digest is required unless `require_digests=False`), the exact argv
  kubelet and containerd derive (command/args, else the image's entrypoint/cmd), the exact
  environment (image env overlaid with the spec's literal env) plus the Kubernetes service
  variables and HOSTNAME that kubelet always adds, the spec's user, capabilities, read-only root,
  no-new-privileges and working directory, and only these mounts: the runtime's standard ones,
  kubelet's /etc/hosts, /etc/hostname, /etc/resolv.conf, termination log and /dev/shm, and the
  spec's volumeMounts at their paths with their read-only flag. No hooks, devices or sysctls.
  The image must be pulled inside the guest (`image_guest_pull` storage of that very image).
- The sandbox (pause) container with `/pause`, only the standard mounts, from the pinned pause
  images when it is pulled in the guest.
- CopyFile only for the files kubelet shares into the guest: hosts, hostname, resolv.conf,
  termination log, and the spec's configMap/secret/projected volumes (contents NOT measured:
  Veil mounts none that carries code).
- ReadStream (container stdout/stderr, for `kubectl logs`). Exec, stdin, SetPolicy: refused.

Pure and deterministic: the same pod spec and images give the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from veil.resources.kata_rules import ALLOWED_CALLS, CHECKED_CALLS, DENIED_CALLS, RULES

POLICY_ANNOTATION: Final = "io.katacontainers.config.agent.policy"
# Which sealed model the pod fetches and pins is the one thing the policy leaves to the pod spec:
# the sealed file's digest depends on the key version, whose release policy pins this policy,
# so pinning the digest here would make every re-seal need a new key version, forever. The
# policy still pins that the runtime checks *a* pin before any key is released.
MODEL_REFERENCE_FLAGS: Final = {
    "--uri": r"^(az|https|file)://[^\s]+$",
    "--sha256": r"^[0-9a-f]{64}$",
}
DEFAULT_PATH: Final = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_PAUSE_IMAGES: Final = ("registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.9")
DEFAULT_TERMINATION_LOG: Final = "/dev/termination-log"

_SHARED = r"/run/kata-containers/shared/containers/[^/]+-[0-9a-f]{16}-"
_SANDBOX = r"/run/kata-containers/sandbox/(?:local|ephemeral)/"
_IP = r"[0-9a-fA-F.:\[\]]+"
_PORT = r"[0-9]{1,5}"
# kubelet adds these to every container whatever enableServiceLinks says (the `kubernetes`
# Service of the default namespace), and HOSTNAME comes from the pod name, which a Deployment
# randomises. Their values are the host's to choose; none of them changes what code runs.
ENV_PATTERNS: Final = (
    r"^HOSTNAME=[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$",
    rf"^KUBERNETES_SERVICE_HOST={_IP}$",
    rf"^KUBERNETES_SERVICE_PORT={_PORT}$",
    rf"^KUBERNETES_SERVICE_PORT_HTTPS={_PORT}$",
    rf"^KUBERNETES_PORT=tcp://{_IP}:{_PORT}$",
    rf"^KUBERNETES_PORT_{_PORT}_TCP=tcp://{_IP}:{_PORT}$",
    rf"^KUBERNETES_PORT_{_PORT}_TCP_PROTO=tcp$",
    rf"^KUBERNETES_PORT_{_PORT}_TCP_PORT={_PORT}$",
    rf"^KUBERNETES_PORT_{_PORT}_TCP_ADDR={_IP}$",
)
# The OCI runtime's own mounts (containerd's defaults) and the sandbox's shared memory.
STANDARD_MOUNTS: Final = (
    {"destination": "/proc", "type": "proc", "source": "^proc$"},
    {"destination": "/dev", "type": "tmpfs", "source": "^tmpfs$"},
    {"destination": "/dev/pts", "type": "devpts", "source": "^devpts$"},
    {"destination": "/dev/mqueue", "type": "mqueue", "source": "^mqueue$"},
    {"destination": "/sys", "type": "sysfs", "source": "^sysfs$"},
    {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "^cgroup$"},
    {"destination": "/dev/shm", "type": "bind", "source": "^/run/kata-containers/sandbox/shm$"},
)
_KUBELET_FILES: Final = ("hosts", "hostname", "resolv.conf", "termination-log")
_SHARED_VOLUME_KINDS: Final = ("configMap", "secret", "projected", "downwardAPI")


class KataPolicyError(ValueError):
    """The pod spec cannot be turned into a policy that pins it; the message says why."""


@dataclass(frozen=True)
class ImageConfig:
    """What an image's config contributes to the OCI spec (`docker inspect` Config)."""

    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    env: tuple[str, ...] = (DEFAULT_PATH,)
    working_dir: str = ""


@dataclass(frozen=True)
class KataPolicy:
    """A generated policy: the Rego text, its annotation value and the digests TEEs bind."""

    rego: str
    annotation: str
    sha256: str  # hex; SEV-SNP HOST_DATA on AKS
    sha384: str  # hex; TDX MRCONFIGID
    data: Mapping[str, Any] = field(repr=False)

    def annotations(self) -> dict[str, str]:
        return {POLICY_ANNOTATION: self.annotation}


def _image_config(
    image: str, images: Mapping[str, ImageConfig], require_digests: bool
) -> ImageConfig:
    if require_digests and "@sha256:" not in image:
        raise KataPolicyError(
            f"image {image!r} is not pinned by digest: a tag can be re-pointed after the "
            "policy is measured (pass require_digests=False only for development)"
        )
    config = images.get(image)
    if config is None:
        raise KataPolicyError(
            f"no ImageConfig for {image!r}: its entrypoint and environment are part of what "
            "the policy pins"
        )
    return config


def _strings(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise KataPolicyError(f"{what} must be a list of strings")
    return list(value)


def _argv(container: Mapping[str, Any], image: ImageConfig) -> list[str]:
    # containerd: command replaces ENTRYPOINT; args replace CMD; a command without args drops CMD.
    name = container["name"]
    command = container.get("command")
    args = container.get("args")
    if command is not None:
        argv = _strings(command, f"{name}.command") + (
            _strings(args, f"{name}.args") if args is not None else []
        )
    elif args is not None:
        argv = [*image.entrypoint, *_strings(args, f"{name}.args")]
    else:
        argv = [*image.entrypoint, *image.cmd]
    if not argv:
        raise KataPolicyError(f"container {name} would run no command")
    if any("$(" in arg for arg in argv):
        raise KataPolicyError(f"container {name}: $(VAR) expansion in args is not supported")
    return argv


def _env(container: Mapping[str, Any], image: ImageConfig) -> list[str]:
    name = container["name"]
    if container.get("envFrom"):
        raise KataPolicyError(
            f"container {name}: envFrom values live in the cluster, unmeasured; use literal env"
        )
    merged: dict[str, str] = {}
    for entry in image.env:
        key, _, value = entry.partition("=")
        merged[key] = value
    for variable in container.get("env", []):
        if "value" not in variable or "valueFrom" in variable:
            raise KataPolicyError(
                f"container {name}: env {variable.get('name')!r} must have a literal value"
            )
        merged[variable["name"]] = str(variable["value"])
    return sorted(f"{key}={value}" for key, value in merged.items())


def _security(pod_spec: Mapping[str, Any], container: Mapping[str, Any]) -> dict[str, Any]:
    pod = pod_spec.get("securityContext", {})
    own = container.get("securityContext", {})
    uid = own.get("runAsUser", pod.get("runAsUser"))
    gid = own.get("runAsGroup", pod.get("runAsGroup"))
    if uid is None or gid is None:
        raise KataPolicyError(
            f"container {container['name']}: runAsUser and runAsGroup must be set, else the "
            "image decides who runs"
        )
    caps = own.get("capabilities", {})
    if own.get("privileged"):
        raise KataPolicyError(f"container {container['name']} is privileged")
    if "ALL" not in caps.get("drop", []):
        raise KataPolicyError(f"container {container['name']} must drop ALL capabilities")
    added = sorted(f"CAP_{cap.upper().removeprefix('CAP_')}" for cap in caps.get("add", []))
    return {
        "uid": uid,
        "gid": gid,
        "capabilities": added,
        "no_new_privileges": own.get("allowPrivilegeEscalation") is False,
        "read_only_root": bool(own.get("readOnlyRootFilesystem", False)),
    }


def _volume_kinds(pod_spec: Mapping[str, Any]) -> dict[str, str]:
    kinds: dict[str, str] = {}
    for volume in pod_spec.get("volumes", []):
        known = [k for k in ("emptyDir", *_SHARED_VOLUME_KINDS) if k in volume]
        if not known:
            raise KataPolicyError(
                f"volume {volume['name']!r}: only emptyDir, configMap, secret, projected and "
                "downwardAPI volumes can be pinned (host paths and disks are the host's)"
            )
        kinds[volume["name"]] = known[0]
    return kinds


def _mounts(container: Mapping[str, Any], kinds: Mapping[str, str]) -> list[dict[str, Any]]:
    log = container.get("terminationMessagePath", DEFAULT_TERMINATION_LOG)
    files = {"/etc/hosts": "hosts", "/etc/hostname": "hostname", "/etc/resolv.conf": "resolv.conf"}
    files[log] = "termination-log"
    mounts = [
        {"destination": path, "source": f"^{_SHARED}{re.escape(name)}$", "read_only": False}
        for path, name in sorted(files.items())
    ]
    for mount in container.get("volumeMounts", []):
        volume = mount["name"]
        if volume not in kinds:
            raise KataPolicyError(f"container {container['name']} mounts unknown volume {volume}")
        if mount.get("subPath") or mount.get("subPathExpr"):
            raise KataPolicyError(f"container {container['name']}: subPath mounts are refused")
        prefix = _SANDBOX if kinds[volume] == "emptyDir" else _SHARED
        alternatives = f"(?:{_SANDBOX}|{_SHARED})" if kinds[volume] == "emptyDir" else prefix
        mounts.append(
            {
                "destination": mount["mountPath"],
                "source": f"^{alternatives}{re.escape(volume)}$",
                "read_only": bool(mount.get("readOnly", False)),
            }
        )
    return sorted(mounts, key=lambda m: (m["destination"], m["source"]))


def _container(
    pod_spec: Mapping[str, Any],
    container: Mapping[str, Any],
    images: Mapping[str, ImageConfig],
    kinds: Mapping[str, str],
    require_digests: bool,
) -> dict[str, Any]:
    image = container["image"]
    config = _image_config(image, images, require_digests)
    mounted = {m["name"] for m in container.get("volumeMounts", [])}
    argv = _argv(container, config)
    patterns = _arg_patterns(argv)
    return {
        "name": container["name"],
        "image": image,
        # Model-reference values are left out, so re-sealing does not move the measurement.
        "args": [
            arg if pattern is None else "" for arg, pattern in zip(argv, patterns, strict=True)
        ],
        "arg_patterns": patterns,
        "env": _env(container, config),
        "cwd": container.get("workingDir") or config.working_dir or "/",
        "mounts": _mounts(container, kinds),
        "empty_dirs": sorted(v for v in mounted if kinds.get(v) == "emptyDir"),
        **_security(pod_spec, container),
    }


def _arg_patterns(argv: Sequence[str]) -> list[str | None]:
    """None (the argument is pinned exactly) except the values of MODEL_REFERENCE_FLAGS."""
    patterns: list[str | None] = [None] * len(argv)
    for index, arg in enumerate(argv[:-1]):
        if arg in MODEL_REFERENCE_FLAGS:
            patterns[index + 1] = MODEL_REFERENCE_FLAGS[arg]
    return patterns


def _copy_file_paths(kinds: Mapping[str, str]) -> list[str]:
    names = [re.escape(n) for n in _KUBELET_FILES]
    shared = sorted(re.escape(v) for v, kind in kinds.items() if kind in _SHARED_VOLUME_KINDS)
    patterns = [f"^{_SHARED}(?:{'|'.join(names)})$"]
    if shared:
        patterns.append(f"^{_SHARED}(?:{'|'.join(shared)})(?:/[^/]+)*$")
    return patterns


def policy_data(
    pod_spec: Mapping[str, Any],
    *,
    images: Mapping[str, ImageConfig],
    namespace: str = "",
    pause_images: Sequence[str] = DEFAULT_PAUSE_IMAGES,
    require_digests: bool = True,
) -> dict[str, Any]:
    """The per-pod data the rules check requests against (JSON-serialisable)."""
    kinds = _volume_kinds(pod_spec)
    containers = [*pod_spec.get("initContainers", []), *pod_spec.get("containers", [])]
    if not containers:
        raise KataPolicyError("the pod has no containers")
    names = [c["name"] for c in containers]
    if len(set(names)) != len(names):
        raise KataPolicyError("container names must be unique")
    return {
        "namespace": namespace,
        "containers": [
            _container(pod_spec, c, images, kinds, require_digests)
            for c in sorted(containers, key=lambda c: str(c["name"]))
        ],
        "sandbox": {"args": ["/pause"], "env": [DEFAULT_PATH], "images": sorted(pause_images)},
        "standard_mounts": list(STANDARD_MOUNTS),
        "env_patterns": list(ENV_PATTERNS),
        "copy_file_paths": _copy_file_paths(kinds),
    }


def render(data: Mapping[str, Any]) -> str:
    """The full Rego text for `data`: package, imports, call defaults, rules, data."""
    lines = [
        "# Generated by Veil (veil.resources.kata_policy). Measured: do not edit.",
        "package agent_policy",
        "",
        "import future.keywords.every",
        "import future.keywords.if",
        "import future.keywords.in",
        "",
    ]
    lines += [f"default {call} := true" for call in ALLOWED_CALLS]
    lines += [f"default {call} := false" for call in (*DENIED_CALLS, *CHECKED_CALLS)]
    body = json.dumps(data, sort_keys=True, indent=1, ensure_ascii=True)
    return "\n".join(lines) + "\n" + RULES + "\npolicy_data := " + body + "\n"


def from_rego(rego: str, data: Mapping[str, Any] | None = None) -> KataPolicy:
    """Wrap Rego text with its annotation value and digests."""
    raw = rego.encode("utf-8")
    return KataPolicy(
        rego=rego,
        annotation=base64.b64encode(raw).decode("ascii"),
        sha256=hashlib.sha256(raw).hexdigest(),
        sha384=hashlib.sha384(raw).hexdigest(),
        data=dict(data or {}),
    )


def agent_policy(
    pod_spec: Mapping[str, Any],
    *,
    images: Mapping[str, ImageConfig],
    namespace: str = "",
    pause_images: Sequence[str] = DEFAULT_PAUSE_IMAGES,
    require_digests: bool = True,
) -> KataPolicy:
    """The restrictive agent policy for `pod_spec` (a PodSpec, e.g. a Deployment's template).

    `images` maps each image reference used by the spec to its config; `namespace`, when given,
    pins the pod's namespace. Raises KataPolicyError for what cannot be pinned.
    """
    data = policy_data(
        pod_spec,
        images=images,
        namespace=namespace,
        pause_images=pause_images,
        require_digests=require_digests,
    )
    return from_rego(render(data), data)
