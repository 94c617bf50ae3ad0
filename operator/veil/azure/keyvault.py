"""The Key Vault key a ConfidentialModel's data key is wrapped with. SYNCHRONOUS (blocking I/O).

Call from the async controller with `await asyncio.to_thread(ensure_release_key, ...)`.

The key is an exportable RSA-HSM key (a Premium vault or a Managed HSM) with an immutable
Secure Key Release policy. Immutable policies cannot be edited, so the rule is:

- the current version's policy demands what we want  -> no write;
- it differs (or the key is not exportable/HSM/immutable, or allows an operation that could
  unwrap outside release) -> create a NEW VERSION with the wanted policy. Nothing is ever edited
  in place; old versions stay enabled while a model is still sealed to them, and
  `disable_versions` retires them once nothing serves from them (controllers/key_lifecycle.py).

Key operations: a version allows only `export` (Secure Key Release) and `wrapKey` (sealing, which
the SDK performs locally with the public half). Without `unwrapKey` and `decrypt`, no identity,
the operator's Crypto Officer included, can ask Key Vault to unwrap a sealed model's data key:
the private half leaves the HSM only through release to an attested TEE.

Every Azure failure surfaces as `KeyVaultError`, whose message says in plain words what went
wrong and what to do; `retriable` tells the controller whether to back off and retry
(throttling, 5xx, network) or to report and wait for a change (authorisation, bad requests).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.keyvault.keys import KeyClient, KeyOperation, KeyReleasePolicy, KeyType, KeyVaultKey

from veil.azure.credentials import AzureSettings
from veil.azure.errors import (
    RETRIABLE_STATUS,
    AzureOperationError,
    brief,
    error_code,
    service_message,
    transient_wait,
    waiting,
)
from veil.azure.release_policy import POLICY_CONTENT_TYPE, policies_equivalent, policy_digest
from veil.azure.unanswered import Unanswered

log = logging.getLogger("veil.azure.keyvault")

DEFAULT_KEY_SIZE: Final = 3072
TAG_MANAGED_BY: Final = "managed-by"
TAG_POLICY_DIGEST: Final = "veil-policy-digest"
DeletionPolicy = Literal["Retain", "Delete"]
# What a release key may do: be released to a TEE, and wrap (with its public half).
RELEASE_KEY_OPERATIONS: Final = (KeyOperation.export, KeyOperation.wrap_key)
# Operations that would let a caller use the private half without attestation.
PRIVATE_KEY_OPERATIONS: Final = frozenset({KeyOperation.unwrap_key, KeyOperation.decrypt})
# Key creations that timed out, by (vault, key, policy digest): not made again until settled.
UNANSWERED_CREATIONS: Final = Unanswered()


class KeyVaultError(AzureOperationError):
    """A Key Vault operation failed; `str(error)` is the plain-words reason."""


@dataclass(frozen=True)
class KeyState:
    """The key version that now carries the wanted policy.

    `kid` is the full versioned key id (`https://{vault}/keys/{name}/{version}`), what the
    key-release sidecar is given. `created` is True when this call wrote a new version.
    `enabled` False means someone disabled that version in the vault: Veil does not override
    that, but nothing can be released until it is enabled again (report it in status).
    """

    kid: str
    version: str
    policy_digest: str
    created: bool
    enabled: bool = True


def key_client(vault_url: str, settings: AzureSettings) -> KeyClient:
    """A KeyClient for a vault (or Managed HSM) URL, with Veil's credential and TLS options."""
    return KeyClient(
        vault_url,
        settings.credential,
        verify_challenge_resource=settings.verify_challenge_resource,
        **settings.client_kwargs(),
    )


def explain(error: AzureError, vault_url: str, action: str) -> KeyVaultError:  # noqa: PLR0911
    """Turn an azure-core error into a KeyVaultError: a plain-words message with the first line
    of the service's answer, and its whole text as `detail`."""
    where = f"{action} in {vault_url}"
    if isinstance(error, ClientAuthenticationError) and error.status_code in (None, 401):
        # A DefaultAzureCredential failure lists every credential it tried: detail only.
        text = service_message(error)
        return KeyVaultError(
            f"Key Vault did not accept the operator's credentials ({where}). Check the "
            "workload identity (ServiceAccount annotation azure.workload.identity/client-id "
            f"and the federated credential); cause: {brief(text)}",
            status=error.status_code,
            code=error_code(error),
            detail=text,
        )
    if isinstance(error, HttpResponseError) and error.status_code is not None:
        status = error.status_code
        code = error_code(error)
        detail = service_message(error)
        short = brief(detail)
        if status == 403:
            return KeyVaultError(
                "Key Vault refused: the operator's identity lacks the Key Vault Crypto Officer "
                f"role (or an access policy allowing key get/create/list/delete) on the vault "
                f"({where}; {code or 'Forbidden'}): {short}",
                status=status,
                code=code,
                detail=detail,
            )
        if status == 404:
            return KeyVaultError(
                f"Key Vault answered not found ({where}): {short}",
                status=status,
                code=code,
                detail=detail,
            )
        if status == 409:
            return KeyVaultError(
                f"Key Vault conflict ({where}): a deleted key of this name is probably still in "
                "the vault's soft-delete retention; recover or purge it, or choose another "
                f"keyName: {short}",
                status=status,
                code=code,
                detail=detail,
            )
        if status == 400 and ("hsm" in detail.lower() or "premium" in detail.lower()):
            return KeyVaultError(
                f"Key Vault cannot create an HSM-protected key ({where}): Secure Key Release "
                f"needs a Premium vault or a Managed HSM: {short}",
                status=status,
                code=code,
                detail=detail,
            )
        if status in RETRIABLE_STATUS:
            seconds = transient_wait(error)
            why = "throttled" if status == 429 else f"HTTP {status} {code or 'error'}"
            return KeyVaultError(
                waiting("Key Vault", why, seconds, where),
                status=status,
                code=code,
                retriable=True,
                detail=detail,
                retry_after=seconds,
            )
        return KeyVaultError(
            f"Key Vault rejected the request ({where}, HTTP {status}): {short}",
            status=status,
            code=code,
            detail=detail,
        )
    if isinstance(error, ServiceResponseError):
        # The request went out and no (whole) answer came back in time: it may have been
        # carried out, which is why a write is only ever retried after reading again.
        seconds = transient_wait(error)
        return KeyVaultError(
            waiting("Key Vault", "no answer in time", seconds, where),
            retriable=True,
            detail=str(error.message),
            retry_after=seconds,
        )
    if isinstance(error, ServiceRequestError):
        return KeyVaultError(
            f"Key Vault not reachable ({where}): vault not found or network blocked; check "
            f"keyRelease.vaultUrl and the operator's egress: {brief(error.message)}",
            retriable=True,
            detail=str(error.message),
        )
    return KeyVaultError(
        f"Key Vault call failed ({where}); will retry: {brief(str(error))}",
        retriable=True,
        detail=str(error),
    )


def _current_key(client: KeyClient, name: str) -> KeyVaultKey | None:
    try:
        return client.get_key(name)
    except ResourceNotFoundError:
        return None


def _satisfies(key: KeyVaultKey, policy_bytes: bytes) -> bool:
    """Whether the key version already is what Secure Key Release needs with this policy."""
    props = key.properties
    release = props.release_policy
    if key.key_type != KeyType.rsa_hsm or not props.exportable:
        return False
    if release is None or release.encoded_policy is None or not release.immutable:
        return False
    # No key_ops at all means every operation: as unsafe as listing unwrapKey.
    operations = {str(getattr(op, "value", op)) for op in (key.key_operations or [])}
    if not operations or operations & {op.value for op in PRIVATE_KEY_OPERATIONS}:
        return False
    return policies_equivalent(release.encoded_policy, policy_bytes)


def ensure_release_key(
    client: KeyClient,
    name: str,
    policy_bytes: bytes,
    *,
    size: int = DEFAULT_KEY_SIZE,
    tags: Mapping[str, str] | None = None,
    unanswered: Unanswered = UNANSWERED_CREATIONS,
    before_create: Callable[[str], None] | None = None,
) -> KeyState:
    """Ensure key `name`'s current version is an exportable RSA-HSM key whose immutable release
    policy demands `policy_bytes` (build them with `release_policy.release_policy(spec)`).

    No write when it already is; otherwise one new version, but never while an earlier
    creation of the same version may still land (`unanswered`). `before_create(policy digest)`
    runs just before a new version is asked for, and raises to stop it (another operator's
    creation). Blocking; raises KeyVaultError.
    """
    digest = policy_digest(policy_bytes)
    vault_url = client.vault_url
    creation = (vault_url, name, digest)
    try:
        current = _current_key(client, name)
    except AzureError as exc:
        raise explain(exc, vault_url, f"reading key {name!r}") from exc

    if current is not None and _satisfies(current, policy_bytes):
        unanswered.settled(creation)
        props = current.properties
        return KeyState(
            kid=str(current.id),
            version=str(props.version),
            policy_digest=digest,
            created=False,
            enabled=props.enabled is not False,
        )

    pending = unanswered.wait(creation)
    if pending > 0:
        raise KeyVaultError(
            waiting(
                "Key Vault",
                "an earlier creation went unanswered and may still land",
                pending,
                f"creating key {name!r} in {vault_url}",
            ),
            retriable=True,
            retry_after=pending,
        )
    if before_create is not None:
        before_create(digest)
    reason = "absent" if current is None else "its release policy or key type differs"
    log.info("creating a new version of key %s in %s (%s)", name, vault_url, reason)
    all_tags = {TAG_MANAGED_BY: "veil", TAG_POLICY_DIGEST: digest, **(tags or {})}
    try:
        created = client.create_rsa_key(
            name,
            size=size,
            hardware_protected=True,
            exportable=True,
            key_operations=list(RELEASE_KEY_OPERATIONS),
            release_policy=KeyReleasePolicy(
                policy_bytes, content_type=POLICY_CONTENT_TYPE, immutable=True
            ),
            tags=all_tags,
        )
    except AzureError as exc:
        if isinstance(exc, ServiceResponseError):
            unanswered.lost(creation)  # sent, unanswered: it may yet be carried out
        raise explain(exc, vault_url, f"creating key {name!r}") from exc
    return KeyState(
        kid=str(created.id),
        version=str(created.properties.version),
        policy_digest=digest,
        created=True,
        enabled=created.properties.enabled is not False,
    )


@dataclass(frozen=True)
class VersionState:
    """One version of a key, as listed: whether it can still be released, and when made."""

    version: str
    enabled: bool
    created: float


def list_versions(client: KeyClient, name: str) -> list[VersionState]:
    """Every version of key `name`, oldest first. Blocking; raises KeyVaultError."""
    try:
        listed = [
            VersionState(
                version=str(props.version),
                enabled=props.enabled is not False,
                created=props.created_on.timestamp() if props.created_on else 0.0,
            )
            for props in client.list_properties_of_key_versions(name)
        ]
    except AzureError as exc:
        raise explain(exc, client.vault_url, f"listing the versions of key {name!r}") from exc
    return sorted(listed, key=lambda state: state.created)  # stable: ties keep the listing order


def disable_versions(client: KeyClient, name: str, versions: list[str]) -> list[str]:
    """Disable these versions of key `name` (Key Vault then refuses to release them), keeping
    them for audit and recovery. Returns the versions this call disabled. Blocking."""
    disabled = []
    for version in versions:
        try:
            client.update_key_properties(name, version, enabled=False)
        except ResourceNotFoundError:
            continue
        except AzureError as exc:
            action = f"disabling key {name!r} version {version}"
            raise explain(exc, client.vault_url, action) from exc
        log.info("disabled key %s version %s in %s", name, version, client.vault_url)
        disabled.append(version)
    return disabled


def delete_key_if_policy(
    client: KeyClient,
    name: str,
    deletion_policy: DeletionPolicy,
    *,
    timeout: float = 60.0,
) -> bool:
    """Apply a ConfidentialModel's deletion policy to its key. Blocking.

    Retain: do nothing. Delete: delete the key (all versions) and wait until Key Vault reports it
    deleted; with soft delete on, it stays recoverable for the vault's retention period (Veil
    never purges). Returns True when this call deleted the key; False for Retain or when the key
    was already gone.
    """
    if deletion_policy == "Retain":
        return False
    if deletion_policy != "Delete":
        raise ValueError(f"unknown deletion policy {deletion_policy!r}: Retain or Delete")
    vault_url = client.vault_url
    try:
        poller = client.begin_delete_key(name)
        poller.wait(timeout=timeout)
    except ResourceNotFoundError:
        return False
    except AzureError as exc:
        raise explain(exc, vault_url, f"deleting key {name!r}") from exc
    if not poller.done():
        raise KeyVaultError(
            f"Key Vault had not finished deleting key {name!r} in {vault_url} after "
            f"{timeout:.0f}s; will check again",
            retriable=True,
        )
    return True
