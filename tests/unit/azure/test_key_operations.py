"""The release key allows no use of its private half outside Secure Key Release, and retired
versions are disabled: attacks with the operator's own Key Vault credentials, through the REAL
azure-keyvault-keys clients against the Key Vault stand-in (which enforces key_ops as Key Vault
does: 403 KeyOperationForbidden)."""

from __future__ import annotations

import io

import pytest
from azure.core.exceptions import HttpResponseError
from azure.keyvault.keys import KeyClient, KeyReleasePolicy
from azure.keyvault.keys.crypto import CryptographyClient, KeyWrapAlgorithm

from tests.unit.azure.test_keyvault import POLICY_A, POLICY_B, _attested, double_client
from tests.unit.azure.test_release_policy import aci_token, spec
from veil.azure.credentials import AzureSettings
from veil.azure.keyvault import (
    RELEASE_KEY_OPERATIONS,
    disable_versions,
    ensure_release_key,
    list_versions,
)
from veil.azure.release_policy import POLICY_CONTENT_TYPE, release_policy
from veil.runtime.keywrap import KeyVaultKeyWrapper
from veil.runtime.sealing import read_header, seal_bytes
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.maa import MaaStandIn

__all__ = ["double_client"]


def _crypto(key: object, settings: AzureSettings) -> CryptographyClient:
    return CryptographyClient(
        key,  # type: ignore[arg-type]
        settings.credential,
        verify_challenge_resource=settings.verify_challenge_resource,
        **settings.client_kwargs(),
    )


def _sealed_data_key(client: KeyClient, settings: AzureSettings, name: str) -> bytes:
    """Seal a model through the key as `veil seal --vault-url` does; return the wrapped key."""
    key = client.get_key(name)
    sealed = seal_bytes(b"model bytes" * 100, KeyVaultKeyWrapper(_crypto(key, settings)))
    header, _ = read_header(io.BytesIO(sealed))
    return header.wrapped_key


def test_the_create_request_allows_only_export_and_wrap(
    kv_double: KeyVaultDouble, double_client: KeyClient, key_name: str
) -> None:
    ensure_release_key(double_client, key_name, POLICY_A)
    assert kv_double.keys[key_name][-1].key_ops == ["export", "wrapKey"]
    listed = double_client.get_key(key_name).key_operations or []
    operations = {str(getattr(op, "value", op)) for op in listed}
    assert operations == {op.value for op in RELEASE_KEY_OPERATIONS}
    assert not operations & {"unwrapKey", "decrypt"}


def test_the_operators_credentials_cannot_unwrap_a_sealed_models_data_key(
    double_client: KeyClient, kv_double_settings: AzureSettings, key_name: str
) -> None:
    """Sealing works (locally, with the public half); unwrapping or decrypting through Key Vault
    with the same identity is refused, so no TEE-less path to the model exists."""
    ensure_release_key(double_client, key_name, POLICY_A)
    wrapped = _sealed_data_key(double_client, kv_double_settings, key_name)
    crypto = _crypto(double_client.get_key(key_name).id, kv_double_settings)
    for attempt in (
        lambda: crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped),
        lambda: crypto.decrypt("RSA-OAEP-256", wrapped),  # type: ignore[arg-type]
    ):
        with pytest.raises(HttpResponseError) as refused:
            attempt()
        assert refused.value.status_code == 403
        assert "KeyOperationForbidden" in str(refused.value)


def test_an_old_style_key_with_every_operation_is_replaced(
    double_client: KeyClient, kv_double_settings: AzureSettings, key_name: str
) -> None:
    """A key written without key_ops (every operation, as Veil once did) really is unwrappable,
    and ensure_release_key does not accept it: it writes a new version."""
    legacy = double_client.create_rsa_key(
        key_name,
        size=3072,
        hardware_protected=True,
        exportable=True,
        release_policy=KeyReleasePolicy(POLICY_A, content_type=POLICY_CONTENT_TYPE, immutable=True),
    )
    wrapped = _sealed_data_key(double_client, kv_double_settings, key_name)
    crypto = _crypto(legacy.id, kv_double_settings)
    assert len(crypto.unwrap_key(KeyWrapAlgorithm.rsa_oaep_256, wrapped).key) == 32
    state = ensure_release_key(double_client, key_name, POLICY_A)
    assert state.created
    assert state.version != legacy.properties.version


def test_disabled_versions_are_listed_and_no_longer_released(
    double_client: KeyClient, maa: MaaStandIn, key_name: str
) -> None:
    policy = release_policy(spec("confidentialACI", authority=maa.issuer))
    old = ensure_release_key(double_client, key_name, policy.canonical)
    new = ensure_release_key(double_client, key_name, POLICY_B)
    listed = list_versions(double_client, key_name)
    assert {state.version for state in listed} == {old.version, new.version}
    assert all(state.enabled for state in listed)

    assert disable_versions(double_client, key_name, [old.version]) == [old.version]
    states = {state.version: state.enabled for state in list_versions(double_client, key_name)}
    assert states == {old.version: False, new.version: True}
    with pytest.raises(HttpResponseError, match="disabled key") as refused:
        double_client.release_key(key_name, _attested(maa, aci_token()), version=old.version)
    assert refused.value.status_code == 403
    assert disable_versions(double_client, key_name, ["0" * 32]) == []  # unknown: nothing
