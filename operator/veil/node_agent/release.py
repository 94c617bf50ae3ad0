"""Secure Key Release from Key Vault to this node's TPM, and re-wrapping for the asking pod.

Key Vault's release answer is a JWS signed by a certificate for the vault's host (x5c, leaf
first); its payload's `response.key.key.key_hsm` is the key wrapped RSA_AES_KEY_WRAP_256 to the
runtime key of the MAA token, i.e. the TPM's ephemeral key:

    key_hsm    = b64url(JSON {"ciphertext": b64url(RSA-OAEP-256(tpm key, K) || AES-KWP(K, PKCS#8))})

The RSA part is opened by the TPM (`tpm2_rsadecrypt`), the rest in software. The pod gets the
key the same way, wrapped to the RSA key it generated in memory (see `wrap_for_pod`).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ipaddress
import json
import os
import ssl
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from azure.core.credentials import TokenCredential
from azure.core.exceptions import AzureError, HttpResponseError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from veil.node_agent.guest_attestation import AttestedToken
from veil.node_agent.tpm import Tpm, TpmError
from veil.runtime.jwk import b64url_decode, b64url_encode

ENC = "RSA_AES_KEY_WRAP_256"
POD_ALGORITHM = "RSA-OAEP-256+A256KWP"
_PEM_END = b"-----END CERTIFICATE-----"


class ReleaseError(Exception):
    """Key Vault did not release the key, or its answer is not to be believed. `retriable`
    says whether trying again later may help."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


def load_roots(bundles: Iterable[Path]) -> tuple[x509.Certificate, ...]:
    """The CA certificates of PEM bundles (the system's when none is given): the roots a
    release answer's signer must chain to."""
    paths = list(bundles)
    if not paths:
        system = ssl.get_default_verify_paths().cafile
        paths = [Path(system)] if system and Path(system).is_file() else []
    found: list[x509.Certificate] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # system bundles hold a few odd certificates
        for path in paths:
            for block in path.read_bytes().split(_PEM_END):
                if b"-----BEGIN CERTIFICATE-----" not in block:
                    continue
                try:
                    found.append(x509.load_pem_x509_certificate(block + _PEM_END))
                except ValueError:
                    continue
    return tuple(found)


def _subject(host: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def verify_release(
    value: str, vault_url: str, roots: tuple[x509.Certificate, ...]
) -> dict[str, Any]:
    """The payload of a release answer, once its signer is shown to be the vault's host under
    a trusted root and the signature holds."""
    try:
        header = jwt.get_unverified_header(value)
        chain = [x509.load_der_x509_certificate(base64.b64decode(c)) for c in header["x5c"]]
    except (jwt.PyJWTError, KeyError, TypeError, ValueError) as exc:
        raise ReleaseError(
            f"the release answer has no signer chain: {exc}", retriable=False
        ) from exc
    host = urlsplit(vault_url).hostname or ""
    if not chain or not roots:
        raise ReleaseError("no signer chain, or no trusted roots", retriable=False)
    verifier = PolicyBuilder().store(Store(list(roots))).build_server_verifier(_subject(host))
    try:
        verifier.verify(chain[0], chain[1:])
    except VerificationError as exc:
        raise ReleaseError(
            f"the release answer's signer is not trusted: {exc}", retriable=False
        ) from exc
    leaf_key = chain[0].public_key()
    if not isinstance(leaf_key, rsa.RSAPublicKey):
        raise ReleaseError("the release answer's signer has no RSA key", retriable=False)
    try:
        payload: dict[str, Any] = jwt.decode(value, leaf_key, algorithms=["RS256"])
    except jwt.PyJWTError as exc:
        raise ReleaseError(f"the release answer's signature fails: {exc}", retriable=False) from exc
    return payload


@dataclass(frozen=True)
class ReleasedKey:
    """A released private key (PKCS#8 DER) and its Key Vault id. Never logged."""

    kid: str
    pkcs8: bytes = field(repr=False)


def _oaep_sha256() -> padding.OAEP:
    return padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)


def wrap_for_pod(key: ReleasedKey, wrapping_key: rsa.RSAPublicKey) -> dict[str, str]:
    """The key for the pod: RSA-OAEP-256 of a fresh AES-256 key, then AES key wrap with padding
    (RFC 5649) of the PKCS#8 key, like Key Vault's RSA_AES_KEY_WRAP_256."""
    transfer = os.urandom(32)
    try:
        ciphertext = wrapping_key.encrypt(transfer, _oaep_sha256()) + aes_key_wrap_with_padding(
            transfer, key.pkcs8
        )
    finally:
        del transfer
    return {
        "kid": key.kid,
        "alg": POD_ALGORITHM,
        "wrapping_key_sha256": hashlib.sha256(
            wrapping_key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).hexdigest(),
        "ciphertext": b64url_encode(ciphertext),
    }


@dataclass
class KeyVaultReleaser:
    """Releases key versions with the agent's own Azure credential, opens them with the TPM."""

    tpm: Tpm
    credential: TokenCredential
    roots: tuple[x509.Certificate, ...]
    client_kwargs: Mapping[str, Any] = field(default_factory=dict)
    verify_challenge_resource: bool = True

    def _release_value(self, vault_url: str, name: str, version: str, token: str) -> str:
        from azure.keyvault.keys import KeyClient, KeyExportEncryptionAlgorithm

        client = KeyClient(
            vault_url,
            self.credential,
            verify_challenge_resource=self.verify_challenge_resource,
            **self.client_kwargs,
        )
        try:
            result = client.release_key(
                name,
                token,
                version=version,
                algorithm=KeyExportEncryptionAlgorithm.rsa_aes_key_wrap_256,
            )
        except HttpResponseError as exc:
            status = exc.status_code or 0
            raise ReleaseError(
                f"Key Vault refused the release (HTTP {status}): {exc.message}",
                retriable=status >= 500 or status == 429,
            ) from exc
        except AzureError as exc:
            raise ReleaseError(f"cannot reach Key Vault: {exc}", retriable=True) from exc
        finally:
            client.close()
        return str(result.value)

    def _open(
        self, payload: Mapping[str, Any], attested: AttestedToken, kid_prefix: str
    ) -> ReleasedKey:
        try:
            request, key = payload["request"], payload["response"]["key"]["key"]
            kid = str(key["kid"])
            blob = json.loads(b64url_decode(str(key["key_hsm"])))
            ciphertext = b64url_decode(str(blob["ciphertext"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleaseError(
                f"the release answer holds no key_hsm: {exc}", retriable=False
            ) from exc
        if request.get("enc") != ENC or not kid.startswith(kid_prefix):
            raise ReleaseError("the release answer is for another key or wrapping", retriable=False)
        split = attested.key.public_key.key_size // 8
        transfer = self.tpm.decrypt(attested.key, ciphertext[:split], "oaep-sha256")
        try:
            pkcs8 = aes_key_unwrap_with_padding(transfer, ciphertext[split:])
        except InvalidUnwrap as exc:
            raise ReleaseError("key_hsm does not open with the TPM's key", retriable=False) from exc
        finally:
            del transfer
        return ReleasedKey(kid, pkcs8)

    async def release(
        self, vault_url: str, name: str, version: str, attested: AttestedToken
    ) -> ReleasedKey:
        value = await asyncio.to_thread(
            self._release_value, vault_url, name, version, attested.token
        )
        payload = verify_release(value, vault_url, self.roots)
        prefix = f"{vault_url.rstrip('/')}/keys/{name}/{version}"
        try:
            return await asyncio.to_thread(self._open, payload, attested, prefix)
        except TpmError as exc:
            raise ReleaseError(f"the TPM failed to unwrap: {exc}", retriable=True) from exc
