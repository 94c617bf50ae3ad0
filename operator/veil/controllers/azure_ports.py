"""The ConfidentialModel reconciler's doors to Azure, built from `veil.azure`.

Clients are built once per vault and per subscription and reused across reconciles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from azure.keyvault.keys import KeyClient
from azure.mgmt.containerservice import ContainerServiceClient

from veil.api.confidential_model import ConfidentialModelSpec, NodePool
from veil.azure import (
    AzureSettings,
    PoolState,
    delete_key_if_policy,
    disable_versions,
    ensure_confidential_pool,
    ensure_release_key,
    key_client,
    list_versions,
    release_policy,
)
from veil.azure.node_pools import container_service_client
from veil.resources.confidential_model import KeyRef


class AzurePorts:
    def __init__(self, settings: AzureSettings) -> None:
        self.settings = settings

    @functools.cache  # noqa: B019 - one client per vault for the operator's lifetime
    def _keys(self, vault_url: str) -> KeyClient:
        return key_client(vault_url, self.settings)

    @functools.cache  # noqa: B019 - one client per subscription for the operator's lifetime
    def _pools(self, subscription_id: str) -> ContainerServiceClient:
        return container_service_client(subscription_id, self.settings)

    def ensure_key(
        self,
        owner: Mapping[str, Any],
        spec: ConfidentialModelSpec,
        measured: Mapping[str, str | bool] | None = None,
        before_create: Callable[[str], None] | None = None,
    ) -> KeyRef:
        policy = release_policy(spec, measured)
        state = ensure_release_key(
            self._keys(spec.key_release.key_vault().vault_url),
            spec.key_release.key_vault().key_name,
            policy.canonical,
            tags={
                "veil.dev/owner": f"{owner['metadata']['namespace']}/{owner['metadata']['name']}"
            },
            before_create=before_create,
        )
        return KeyRef(kid=state.kid, version=state.version, created=state.created)

    def retire_key_versions(self, spec: ConfidentialModelSpec, keep: str) -> list[str]:
        client = self._keys(spec.key_release.key_vault().vault_url)
        name = spec.key_release.key_vault().key_name
        unused = [v.version for v in list_versions(client, name) if v.enabled and v.version != keep]
        return disable_versions(client, name, unused)

    def remove_key(self, owner: Mapping[str, Any], spec: ConfidentialModelSpec) -> str:
        deleted = delete_key_if_policy(
            self._keys(spec.key_release.key_vault().vault_url),
            spec.key_release.key_vault().key_name,
            spec.key_release.deletion_policy,
        )
        verb = "deleted" if deleted else "kept (deletionPolicy Retain)"
        return f"Key Vault key {spec.key_release.key_vault().key_name} {verb}"

    def ensure_pool(self, pool: NodePool, spec: ConfidentialModelSpec) -> PoolState:
        return ensure_confidential_pool(
            self._pools(pool.subscription_id), pool, platform=spec.tee.platform
        )
