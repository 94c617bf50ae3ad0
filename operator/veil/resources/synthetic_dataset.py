"""The children of a SyntheticDataset: a hardened synthesis Job, its ServiceAccount, and a
NetworkPolicy that lets it reach the storage endpoint and nothing else. Pure."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from veil import labels
from veil.api.synthetic_dataset import SyntheticDatasetSpec
from veil.config import OperatorConfig
from veil.resources.common import (
    child_metadata,
    restricted_container_security,
    restricted_pod_security,
    selector_labels,
    with_pod_settings,
    workload_identity_account,
)
from veil.resources.confidential_model import DNS_EGRESS

APP = "veil-synthesizer"
PRIVATE_RANGES = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"]


def job_name(owner: Mapping[str, Any]) -> str:
    return f"{owner['metadata']['name'][:50]}-synthesize"


def report_uri(spec: SyntheticDatasetSpec) -> str:
    """The report (public facts and DP estimates only) sits beside the output."""
    return f"{spec.output.uri}.report.json"


def synthesize_args(spec: SyntheticDatasetSpec) -> list[str]:
    """`veil synthesize` with every setting of the spec; the columns as one JSON argument."""
    synth = spec.synthesizer
    columns = [c.to_wire() for c in synth.columns]
    return [
        "synthesize",
        "--source",
        spec.source.uri,
        "--format",
        spec.source.format,
        "--method",
        synth.method,
        "--epsilon",
        repr(synth.epsilon),
        "--delta",
        repr(synth.delta),
        "--rows",
        str(synth.rows),
        "--bins",
        str(synth.bins),
        "--preprocessor-epsilon",
        repr(synth.preprocessor_epsilon),
        "--discovery-epsilon",
        repr(synth.discovery_epsilon),
        "--discovery-delta",
        repr(synth.discovery_delta),
        "--report-epsilon",
        repr(synth.report_epsilon),
        "--columns",
        json.dumps(columns, separators=(",", ":"), sort_keys=True),
        "--output",
        spec.output.uri,
        "--report",
        report_uri(spec),
    ]


def service_account(owner: Mapping[str, Any]) -> dict[str, Any]:
    return workload_identity_account(owner, job_name(owner), APP)


def job(
    owner: Mapping[str, Any],
    spec: SyntheticDatasetSpec,
    config: OperatorConfig,
    *,
    suspended: bool = False,
) -> dict[str, Any]:
    """The synthesis Job; `suspended` creates it without pods (it cannot read the data yet)."""
    name = job_name(owner)
    pod_labels = {
        **selector_labels(owner, APP),
        labels.OWNER_KIND: owner["kind"],
        labels.WORKLOAD_IDENTITY_USE: "true",
    }
    container: dict[str, Any] = {
        "name": "synthesize",
        "image": config.images.runtime,
        "args": synthesize_args(spec),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": restricted_container_security(),
        "terminationMessagePolicy": "File",
    }
    resources = spec.resources.to_wire()
    if resources:
        container["resources"] = resources
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": name,
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": restricted_pod_security(),
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}}],
    }
    if spec.confidential:
        pod_spec["nodeSelector"] = {labels.CVM_SECURITY_TYPE_LABEL: labels.CVM_SECURITY_TYPE}
        pod_spec["tolerations"] = [
            {"key": labels.CONFIDENTIAL_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}
        ]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": child_metadata(owner, name, APP, "synthesis"),
        "spec": {
            "suspend": suspended,
            "backoffLimit": 2,
            "activeDeadlineSeconds": spec.active_deadline_seconds,
            "template": {
                "metadata": {"labels": pod_labels},
                "spec": with_pod_settings(pod_spec, config.pods),
            },
        },
    }


def network_policy(owner: Mapping[str, Any], spec: SyntheticDatasetSpec) -> dict[str, Any]:
    if spec.storage_cidrs:
        storage: list[dict[str, Any]] = [{"ipBlock": {"cidr": c}} for c in spec.storage_cidrs]
    else:
        storage = [{"ipBlock": {"cidr": "0.0.0.0/0", "except": PRIVATE_RANGES}}]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": child_metadata(owner, job_name(owner), APP, "network"),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(owner, APP)},
            "policyTypes": ["Ingress", "Egress"],
            "egress": [DNS_EGRESS, {"to": storage, "ports": [{"protocol": "TCP", "port": 443}]}],
        },
    }


def children(
    owner: Mapping[str, Any],
    spec: SyntheticDatasetSpec,
    config: OperatorConfig,
    *,
    suspended: bool = False,
) -> list[dict[str, Any]]:
    """ServiceAccount, NetworkPolicy, then the Job (last: nothing follows its creation)."""
    return [
        service_account(owner),
        network_policy(owner, spec),
        job(owner, spec, config, suspended=suspended),
    ]


def render_for_review(owner: Mapping[str, Any], config: OperatorConfig) -> list[dict[str, Any]]:
    spec = SyntheticDatasetSpec.model_validate(owner["spec"])
    return children(owner, spec, config)
