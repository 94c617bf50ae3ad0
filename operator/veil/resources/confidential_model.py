"""The children of a ConfidentialModel: ServiceAccount, Deployment, Service, NetworkPolicies,
PodDisruptionBudget and, for FQDN egress, a CiliumNetworkPolicy.

Builders are pure: the same owner, spec, key and config always give the same manifests, in
the canonical forms the API server stores (so comparing them with live objects is exact).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from veil import labels
from veil.api.confidential_model import ConfidentialModelSpec, NetworkPeer
from veil.config import OperatorConfig
from veil.resources.common import (
    child_metadata,
    restricted_container_security,
    restricted_pod_security,
    selector_labels,
    with_pod_settings,
    workload_identity_account,
)
from veil.resources.kata_policy import KataPolicy, agent_policy

APP = "veil-model"
SEALED_DIR = "/var/run/veil/sealed"
SEALED_FILE = f"{SEALED_DIR}/model.onnx.sealed"
HTTP_PORT_NAME = "http"
METRICS_PORT_NAME = "metrics"
METRICS_PORT = 9090
AGENT_AUDIENCE = "veil-node-agent"
AGENT_TOKEN_VOLUME = "node-agent-token"
AGENT_TOKEN_DIR = "/var/run/secrets/veil/node-agent"


@dataclass(frozen=True)
class KeyRef:
    """The Key Vault key version that carries the release policy in force: its full id, as Key
    Vault names it, and the version (the pods release the one their sealed header names)."""

    kid: str
    version: str
    # True when the reconcile that asked for it created this version (a new release policy).
    created: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Children:
    """Manifests to apply, and (apiVersion, kind, name) of children that must not exist."""

    apply: list[dict[str, Any]]
    absent: list[tuple[str, str, str]]


def _maa_endpoint(spec: ConfidentialModelSpec) -> str:
    # The SKR sidecar takes the attestation host without a scheme.
    return urlparse(spec.key_release.key_vault().attestation_authority).netloc


def _akv_endpoint(spec: ConfidentialModelSpec) -> str:
    return urlparse(spec.key_release.key_vault().vault_url).netloc


def _release_kid(spec: ConfidentialModelSpec) -> str:
    # The SKR sidecar puts `kid` into https://{akv_endpoint}/keys/{kid}/release: a key name
    # (or name/version), never a full key id (a URL there breaks the path). The runtime adds
    # the version the sealed model's header names: a policy change makes a new version, and
    # the model is wrapped to the old one until it is re-sealed.
    return spec.key_release.key_vault().key_name


def service_account(owner: Mapping[str, Any], spec: ConfidentialModelSpec) -> dict[str, Any]:
    annotations = {}
    if spec.key_release.workload_identity_client_id:
        annotations[labels.WORKLOAD_IDENTITY_CLIENT_ID] = (
            spec.key_release.workload_identity_client_id
        )
    return workload_identity_account(owner, owner["metadata"]["name"], APP, annotations)


def _placement(spec: ConfidentialModelSpec) -> dict[str, Any]:
    tee = spec.tee
    if tee.isolation == "confidentialVM":
        return {
            "nodeSelector": {labels.CVM_SECURITY_TYPE_LABEL: labels.CVM_SECURITY_TYPE},
            "tolerations": [
                {"key": labels.CONFIDENTIAL_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
            ],
        }
    if tee.isolation == "confidentialACI":
        return {
            "nodeSelector": dict(labels.ACI_NODE_SELECTOR),
            "tolerations": [
                {"key": labels.ACI_TOLERATION_KEY, "operator": "Exists", "effect": "NoSchedule"}
            ],
        }
    return {"runtimeClassName": tee.runtime_class_name}


def _key_release_sidecar(config: OperatorConfig) -> dict[str, Any]:
    # The runtime sends maa_endpoint, akv_endpoint and kid with every request, as the sidecar
    # requires; SkrSideCarArgs would configure the sidecar's certificate cache, which ACI
    # provides through the UVM_* environment instead.
    return {
        "name": "key-release",
        "image": config.images.key_release,
        # A native sidecar: started before the runtime, stopped after it.
        "restartPolicy": "Always",
        "env": [{"name": "Port", "value": str(config.key_release_port)}],
        "ports": [{"name": "skr", "containerPort": config.key_release_port, "protocol": "TCP"}],
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "200m", "memory": "128Mi"},
        },
        "securityContext": restricted_container_security(),
    }


def _uses_node_agent(spec: ConfidentialModelSpec) -> bool:
    # A confidential VM attests with its vTPM, which only the node agent may use: Microsoft's
    # SKR sidecar has no CVM support (it would send a fake SEV-SNP report).
    return spec.tee.isolation == "confidentialVM"


def _uses_sidecar(spec: ConfidentialModelSpec) -> bool:
    return not _uses_node_agent(spec) and spec.key_release.kbs_resource is None


def _key_source(spec: ConfidentialModelSpec, config: OperatorConfig) -> list[str]:
    """The runtime's flags for where its key comes from."""
    if spec.key_release.kbs_resource is not None:
        # The guest's Confidential Data Hub, on the pod's loopback inside the TEE.
        return ["--cdh-resource", spec.key_release.kbs_resource]
    if _uses_node_agent(spec):
        source = [
            "--node-agent",
            config.node_agent.url,
            "--node-agent-token",
            f"{AGENT_TOKEN_DIR}/token",
        ]
    else:
        source = ["--sidecar", f"http://127.0.0.1:{config.key_release_port}"]
    return [
        *source,
        "--maa-endpoint",
        _maa_endpoint(spec),
        "--akv-endpoint",
        _akv_endpoint(spec),
        "--kid",
        _release_kid(spec),
    ]


def _agent_token_volume() -> dict[str, Any]:
    """A short-lived token for the node agent only: it proves which pod asks (TokenReview), and
    is useless against the API server or anything else (its audience)."""
    return {
        "name": AGENT_TOKEN_VOLUME,
        "projected": {
            "sources": [
                {
                    "serviceAccountToken": {
                        "audience": AGENT_AUDIENCE,
                        "expirationSeconds": 3600,
                        "path": "token",
                    }
                }
            ]
        },
    }


def _fetcher(spec: ConfidentialModelSpec, config: OperatorConfig) -> dict[str, Any]:
    assert spec.model is not None
    return {
        "name": "fetch-sealed-model",
        "image": config.images.runtime,
        "args": [
            "fetch",
            "--uri",
            spec.model.uri,
            "--sha256",
            spec.model.sha256,
            "--output",
            SEALED_FILE,
            # The header's key id becomes the termination message the operator reads.
            "--report-sealed-key",
            "/dev/termination-log",
        ],
        "volumeMounts": [{"name": "sealed", "mountPath": SEALED_DIR}],
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "500m", "memory": "256Mi"},
        },
        "securityContext": restricted_container_security(),
    }


def _runtime(
    owner: Mapping[str, Any], spec: ConfidentialModelSpec, config: OperatorConfig
) -> dict[str, Any]:
    assert spec.model is not None
    port = spec.serving.port
    probe = {"httpGet": {"path": "/v2/health/ready", "port": HTTP_PORT_NAME}}
    container: dict[str, Any] = {
        "name": "runtime",
        "image": config.images.runtime,
        "args": [
            "serve",
            "--model-name",
            owner["metadata"]["name"],
            "--sealed",
            SEALED_FILE,
            # Checked again here, before any key is released: the file is what the spec pins.
            "--sha256",
            spec.model.sha256,
            *_key_source(spec, config),
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            # Metrics on a port of their own: the inference port serves only the protocol.
            "--metrics-port",
            str(METRICS_PORT),
            # encrypted: a key made in the TEE, bound into its attestation (GET /v2/evidence);
            # plaintext inference is refused.
            "--channel",
            spec.serving.channel_for(spec.tee.isolation),
        ],
        "ports": [
            {"name": HTTP_PORT_NAME, "containerPort": port, "protocol": "TCP"},
            {"name": METRICS_PORT_NAME, "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        # Ready only once the model is released, unwrapped and loaded in memory.
        "readinessProbe": {**probe, "periodSeconds": 5, "failureThreshold": 3},
        "livenessProbe": {
            "httpGet": {"path": "/v2/health/live", "port": HTTP_PORT_NAME},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "startupProbe": {**probe, "periodSeconds": 5, "failureThreshold": 60},
        "volumeMounts": [
            {"name": "sealed", "mountPath": SEALED_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": "/tmp"},
            *(
                [{"name": AGENT_TOKEN_VOLUME, "mountPath": AGENT_TOKEN_DIR, "readOnly": True}]
                if _uses_node_agent(spec)
                else []
            ),
        ],
        "securityContext": restricted_container_security(),
    }
    resources = spec.serving.resources.to_wire()
    if resources:
        container["resources"] = resources
    return container


def _pod_spec(
    owner: Mapping[str, Any], spec: ConfidentialModelSpec, config: OperatorConfig
) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "serviceAccountName": owner["metadata"]["name"],
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": restricted_pod_security(),
        **_placement(spec),
        "initContainers": [
            _fetcher(spec, config),
            *([_key_release_sidecar(config)] if _uses_sidecar(spec) else []),
        ],
        "containers": [_runtime(owner, spec, config)],
        "volumes": [
            {"name": "sealed", "emptyDir": {"sizeLimit": "2Gi"}},
            # Scratch space in memory: nothing the runtime writes reaches a disk.
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
            *([_agent_token_volume()] if _uses_node_agent(spec) else []),
        ],
    }
    return with_pod_settings(pod_spec, config.pods)


def coco_agent_policy(
    owner: Mapping[str, Any], spec: ConfidentialModelSpec, config: OperatorConfig
) -> KataPolicy:
    """The Kata agent policy of a coco model's pods: what the TEE measures (HOST_DATA on
    SEV-SNP, MRCONFIGID on TDX) and the release policy pins. Raises KataPolicyError for a pod
    that cannot be pinned (an image by tag or without its config, env from a Secret...)."""
    return agent_policy(
        _pod_spec(owner, spec, config),
        images=config.image_configs,
        namespace=owner["metadata"]["namespace"],
        require_digests=not config.allow_image_tags,
    )


def deployment(
    owner: Mapping[str, Any], spec: ConfidentialModelSpec, config: OperatorConfig
) -> dict[str, Any]:
    assert spec.model is not None
    name = owner["metadata"]["name"]
    pod_labels = {
        **selector_labels(owner, APP),
        labels.WORKLOAD_IDENTITY_USE: "true",
        labels.OWNER_KIND: owner["kind"],
    }
    # Changing the model rolls the pods. A changed release policy does not: the model stays
    # sealed to the old key version until it is re-sealed, which changes the model's digest.
    pod_annotations = {labels.MODEL_DIGEST: spec.model.sha256}
    if spec.tee.isolation == "confidentialACI" and spec.tee.cce_policy:
        pod_annotations[labels.ACI_CCE_POLICY_ANNOTATION] = spec.tee.cce_policy
    if spec.tee.isolation == "coco":
        pod_annotations.update(coco_agent_policy(owner, spec, config).annotations())
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": child_metadata(owner, name, APP, "inference"),
        "spec": {
            "replicas": spec.serving.replicas,
            "selector": {"matchLabels": selector_labels(owner, APP)},
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
            },
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": _pod_spec(owner, spec, config),
            },
        },
    }


def service(owner: Mapping[str, Any], spec: ConfidentialModelSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": child_metadata(owner, owner["metadata"]["name"], APP, "inference"),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(owner, APP),
            "ports": [
                {
                    "name": HTTP_PORT_NAME,
                    "port": spec.serving.port,
                    "targetPort": HTTP_PORT_NAME,
                    "protocol": "TCP",
                },
                {
                    "name": METRICS_PORT_NAME,
                    "port": METRICS_PORT,
                    "targetPort": METRICS_PORT_NAME,
                    "protocol": "TCP",
                },
            ],
        },
    }


def default_deny(owner: Mapping[str, Any]) -> dict[str, Any]:
    """Selects the model's pods and allows nothing: every allowance is in the allow policy."""
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(owner, f"{name}-default-deny", APP, "network"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(owner, APP)},
            "policyTypes": ["Ingress", "Egress"],
        },
    }


def _peer(peer: NetworkPeer) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if peer.namespace_selector is not None:
        out["namespaceSelector"] = {"matchLabels": dict(peer.namespace_selector.match_labels)}
    if peer.pod_selector is not None:
        out["podSelector"] = {"matchLabels": dict(peer.pod_selector.match_labels)}
    return out


DNS_EGRESS = {
    "to": [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}}}],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}


def _node_agent_egress(config: OperatorConfig) -> dict[str, Any]:
    agent = config.node_agent
    return {
        "to": [
            {
                "namespaceSelector": {
                    "matchLabels": {"kubernetes.io/metadata.name": agent.namespace}
                },
                "podSelector": {"matchLabels": dict(agent.pod_labels)},
            }
        ],
        "ports": [{"protocol": "TCP", "port": agent.port}],
    }


def allow_list(
    owner: Mapping[str, Any], spec: ConfidentialModelSpec, config: OperatorConfig
) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    egress: list[dict[str, Any]] = [DNS_EGRESS]
    if _uses_node_agent(spec):
        egress.append(_node_agent_egress(config))
    if spec.network.egress_cidrs:
        egress.append(
            {
                "to": [{"ipBlock": {"cidr": cidr}} for cidr in spec.network.egress_cidrs],
                "ports": [{"protocol": "TCP", "port": 443}],
            }
        )
    policy_spec: dict[str, Any] = {
        "podSelector": {"matchLabels": selector_labels(owner, APP)},
        "policyTypes": ["Ingress", "Egress"],
        "egress": egress,
    }
    ingress: list[dict[str, Any]] = []
    if spec.network.allow_from:
        ingress.append(
            {
                "from": [_peer(peer) for peer in spec.network.allow_from],
                "ports": [{"protocol": "TCP", "port": spec.serving.port}],
            }
        )
    if config.metrics_scraper_namespace:
        # Request counts and latencies only: nothing computed from a caller's data.
        scraper = {"kubernetes.io/metadata.name": config.metrics_scraper_namespace}
        ingress.append(
            {
                "from": [{"namespaceSelector": {"matchLabels": scraper}}],
                "ports": [{"protocol": "TCP", "port": METRICS_PORT}],
            }
        )
    if ingress:
        policy_spec["ingress"] = ingress
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(owner, f"{name}-allow", APP, "network"),
        "spec": policy_spec,
    }


def cilium_fqdn_policy(owner: Mapping[str, Any], spec: ConfidentialModelSpec) -> dict[str, Any]:
    """Egress by name to the attestation and Key Vault hosts: only Cilium enforces toFQDNs."""
    name = owner["metadata"]["name"]
    hosts = sorted({_maa_endpoint(spec), _akv_endpoint(spec)})
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNetworkPolicy",
        "metadata": child_metadata(owner, f"{name}-fqdn-egress", APP, "network"),
        "spec": {
            "endpointSelector": {"matchLabels": selector_labels(owner, APP)},
            "egress": [
                {
                    "toEndpoints": [
                        {
                            "matchLabels": {
                                "k8s:io.kubernetes.pod.namespace": "kube-system",
                                "k8s-app": "kube-dns",
                            }
                        }
                    ],
                    "toPorts": [
                        {
                            "ports": [{"port": "53", "protocol": "ANY"}],
                            "rules": {"dns": [{"matchPattern": "*"}]},
                        }
                    ],
                },
                {
                    "toFQDNs": [{"matchName": host} for host in hosts],
                    "toPorts": [{"ports": [{"port": "443", "protocol": "TCP"}]}],
                },
            ],
        },
    }


def disruption_budget(owner: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": child_metadata(owner, owner["metadata"]["name"], APP, "inference"),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(owner, APP)}},
    }


def children(
    owner: Mapping[str, Any], spec: ConfidentialModelSpec, config: OperatorConfig
) -> Children:
    """Everything the model needs, in the order it should be applied."""
    name = owner["metadata"]["name"]
    apply = [service_account(owner, spec), default_deny(owner), allow_list(owner, spec, config)]
    absent: list[tuple[str, str, str]] = []
    if spec.network.fqdn_egress:
        apply.append(cilium_fqdn_policy(owner, spec))
    else:
        absent.append(("cilium.io/v2", "CiliumNetworkPolicy", f"{name}-fqdn-egress"))
    apply += [deployment(owner, spec, config), service(owner, spec)]
    if spec.serving.replicas > 1:
        apply.append(disruption_budget(owner))
    else:
        absent.append(("policy/v1", "PodDisruptionBudget", name))
    return Children(apply=apply, absent=absent)
