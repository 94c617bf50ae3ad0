"""The `key_hsm` blob of a Secure Key Release answer: a private key wrapped to the attested TEE.

Part of the LOCAL STAND-INS, not a security boundary. The format is the one the real SKR
sidecar unwraps (microsoft/confidential-sidecar-containers: `RsaAESKeyUnwrap` in
pkg/common/akv.go, `aesUnwrapPadding` in pkg/skr/keywrap.go, `SecureKeyRelease` in
pkg/skr/skr.go), in the shape of Key Vault's key transfer blob:

    key_hsm    = base64url(JSON {"schema_version": "1.0.0",
                                 "header": {"kid": <wrapping key's kid>, "alg": "dir", "enc": ENC},
                                 "ciphertext": base64url(C)})
    C          = RSA-OAEP(wrapping public key, K)  ||  AES-KWP(K, PKCS#8 DER of the private key)

K is a fresh AES-256 transfer key; AES-KWP is AES key wrap with padding (RFC 5649); the RSA part
is as long as the wrapping key's modulus (the sidecar's ephemeral key is always 2048 bits, so it
splits at 256 bytes). OAEP's hash, MGF1's too (Go's rsa.DecryptOAEP uses one hash for both),
follows ENC, which Key Vault also states in the signed answer's `request.enc`:
CKM_RSA_AES_KEY_WRAP (Key Vault's default) -> SHA-1, RSA_AES_KEY_WRAP_256 -> SHA-256,
RSA_AES_KEY_WRAP_384 -> SHA-384.
"""

from __future__ import annotations

import json
import os
from typing import Any

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import (
    InvalidUnwrap,
    aes_key_unwrap_with_padding,
    aes_key_wrap_with_padding,
)

from veil_standins.jose import b64url, b64url_decode

DEFAULT_ENC = "CKM_RSA_AES_KEY_WRAP"
_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "CKM_RSA_AES_KEY_WRAP": hashes.SHA1,
    "RSA_AES_KEY_WRAP_256": hashes.SHA256,
    "RSA_AES_KEY_WRAP_384": hashes.SHA384,
}
ENCRYPTION_ALGORITHMS = frozenset(_HASHES)
TRANSFER_KEY_BYTES = 32


class KeyTransferError(ValueError):
    """A key_hsm blob is malformed, or does not open with the key offered."""


def _oaep(enc: str) -> padding.OAEP:
    if enc not in _HASHES:
        raise KeyTransferError(f"unsupported key transfer algorithm {enc!r}")
    digest = _HASHES[enc]()
    return padding.OAEP(mgf=padding.MGF1(algorithm=digest), algorithm=digest, label=None)


def wrap_key_hsm(
    private_key: rsa.RSAPrivateKey,
    wrapping_key: rsa.RSAPublicKey,
    *,
    enc: str = DEFAULT_ENC,
    wrapping_kid: str = "",
) -> str:
    """The key_hsm blob that hands `private_key` to whoever holds `wrapping_key`'s private half."""
    transfer_key = os.urandom(TRANSFER_KEY_BYTES)
    pkcs8 = private_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    ciphertext = wrapping_key.encrypt(transfer_key, _oaep(enc)) + aes_key_wrap_with_padding(
        transfer_key, pkcs8
    )
    blob = {
        "schema_version": "1.0.0",
        "header": {"kid": wrapping_kid, "alg": "dir", "enc": enc},
        "ciphertext": b64url(ciphertext),
    }
    return b64url(json.dumps(blob, separators=(",", ":")).encode())


def unwrap_key_hsm(key_hsm: str, enc: str, wrapping_key: rsa.RSAPrivateKey) -> bytes:
    """The PKCS#8 DER private key inside a key_hsm blob, as the SKR sidecar recovers it."""
    try:
        blob: Any = json.loads(b64url_decode(key_hsm))
        ciphertext = b64url_decode(blob["ciphertext"])
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyTransferError(f"key_hsm is not a key transfer blob: {exc}") from exc
    oaep = _oaep(enc)
    split = wrapping_key.key_size // 8
    if len(ciphertext) <= split:
        raise KeyTransferError("key_hsm's ciphertext is too short")
    try:
        transfer_key = wrapping_key.decrypt(ciphertext[:split], oaep)
        return aes_key_unwrap_with_padding(transfer_key, ciphertext[split:])
    except (ValueError, InvalidUnwrap) as exc:
        raise KeyTransferError(
            "key_hsm does not open with this wrapping key (wrapped to another key, or altered)"
        ) from exc
