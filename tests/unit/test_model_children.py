"""ConfidentialModel children: placement per isolation mode, restricted pods, lockdown."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_coco_model import CONFIG as COCO_CONFIG
from veil.api.confidential_model import ConfidentialModel
from veil.config import OperatorConfig
from veil.kube.drift import contains, first_difference
from veil.resources import confidential_model as build

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
GOLDEN = Path(__file__).resolve().parent / "golden"


def _owner(example: str, **spec_changes: Any) -> tuple[dict[str, Any], ConfidentialModel]:
    document = yaml.safe_load((EXAMPLES / example / "model.yaml").read_text())
    document["spec"].update(spec_changes)
    document["metadata"]["uid"] = "00000000-1111-2222-3333-444444444444"
    return document, ConfidentialModel.model_validate(document)


def _by_kind(children: build.Children) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for manifest in children.apply:
        out.setdefault(manifest["kind"], []).append(manifest)
    return out


def _pod(children: build.Children) -> dict[str, Any]:
    pod: dict[str, Any] = _by_kind(children)["Deployment"][0]["spec"]["template"]["spec"]
    return pod


def test_confidential_vm_is_pinned_and_tolerated() -> None:
    owner, model = _owner("confidential-model-cvm")
    pod = _pod(build.children(owner, model.spec, OperatorConfig()))
    assert pod["nodeSelector"] == {"kubernetes.azure.com/security-type": "ConfidentialVM"}
    assert pod["tolerations"][0]["key"] == "veil.dev/confidential"
    assert "runtimeClassName" not in pod


def test_confidential_aci_gets_virtual_node_and_cce_policy() -> None:
    owner, model = _owner("confidential-model-aci")
    children = build.children(owner, model.spec, OperatorConfig())
    template = _by_kind(children)["Deployment"][0]["spec"]["template"]
    assert template["spec"]["nodeSelector"] == {"virtualization": "virtualnode2"}
    assert template["spec"]["tolerations"][0]["key"] == "virtual-kubelet.io/provider"
    policy = template["metadata"]["annotations"][
        "microsoft.containerinstance.virtualnode.ccepolicy"
    ]
    assert policy == model.spec.tee.cce_policy


def test_coco_uses_the_runtime_class() -> None:
    owner, model = _owner(
        "confidential-model-cvm",
        tee={"isolation": "coco", "platform": "sevsnp", "runtimeClassName": "kata-qemu-snp"},
    )
    pod = _pod(build.children(owner, model.spec, COCO_CONFIG))
    assert pod["runtimeClassName"] == "kata-qemu-snp"
    assert "nodeSelector" not in pod


@pytest.mark.parametrize("example", ["confidential-model-cvm", "confidential-model-aci"])
def test_every_container_meets_restricted_pod_security(example: str) -> None:
    owner, model = _owner(example)
    pod = _pod(build.children(owner, model.spec, OperatorConfig()))
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod["initContainers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}


def test_on_aci_the_runtime_waits_for_the_model_and_asks_the_sidecar_for_the_key() -> None:
    owner, model = _owner("confidential-model-aci")
    pod = _pod(build.children(owner, model.spec, OperatorConfig()))
    runtime = pod["containers"][0]
    assert runtime["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    args = runtime["args"]
    # The sidecar builds https://{akv}/keys/{kid}/release: a key name (the runtime adds the
    # version its sealed header names), never a full id; the endpoint is a bare host.
    assert args[args.index("--kid") + 1] == model.spec.key_release.key_name
    assert "://" not in args[args.index("--akv-endpoint") + 1]
    assert args[args.index("--sidecar") + 1] == "http://127.0.0.1:8080"
    # The runtime checks the sealed file against the pin before it asks for any key.
    assert model.spec.model is not None
    assert args[args.index("--sha256") + 1] == model.spec.model.sha256
    sidecar = next(c for c in pod["initContainers"] if c["name"] == "key-release")
    assert sidecar["restartPolicy"] == "Always"
    # Every request names its key; SkrSideCarArgs is the sidecar's own configuration.
    assert sidecar["env"] == [{"name": "Port", "value": "8080"}]
    fetch = next(c for c in pod["initContainers"] if c["name"] == "fetch-sealed-model")
    assert fetch["args"][-2:] == ["--report-sealed-key", "/dev/termination-log"]
    # A policy change does not roll the pods: the model stays sealed to its version.
    annotations = _by_kind(build.children(owner, model.spec, OperatorConfig()))["Deployment"][0][
        "spec"
    ]["template"]["metadata"]["annotations"]
    assert "veil.dev/model-sha256" in annotations
    assert not any("policy" in name and "sha256" in name for name in annotations)


def test_on_a_confidential_vm_the_node_agent_releases_and_no_sidecar_is_injected() -> None:
    owner, model = _owner("confidential-model-cvm")
    config = OperatorConfig()
    children = build.children(owner, model.spec, config)
    pod = _pod(children)
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-sealed-model"]
    args = pod["containers"][0]["args"]
    assert "--sidecar" not in args
    assert args[args.index("--node-agent") + 1] == config.node_agent.url
    assert args[args.index("--akv-endpoint") + 1] == "veil-demo.vault.azure.net"
    token = next(v for v in pod["volumes"] if v["name"] == "node-agent-token")
    source = token["projected"]["sources"][0]["serviceAccountToken"]
    assert source["audience"] == "veil-node-agent"
    assert source["expirationSeconds"] <= 3600
    assert pod["automountServiceAccountToken"] is False  # only the agent's token is mounted
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["node-agent-token"]["readOnly"] is True
    allow = _by_kind(children)["NetworkPolicy"][1]
    to_agent = next(r for r in allow["spec"]["egress"] if r["ports"][0].get("port") == 8095)
    assert to_agent["to"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": config.node_agent.namespace
    }
    assert to_agent["ports"] == [{"protocol": "TCP", "port": 8095}]


def test_network_is_default_deny_plus_allow_list() -> None:
    owner, model = _owner("confidential-model-cvm")
    policies = _by_kind(build.children(owner, model.spec, OperatorConfig()))["NetworkPolicy"]
    deny, allow = policies
    assert deny["spec"]["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny["spec"]
    assert "egress" not in deny["spec"]
    ingress = allow["spec"]["ingress"][0]
    assert ingress["ports"] == [{"protocol": "TCP", "port": 8000}]
    assert ingress["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "clinical-apps"
    }
    egress_ports = [rule["ports"] for rule in allow["spec"]["egress"]]
    assert {"protocol": "UDP", "port": 53} in egress_ports[0]
    assert allow["spec"]["egress"][-1]["to"] == [{"ipBlock": {"cidr": "20.49.97.0/24"}}]


def test_fqdn_egress_adds_a_cilium_policy_and_single_replica_drops_the_pdb() -> None:
    owner, model = _owner("confidential-model-aci")
    children = build.children(owner, model.spec, OperatorConfig())
    kinds = _by_kind(children)
    fqdns = kinds["CiliumNetworkPolicy"][0]["spec"]["egress"][1]["toFQDNs"]
    assert {"matchName": "veil-fraud.managedhsm.azure.net"} in fqdns
    assert "PodDisruptionBudget" not in kinds
    assert ("policy/v1", "PodDisruptionBudget", "fraud-scorer") in children.absent


def test_every_child_is_owned_and_labelled() -> None:
    owner, model = _owner("confidential-model-cvm")
    for manifest in build.children(owner, model.spec, OperatorConfig()).apply:
        meta = manifest["metadata"]
        assert meta["ownerReferences"][0]["uid"] == owner["metadata"]["uid"]
        assert meta["ownerReferences"][0]["controller"] is True
        assert meta["labels"]["veil.dev/owner-kind"] == "ConfidentialModel"
        assert meta["namespace"] == "veil-cvm"


def test_builders_are_deterministic() -> None:
    owner, model = _owner("confidential-model-cvm")
    first = build.children(owner, model.spec, OperatorConfig())
    second = build.children(owner, model.spec, OperatorConfig())
    assert first == second


@pytest.mark.parametrize("example", ["confidential-model-cvm", "confidential-model-aci"])
def test_children_match_golden_files(example: str) -> None:
    """A CR in, the expected children out (set VEIL_UPDATE_GOLDEN=1 to rewrite)."""
    owner, model = _owner(example)
    rendered = yaml.safe_dump_all(
        build.children(owner, model.spec, OperatorConfig()).apply, sort_keys=True
    )
    golden = GOLDEN / f"{example}.yaml"
    if os.environ.get("VEIL_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(rendered)
    assert rendered == golden.read_text()


def test_drift_ignores_server_defaults_but_sees_edits() -> None:
    desired = {"spec": {"replicas": 2, "template": {"containers": [{"name": "a", "image": "x"}]}}}
    live = {
        "spec": {
            "replicas": 2,
            "revisionHistoryLimit": 10,
            "template": {
                "containers": [{"name": "a", "image": "x", "terminationMessagePath": "/dev/x"}]
            },
        }
    }
    assert contains(live, desired)
    live["spec"]["template"]["containers"][0]["image"] = "y"  # type: ignore[index]
    assert first_difference(live, desired) == ".spec.template.containers[0].image"
    assert first_difference({"spec": {"replicas": 2}}, {"spec": {"replicas": 2.0}}) is None
    assert first_difference({"a": True}, {"a": 1}) == ".a"


def test_drift_compares_resource_quantities_by_amount() -> None:
    """The API server stores quantities canonically: "0.5" CPU reads back as "500m"."""
    desired = {"resources": {"requests": {"cpu": "0.5", "memory": "1024Mi"}, "limits": {"cpu": 2}}}
    live = {"resources": {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"cpu": "2"}}}
    assert contains(live, desired)
    live["resources"]["requests"]["cpu"] = "600m"
    assert first_difference(live, desired) == ".resources.requests.cpu"
    volume = {"emptyDir": {"sizeLimit": "2048Mi"}}
    assert contains({"emptyDir": {"sizeLimit": "2Gi"}}, volume)
    # An empty map Veil applies is dropped by the API server, not drift.
    assert contains({"resources": {"limits": {"cpu": "1"}}}, {"resources": {"requests": {}}})
    # Elsewhere a string is a string: a label "1.0" is not the label "1".
    assert first_difference({"labels": {"v": "1.0"}}, {"labels": {"v": "1"}}) == ".labels.v"


def test_cloud_settings_reach_every_container_of_every_pod_veil_builds() -> None:
    from veil.config import PodSettings
    from veil.resources import synthetic_dataset, training

    config = OperatorConfig(pods=PodSettings(env_secret="cloud-env", trust_bundle="cloud-ca"))
    owner, model = _owner("confidential-model-cvm")
    pods = [_pod(build.children(owner, model.spec, config))]
    synthetic = yaml.safe_load((EXAMPLES / "synthetic-data" / "synthetic.yaml").read_text())
    synthetic["metadata"]["uid"] = "00000000-1111-2222-3333-555555555555"
    pods += [
        child["spec"]["template"]["spec"]
        for child in synthetic_dataset.render_for_review(synthetic, config)
        if child["kind"] == "Job"
    ]
    trainer = yaml.safe_load((EXAMPLES / "dp-training" / "model.yaml").read_text())
    trainer["metadata"]["uid"] = "00000000-1111-2222-3333-666666666666"
    trainer_spec = ConfidentialModel.model_validate(trainer).spec
    pods += [
        child["spec"]["template"]["spec"]
        for child in training.children(trainer, trainer_spec, config)
        if child["kind"] == "Job"
    ]
    assert len(pods) == 3
    for pod in pods:
        assert pod["volumes"][-1]["name"] == "trust-bundle"
        assert pod["volumes"][-1]["configMap"]["name"] == "cloud-ca"
        for container in [*pod.get("initContainers", []), *pod["containers"]]:
            assert {"secretRef": {"name": "cloud-env", "optional": True}} in container["envFrom"]
            env = {item["name"]: item["value"] for item in container["env"]}
            assert env["SSL_CERT_FILE"] == env["REQUESTS_CA_BUNDLE"] == "/etc/veil/trust/ca.crt"
            mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
            assert mounts["trust-bundle"]["readOnly"] is True
    # Without settings nothing is added: the public cloud's pods stay as they were.
    plain = _pod(build.children(owner, model.spec, OperatorConfig()))
    assert all("envFrom" not in c for c in [*plain["initContainers"], *plain["containers"]])


def test_a_kbs_resource_is_released_by_the_guests_data_hub_without_a_sidecar() -> None:
    owner, model = _owner(
        "confidential-model-cvm",
        tee={"isolation": "coco", "platform": "sevsnp", "runtimeClassName": "kata-qemu-snp"},
        keyRelease={"kbsResource": "kbs:///veil/models/cancer-classifier"},
    )
    pod = _pod(build.children(owner, model.spec, COCO_CONFIG))
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-sealed-model"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--cdh-resource") + 1] == "kbs:///veil/models/cancer-classifier"
    assert not {"--sidecar", "--node-agent", "--kid"} & set(args)


@pytest.mark.parametrize(
    ("release", "isolation", "message"),
    [
        ({"kbsResource": "kbs:///r/t/g"}, "confidentialVM", "needs isolation coco"),
        (
            {
                "kbsResource": "kbs:///r/t/g",
                "vaultUrl": "https://v.vault.azure.net",
                "keyName": "k",
                "attestationAuthority": "https://a.attest.azure.net",
            },
            "coco",
            "not both",
        ),
        ({"vaultUrl": "https://v.vault.azure.net"}, "coco", "not both"),
    ],
)
def test_a_key_is_in_key_vault_or_in_a_kbs_not_both(
    release: dict[str, str], isolation: str, message: str
) -> None:
    document = yaml.safe_load((EXAMPLES / "confidential-model-cvm" / "model.yaml").read_text())
    document["spec"]["keyRelease"] = release
    document["spec"]["tee"] = {"isolation": isolation, "runtimeClassName": "kata-qemu-snp"}
    with pytest.raises(ValueError, match=message):
        ConfidentialModel.model_validate(document)
