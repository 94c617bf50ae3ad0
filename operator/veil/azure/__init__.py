"""Azure: Key Vault release keys and their Secure Key Release policies, AKS confidential node pools.

The whole API is SYNCHRONOUS (the Azure SDKs' blocking clients); the async controller calls it
through `asyncio.to_thread`. Pure parts (`release_policy`, `node_pools.desired_agent_pool`,
`node_pools.confidential_platform`) do no I/O.

    settings = AzureSettings.from_env()
    policy = release_policy(spec)                                   # pure
    key = ensure_release_key(key_client(spec.key_release.vault_url, settings),
                             spec.key_release.key_name, policy.canonical)
    pool = ensure_confidential_pool(container_service_client(np.subscription_id, settings), np)

Clients hold HTTP connection pools: build one per vault / subscription, reuse it across
reconciles, and `close()` it on shutdown. Errors are `KeyVaultError`, `NodePoolError` and
`ReleasePolicyError`, each with a plain-words message (and `.retriable` on the first two).
"""

from veil.azure.credentials import AzureSettings, StaticTokenCredential
from veil.azure.keyvault import (
    KeyState,
    KeyVaultError,
    VersionState,
    delete_key_if_policy,
    disable_versions,
    ensure_release_key,
    key_client,
    list_versions,
)
from veil.azure.node_pools import (
    NodePoolError,
    PoolState,
    confidential_platform,
    container_service_client,
    desired_agent_pool,
    ensure_confidential_pool,
)
from veil.azure.release_policy import (
    ReleasePolicy,
    ReleasePolicyError,
    build_release_policy,
    cce_policy_hostdata,
    policy_digest,
    release_policy,
)

__all__ = [
    "AzureSettings",
    "KeyState",
    "KeyVaultError",
    "NodePoolError",
    "PoolState",
    "ReleasePolicy",
    "ReleasePolicyError",
    "StaticTokenCredential",
    "VersionState",
    "build_release_policy",
    "cce_policy_hostdata",
    "confidential_platform",
    "container_service_client",
    "delete_key_if_policy",
    "desired_agent_pool",
    "disable_versions",
    "ensure_confidential_pool",
    "ensure_release_key",
    "key_client",
    "list_versions",
    "policy_digest",
    "release_policy",
]
