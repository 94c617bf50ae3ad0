"""The generated Kata agent policy, evaluated by a real Rego engine (regorus) on requests shaped
as the kata agent passes them: Veil's own containers start, an attacker's variations do not."""

from __future__ import annotations

import base64
import copy
import hashlib
from typing import Any

import pytest

from tests.unit.resources.agent_requests import (
    SERVICE_ENV,
    agent_allows,
    bind,
    create_container,
    exec_process,
    shared,
)
from veil.resources.kata_policy import (
    POLICY_ANNOTATION,
    ImageConfig,
    KataPolicy,
    KataPolicyError,
    agent_policy,
)

RUNTIME = "ghcr.io/veil-dev/veil@sha256:" + "1" * 64
SKR = "mcr.microsoft.com/aci/skr@sha256:" + "2" * 64
OTHER = "ghcr.io/attacker/veil@sha256:" + "3" * 64
RUNTIME_PATH = "PATH=/opt/veil-app/bin:/opt/veil/bin:/usr/bin:/bin"
IMAGES = {
    RUNTIME: ImageConfig(entrypoint=("veil",), cmd=("--help",), env=(RUNTIME_PATH,)),
    SKR: ImageConfig(entrypoint=("/skr.sh",)),
}
SERVE_ARGS = ["serve", "--model-name", "m", "--sealed", "/var/run/veil/sealed/model.onnx.sealed"]
FETCH_ARGS = ["fetch", "--uri", "az://models/m.onnx.sealed", "--output", "/s/model.onnx.sealed"]
RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}
EMPTY_DIR_SEALED = "/run/kata-containers/sandbox/local/sealed"
EMPTY_DIR_TMP = "/run/kata-containers/sandbox/ephemeral/tmp"


def pod_spec() -> dict[str, Any]:
    """The shape Veil's model Deployment has on a coco runtime class."""
    return {
        "runtimeClassName": "kata-qemu-snp",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532},
        "initContainers": [
            {
                "name": "fetch-sealed-model",
                "image": RUNTIME,
                "args": FETCH_ARGS,
                "volumeMounts": [{"name": "sealed", "mountPath": "/var/run/veil/sealed"}],
                "securityContext": RESTRICTED,
            },
            {
                "name": "key-release",
                "image": SKR,
                "restartPolicy": "Always",
                "env": [{"name": "Port", "value": "8080"}],
                "securityContext": RESTRICTED,
            },
        ],
        "containers": [
            {
                "name": "runtime",
                "image": RUNTIME,
                "args": SERVE_ARGS,
                "env": [{"name": "VEIL_LOG", "value": "info"}],
                "volumeMounts": [
                    {"name": "sealed", "mountPath": "/var/run/veil/sealed", "readOnly": True},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
                "securityContext": RESTRICTED,
            }
        ],
        "volumes": [
            {"name": "sealed", "emptyDir": {"sizeLimit": "2Gi"}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
        ],
    }


@pytest.fixture(scope="module")
def policy() -> KataPolicy:
    return agent_policy(pod_spec(), images=IMAGES, namespace="ns")


def runtime_request(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "name": "runtime",
        "image": RUNTIME,
        "args": ["veil", *SERVE_ARGS],
        "env": [RUNTIME_PATH, "VEIL_LOG=info", *SERVICE_ENV],
        "mounts": [
            bind("/var/run/veil/sealed", EMPTY_DIR_SEALED, read_only=True),
            bind("/tmp", EMPTY_DIR_TMP),
        ],
        "storages": [
            {"driver": "image_guest_pull", "source": RUNTIME, "mount_point": "/r/rootfs"},
            {"driver": "local", "source": "local", "mount_point": EMPTY_DIR_SEALED},
            {"driver": "ephemeral", "source": "tmpfs", "mount_point": EMPTY_DIR_TMP},
        ],
    }
    values.update(changes)
    return create_container(**values)


def fetcher_request() -> dict[str, Any]:
    return create_container(
        name="fetch-sealed-model",
        image=RUNTIME,
        args=["veil", *FETCH_ARGS],
        env=[RUNTIME_PATH, *SERVICE_ENV],
        mounts=[bind("/var/run/veil/sealed", EMPTY_DIR_SEALED)],
    )


def sidecar_request() -> dict[str, Any]:
    path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    return create_container(
        name="key-release", image=SKR, args=["/skr.sh"], env=[path, "Port=8080", *SERVICE_ENV]
    )


def sandbox_request() -> dict[str, Any]:
    path = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    request = create_container(
        name="pause",
        image="",
        args=["/pause"],
        env=[path],
        container_type="sandbox",
        storages=[],
    )
    request["OCI"]["Mounts"] = [m for m in request["OCI"]["Mounts"] if m["type_"] != "bind"]
    return request


# -- what Veil's pod needs -------------------------------------------------------------------


@pytest.mark.parametrize("v0", [False, True], ids=["rego-v1", "rego-v0"])
def test_the_pods_own_containers_are_created(policy: KataPolicy, v0: bool) -> None:
    for request in (runtime_request(), fetcher_request(), sidecar_request(), sandbox_request()):
        assert agent_allows(policy, "CreateContainerRequest", request, v0=v0)


def test_lifecycle_and_logs_are_allowed(policy: KataPolicy) -> None:
    for endpoint in ("StartContainerRequest", "WaitProcessRequest", "RemoveContainerRequest"):
        assert agent_allows(policy, endpoint, {"container_id": "runtime-cid"})
    assert agent_allows(policy, "ReadStreamRequest", {"container_id": "runtime-cid", "len": 4096})
    assert agent_allows(policy, "CreateSandboxRequest", {"hostname": "", "storages": []})


def test_kubelet_files_may_be_copied_in(policy: KataPolicy) -> None:
    for name in ("hosts", "hostname", "resolv.conf", "termination-log"):
        assert agent_allows(policy, "CopyFileRequest", {"path": shared("runtime-cid", name)})


# -- what an attacker on the host tries ----------------------------------------------------------


def test_another_image_is_refused(policy: KataPolicy) -> None:
    request = runtime_request(image=OTHER)
    assert not agent_allows(policy, "CreateContainerRequest", request)
    # The CRI annotation naming the right image does not help if the guest pulls another.
    request = runtime_request()
    request["storages"][0]["source"] = OTHER
    assert not agent_allows(policy, "CreateContainerRequest", request)


def test_a_rootfs_not_pulled_in_the_guest_is_refused(policy: KataPolicy) -> None:
    request = runtime_request(storages=[])
    assert not agent_allows(policy, "CreateContainerRequest", request)


@pytest.mark.parametrize(
    "args",
    [
        ["veil", *SERVE_ARGS, "--debug-dump-key"],
        ["/bin/sh", "-c", "cat /proc/self/environ", *SERVE_ARGS],
        SERVE_ARGS,
    ],
    ids=["extra-arg", "shell", "no-entrypoint"],
)
def test_changed_args_are_refused(policy: KataPolicy, args: list[str]) -> None:
    assert not agent_allows(policy, "CreateContainerRequest", runtime_request(args=args))


def test_an_extra_privileged_mount_is_refused(policy: KataPolicy) -> None:
    request = runtime_request()
    request["OCI"]["Mounts"].append(bind("/host", "/"))
    assert not agent_allows(policy, "CreateContainerRequest", request)


def test_a_volume_from_elsewhere_or_writable_is_refused(policy: KataPolicy) -> None:
    escaped = runtime_request()
    escaped["OCI"]["Mounts"][-2] = bind(
        "/var/run/veil/sealed", "/run/kata-containers/sandbox/local/../../shared", True
    )
    assert not agent_allows(policy, "CreateContainerRequest", escaped)
    writable = runtime_request()
    writable["OCI"]["Mounts"][-2] = bind("/var/run/veil/sealed", EMPTY_DIR_SEALED)
    assert not agent_allows(policy, "CreateContainerRequest", writable)


def test_an_extra_container_is_refused(policy: KataPolicy) -> None:
    request = runtime_request(name="debug")
    assert not agent_allows(policy, "CreateContainerRequest", request)


def test_environment_injection_is_refused(policy: KataPolicy) -> None:
    injected = runtime_request()
    injected["OCI"]["Process"]["Env"].append("LD_PRELOAD=/tmp/evil.so")
    assert not agent_allows(policy, "CreateContainerRequest", injected)
    dropped = runtime_request()
    dropped["OCI"]["Process"]["Env"].remove("VEIL_LOG=info")
    assert not agent_allows(policy, "CreateContainerRequest", dropped)


def test_privilege_changes_are_refused(policy: KataPolicy) -> None:
    root = runtime_request(uid=0)
    assert not agent_allows(policy, "CreateContainerRequest", root)
    caps = runtime_request()
    caps["OCI"]["Process"]["Capabilities"]["Bounding"] = ["CAP_SYS_ADMIN"]
    assert not agent_allows(policy, "CreateContainerRequest", caps)
    escalation = runtime_request()
    escalation["OCI"]["Process"]["NoNewPrivileges"] = False
    assert not agent_allows(policy, "CreateContainerRequest", escalation)
    writable_root = runtime_request(read_only_root=False)
    assert not agent_allows(policy, "CreateContainerRequest", writable_root)
    unmasked = runtime_request()
    unmasked["OCI"]["Linux"]["MaskedPaths"] = []
    assert not agent_allows(policy, "CreateContainerRequest", unmasked)


def test_hooks_and_devices_are_refused(policy: KataPolicy) -> None:
    hooked = runtime_request()
    hooked["OCI"]["Hooks"] = {"Prestart": [{"Path": "/bin/sh", "Args": ["sh", "-c", "x"]}]}
    assert not agent_allows(policy, "CreateContainerRequest", hooked)
    device = runtime_request()
    device["OCI"]["Linux"]["Devices"] = [{"Path": "/dev/mem", "Type": "c"}]
    assert not agent_allows(policy, "CreateContainerRequest", device)


def test_another_namespace_is_refused(policy: KataPolicy) -> None:
    assert not agent_allows(policy, "CreateContainerRequest", runtime_request(namespace="evil"))


def test_a_sandbox_from_another_image_is_refused(policy: KataPolicy) -> None:
    request = sandbox_request()
    request["storages"] = [{"driver": "image_guest_pull", "source": OTHER, "mount_point": "/p"}]
    assert not agent_allows(policy, "CreateContainerRequest", request)
    shell = sandbox_request()
    shell["OCI"]["Process"]["Args"] = ["/bin/sh"]
    assert not agent_allows(policy, "CreateContainerRequest", shell)


def test_exec_into_the_runtime_is_refused(policy: KataPolicy) -> None:
    for args in (["sh"], ["cat", "/proc/1/environ"]):
        assert not agent_allows(policy, "ExecProcessRequest", exec_process("runtime-cid", args))


def test_set_policy_and_host_influence_are_refused(policy: KataPolicy) -> None:
    allow_all = "package agent_policy\ndefault CreateContainerRequest := true\n"
    assert not agent_allows(policy, "SetPolicyRequest", {"policy": allow_all})
    for endpoint in ("WriteStreamRequest", "SetGuestDateTimeRequest", "StartTracingRequest"):
        assert not agent_allows(policy, endpoint, {})
    # Calls the policy does not name are errors for the agent, so refused; and failures are not
    # turned into allowances.
    assert not agent_allows(policy, "SomeFutureRequest", {})
    assert not agent_allows(policy, "AllowRequestsFailingPolicy", {})


def test_copy_file_outside_kubelets_files_is_refused(policy: KataPolicy) -> None:
    for path in (
        "/run/kata-containers/runtime-cid/rootfs/opt/veil/bin/veil",
        shared("runtime-cid", "hosts/../../runtime-cid/rootfs/etc/passwd"),
        shared("runtime-cid", "authorized_keys"),
    ):
        assert not agent_allows(policy, "CopyFileRequest", {"path": path})


def test_a_sandbox_with_guest_hooks_is_refused(policy: KataPolicy) -> None:
    request = {"guest_hook_path": "/usr/share/oci/hooks", "storages": []}
    assert not agent_allows(policy, "CreateSandboxRequest", request)


# -- the generated bytes ---------------------------------------------------------------------


def test_annotation_and_digests_describe_the_same_bytes(policy: KataPolicy) -> None:
    raw = policy.rego.encode()
    assert base64.b64decode(policy.annotation) == raw
    assert policy.sha256 == hashlib.sha256(raw).hexdigest()
    assert policy.sha384 == hashlib.sha384(raw).hexdigest()
    assert policy.annotations() == {POLICY_ANNOTATION: policy.annotation}


def test_same_spec_same_bytes_and_any_change_moves_the_digest(policy: KataPolicy) -> None:
    again = agent_policy(pod_spec(), images=IMAGES, namespace="ns")
    assert again.rego == policy.rego
    changed = pod_spec()
    changed["containers"][0]["args"] = [*SERVE_ARGS, "--port", "9000"]
    assert agent_policy(changed, images=IMAGES, namespace="ns").sha256 != policy.sha256


def _spec_with(change: str) -> dict[str, Any]:
    spec = copy.deepcopy(pod_spec())
    runtime = spec["containers"][0]
    if change == "tag":
        runtime["image"] = "ghcr.io/veil-dev/veil:1.0"
    elif change == "unknown-image":
        runtime["image"] = OTHER
    elif change == "envFrom":
        runtime["envFrom"] = [{"secretRef": {"name": "azure"}}]
    elif change == "hostPath":
        spec["volumes"].append({"name": "host", "hostPath": {"path": "/"}})
    elif change == "privileged":
        runtime["securityContext"] = {**RESTRICTED, "privileged": True}
    elif change == "caps-kept":
        runtime["securityContext"] = {**RESTRICTED, "capabilities": {}}
    return spec


@pytest.mark.parametrize(
    "change", ["tag", "unknown-image", "envFrom", "hostPath", "privileged", "caps-kept"]
)
def test_what_cannot_be_pinned_is_refused_at_generation(change: str) -> None:
    with pytest.raises(KataPolicyError):
        agent_policy(_spec_with(change), images=IMAGES)
