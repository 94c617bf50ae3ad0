"""Wrapping and unwrapping of a sealed model's data key with RSA-OAEP-256.

Sealing only needs the public half of the key: locally from a PEM file, or remotely through
Azure Key Vault's `CryptographyClient.wrap_key`. Both sit behind the `KeyWrapper` protocol.
Unwrapping happens inside the TEE with the private key that Secure Key Release hands over.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from veil.runtime.jwk import MIN_RSA_BITS, rsa_thumbprint

if TYPE_CHECKING:
    from azure.keyvault.keys.crypto import CryptographyClient

WRAP_ALGORITHM = "RSA-OAEP-256"
DATA_KEY_BYTES = 32


class KeyMaterialError(ValueError):
    """A key file or key object cannot be used to wrap or unwrap a data key."""


@dataclass(frozen=True)
class WrappedKey:
    """A data key encrypted to a key-encryption key."""

    key_id: str
    algorithm: str
    ciphertext: bytes
    thumbprint: str | None = None


@runtime_checkable
class KeyWrapper(Protocol):
    """Encrypts a data key to a key-encryption key with RSA-OAEP-256."""

    def wrap(self, data_key: bytes) -> WrappedKey:
        """Wrap `data_key`; the result names the key that can unwrap it."""
        ...


def _oaep_sha256() -> padding.OAEP:
    return padding.OAEP(
        mgf=padding.MGF1(algorithm=hashes.SHA256()), algorithm=hashes.SHA256(), label=None
    )


class RsaPublicKeyWrapper:
    """Wraps locally with an RSA public key (the public half of the Key Vault key)."""

    def __init__(self, public_key: rsa.RSAPublicKey, key_id: str | None = None) -> None:
        if public_key.key_size < MIN_RSA_BITS:
            raise KeyMaterialError(
                f"RSA key of {public_key.key_size} bits is below the minimum {MIN_RSA_BITS}"
            )
        self._public_key = public_key
        self._thumbprint = rsa_thumbprint(public_key)
        self._key_id = key_id or f"thumbprint:{self._thumbprint}"

    @property
    def key_id(self) -> str:
        return self._key_id

    def wrap(self, data_key: bytes) -> WrappedKey:
        ciphertext = self._public_key.encrypt(data_key, _oaep_sha256())
        return WrappedKey(self._key_id, WRAP_ALGORITHM, ciphertext, self._thumbprint)


class KeyVaultKeyWrapper:
    """Wraps through Azure Key Vault's `CryptographyClient` with `KeyWrapAlgorithm.rsa_oaep_256`.

    Pass the key's public half as `public_key` when it is known (e.g. from `KeyClient.get_key`)
    so that the sealed header records its thumbprint.
    """

    def __init__(
        self, client: CryptographyClient, public_key: rsa.RSAPublicKey | None = None
    ) -> None:
        self._client = client
        self._thumbprint = rsa_thumbprint(public_key) if public_key is not None else None

    def wrap(self, data_key: bytes) -> WrappedKey:
        from azure.keyvault.keys.crypto import KeyWrapAlgorithm

        result = self._client.wrap_key(KeyWrapAlgorithm.rsa_oaep_256, data_key)
        key_id = result.key_id or self._client.key_id
        if not key_id:
            raise KeyMaterialError("Key Vault did not say which key wrapped the data key")
        return WrappedKey(
            str(key_id), WRAP_ALGORITHM, bytes(result.encrypted_key), self._thumbprint
        )


class UnwrapError(Exception):
    """The wrapped data key cannot be decrypted with the given private key."""


def key_vault_wrapper(
    vault_url: str, key_name: str, key_version: str | None = None
) -> KeyVaultKeyWrapper:
    """Wrap through a Key Vault key, with the Azure settings the operator uses; the key's
    public half is kept so the sealed header records its thumbprint."""
    from azure.keyvault.keys.crypto import CryptographyClient

    from veil.azure import AzureSettings, key_client
    from veil.runtime.jwk import b64url_encode, rsa_public_key_from_jwk

    settings = AzureSettings.from_env()
    key = key_client(vault_url, settings).get_key(key_name, key_version)
    public_key = None
    modulus, exponent = getattr(key.key, "n", None), getattr(key.key, "e", None)
    if modulus and exponent:
        public_key = rsa_public_key_from_jwk(
            {"kty": "RSA", "n": b64url_encode(modulus), "e": b64url_encode(exponent)}
        )
    crypto = CryptographyClient(key, settings.credential, **settings.client_kwargs())
    return KeyVaultKeyWrapper(crypto, public_key)


def unwrap_data_key(private_key: rsa.RSAPrivateKey, wrapped: bytes) -> bytes:
    """Decrypt a wrapped data key with RSA-OAEP-256; raises UnwrapError on any failure."""
    try:
        data_key = private_key.decrypt(wrapped, _oaep_sha256())
    except ValueError as exc:
        raise UnwrapError(
            "the data key could not be unwrapped with this private key "
            "(the model was sealed to a different key, or the wrapped key was altered)"
        ) from exc
    if len(data_key) != DATA_KEY_BYTES:
        raise UnwrapError(
            f"the unwrapped data key is {len(data_key)} bytes, expected {DATA_KEY_BYTES}"
        )
    return data_key


def load_public_key_pem(path: Path) -> rsa.RSAPublicKey:
    """Read an RSA public key from PEM (or take the public half of a PEM private key)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyMaterialError(f"cannot read public key {path}: {exc.strerror}") from exc
    key: object
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError:
        try:
            key = serialization.load_pem_private_key(data, password=None).public_key()
        except (ValueError, TypeError) as exc:
            raise KeyMaterialError(f"{path} is not a PEM RSA public key") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise KeyMaterialError(f"{path} holds a {type(key).__name__}, not an RSA key")
    return key


def load_private_key_pem(path: Path, password: bytes | None = None) -> rsa.RSAPrivateKey:
    """Read an RSA private key from PEM: local debugging only; in a TEE the key comes from SKR."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyMaterialError(f"cannot read private key {path}: {exc.strerror}") from exc
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except (ValueError, TypeError) as exc:
        raise KeyMaterialError(f"{path} is not a readable PEM private key: {exc}") from exc
    finally:
        del data
    if not isinstance(key, rsa.RSAPrivateKey):
        raise KeyMaterialError(f"{path} holds a {type(key).__name__}, not an RSA private key")
    return key
