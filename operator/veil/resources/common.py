"""Metadata every child of a Veil resource carries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from veil import labels
from veil.config import PodSettings
from veil.logs import ENV as LOG_FORMAT_ENV

TRUST_BUNDLE_DIR = "/etc/veil/trust"


def owner_reference(owner: Mapping[str, Any]) -> dict[str, Any]:
    """A controller reference, so garbage collection removes the child with its owner."""
    meta = owner["metadata"]
    return {
        "apiVersion": owner["apiVersion"],
        "kind": owner["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def selector_labels(owner: Mapping[str, Any], app: str) -> dict[str, str]:
    return {labels.NAME: app, labels.INSTANCE: owner["metadata"]["name"]}


def child_metadata(
    owner: Mapping[str, Any],
    name: str,
    app: str,
    component: str,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": owner["metadata"]["namespace"],
        "labels": {
            **selector_labels(owner, app),
            labels.COMPONENT: component,
            labels.PART_OF: "veil",
            labels.MANAGED_BY: "veil",
            labels.OWNER_KIND: owner["kind"],
        },
        "ownerReferences": [owner_reference(owner)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def restricted_container_security() -> dict[str, Any]:
    """What Pod Security's `restricted` level asks of every container."""
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def restricted_pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 65532,
        "runAsGroup": 65532,
        "fsGroup": 65532,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def workload_identity_account(
    owner: Mapping[str, Any],
    name: str,
    app: str,
    annotations: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """A ServiceAccount for Azure workload identity; its token is never auto-mounted."""
    meta = child_metadata(owner, name, app, "identity", annotations)
    meta["labels"][labels.WORKLOAD_IDENTITY_USE] = "true"
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": meta,
        "automountServiceAccountToken": False,
    }


def with_pod_settings(pod_spec: dict[str, Any], settings: PodSettings) -> dict[str, Any]:
    """`pod_spec` with the operator's pod settings in every container (see PodSettings)."""
    containers = [*pod_spec.get("initContainers", []), *pod_spec["containers"]]
    # The operator's log format, for the runtime, synthesizer and trainer (veil.logs); text,
    # their default, is not spelled out.
    log_format = settings.log_format
    if log_format != "text":
        for container in containers:
            container.setdefault("env", []).append({"name": LOG_FORMAT_ENV, "value": log_format})
    if settings.env_secret:
        for container in containers:
            container.setdefault("envFrom", []).append(
                {"secretRef": {"name": settings.env_secret, "optional": True}}
            )
    if settings.trust_bundle:
        bundle = f"{TRUST_BUNDLE_DIR}/ca.crt"
        pod_spec.setdefault("volumes", []).append(
            {
                "name": "trust-bundle",
                "configMap": {
                    "name": settings.trust_bundle,
                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                },
            }
        )
        for container in containers:
            container.setdefault("volumeMounts", []).append(
                {"name": "trust-bundle", "mountPath": TRUST_BUNDLE_DIR, "readOnly": True}
            )
            # OpenSSL (aiohttp, urllib) and requests (the Azure SDKs) each read their own.
            container.setdefault("env", []).extend(
                [
                    {"name": "SSL_CERT_FILE", "value": bundle},
                    {"name": "REQUESTS_CA_BUNDLE", "value": bundle},
                ]
            )
    return pod_spec
