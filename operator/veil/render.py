"""`veil render`: what a resource reconciles into, without a cluster, from the operator's own
builders — for review in GitOps pull requests."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from veil.api import ConfidentialModel, PrivacyBudget, SyntheticDataset
from veil.api.confidential_model import ConfidentialModelSpec
from veil.azure import release_policy
from veil.azure.keyvault import RELEASE_KEY_OPERATIONS
from veil.config import OperatorConfig
from veil.resources import confidential_model as model_children
from veil.resources.kata_claims import coco_release_claims
from veil.resources.training import children as training_children

# Placeholders for what only the cluster and Key Vault assign.
PLACEHOLDER_UID = "00000000-0000-0000-0000-000000000000"


def _owner(document: dict[str, Any]) -> dict[str, Any]:
    owner = dict(document)
    meta = dict(owner.get("metadata") or {})
    meta.setdefault("namespace", "default")
    meta.setdefault("uid", PLACEHOLDER_UID)
    owner["metadata"] = meta
    return owner


def render_model(document: dict[str, Any], config: OperatorConfig) -> list[dict[str, Any]]:
    resource = ConfidentialModel.model_validate(document)
    spec = resource.spec
    out: list[dict[str, Any]] = []
    if spec.key_release.kbs_resource is None:
        out.append(_key_vault_key(document, spec, config))
    if spec.model is None:
        # The Deployment appears once the training Job has produced a sealed model.
        return out + training_children(_owner(document), spec, config)
    return out + model_children.children(_owner(document), spec, config).apply


def _key_vault_key(
    document: dict[str, Any], spec: ConfidentialModelSpec, config: OperatorConfig
) -> dict[str, Any]:
    """The key Veil creates: what to create by hand before sealing (the production order)."""
    measured = None
    if spec.tee.isolation == "coco" and spec.model is not None:
        agent = model_children.coco_agent_policy(_owner(document), spec, config)
        measured = coco_release_claims(agent, spec.tee.platform)
    policy = release_policy(spec, measured)
    key = spec.key_release.key_vault()
    return {
        "kind": "KeyVaultKey",
        "vault": key.vault_url,
        "name": key.key_name,
        "keyType": "RSA-HSM",
        "exportable": True,
        "keyOperations": [op.value for op in RELEASE_KEY_OPERATIONS],
        "releasePolicy": policy.document,
        "releasePolicySha256": policy.digest,
        "onDeletion": spec.key_release.deletion_policy,
    }


def render(documents: Iterable[dict[str, Any]], config: OperatorConfig) -> list[dict[str, Any]]:
    """Every manifest the documents reconcile into, in apply order."""
    rendered: list[dict[str, Any]] = []
    for document in documents:
        if not document:
            continue
        kind = document.get("kind")
        if kind == "ConfidentialModel":
            rendered += render_model(document, config)
        elif kind == "PrivacyBudget":
            PrivacyBudget.model_validate(document)  # no children: the ledger lives in status
        elif kind == "SyntheticDataset":
            SyntheticDataset.model_validate(document)
            rendered += render_dataset(document, config)
    return rendered


def render_dataset(document: dict[str, Any], config: OperatorConfig) -> list[dict[str, Any]]:
    from veil.resources import synthetic_dataset as dataset_children

    return dataset_children.render_for_review(_owner(document), config)
