"""Sealing through a Key Vault key (what `veil seal --vault-url` and the training Job do), with
the real SDK against the Key Vault double: the sealed model opens with that key's private half."""

from __future__ import annotations

import io
import os

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.unit.azure.conftest import TOKEN
from veil.azure import AzureSettings, key_client
from veil.runtime.jwk import rsa_thumbprint
from veil.runtime.keywrap import key_vault_wrapper
from veil.runtime.sealing import WrongKeyError, read_header, seal_bytes, unseal_bytes
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.tls import TlsFiles


def test_model_sealed_through_key_vault_opens_with_that_key(
    kv_double: KeyVaultDouble,
    azure_tls: TlsFiles,
    kv_double_settings: AzureSettings,
    monkeypatch: pytest.MonkeyPatch,
    key_name: str,
) -> None:
    monkeypatch.setenv("VEIL_AZURE_STATIC_TOKEN", TOKEN)
    monkeypatch.setenv("VEIL_AZURE_CA_BUNDLE", str(azure_tls.ca_file))
    key = key_client(kv_double.url, kv_double_settings).create_rsa_key(key_name, size=3072)
    model = os.urandom(200_000)

    sealed = seal_bytes(model, key_vault_wrapper(kv_double.url, key_name), chunk_size=65536)

    private = kv_double.private_key(key_name)  # what Key Vault keeps in its HSM
    assert unseal_bytes(sealed, private) == model
    header, _ = read_header(io.BytesIO(sealed))
    assert header.key_id == key.id
    assert header.key_thumbprint == rsa_thumbprint(private.public_key())
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    with pytest.raises(WrongKeyError):
        unseal_bytes(sealed, stranger)
