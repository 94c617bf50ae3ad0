"""key_hsm, the wrapped key of a Secure Key Release answer, checked against the real SKR sidecar's
reading of it (microsoft/confidential-sidecar-containers pkg/common/akv.go, pkg/skr/keywrap.go),
re-implemented here step by step rather than through the stand-in's own unwrap."""

from __future__ import annotations

import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding

from veil_standins.jose import b64url, b64url_decode
from veil_standins.key_transfer import (
    DEFAULT_ENC,
    KeyTransferError,
    unwrap_key_hsm,
    wrap_key_hsm,
)

RELEASED = rsa.generate_private_key(public_exponent=65537, key_size=3072)
EPHEMERAL = rsa.generate_private_key(public_exponent=65537, key_size=2048)
STRANGER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
SIDECAR_HASHES = {
    "CKM_RSA_AES_KEY_WRAP": hashes.SHA1,
    "RSA_AES_KEY_WRAP_256": hashes.SHA256,
    "RSA_AES_KEY_WRAP_384": hashes.SHA384,
}


def sidecar_unwrap(key_hsm: str, enc: str, private: rsa.RSAPrivateKey) -> bytes:
    """What the sidecar does: JSON blob, ciphertext = OAEP(transfer key) over the first
    RSASize/8 = 256 bytes, then RFC 5649 AES key wrap with padding of the PKCS#8 key."""
    blob = json.loads(b64url_decode(key_hsm))
    ciphertext = b64url_decode(blob["ciphertext"])
    digest = SIDECAR_HASHES[enc]()
    transfer_key = private.decrypt(
        ciphertext[:256], padding.OAEP(mgf=padding.MGF1(digest), algorithm=digest, label=None)
    )
    return aes_key_unwrap_with_padding(transfer_key, ciphertext[256:])


@pytest.mark.parametrize("enc", sorted(SIDECAR_HASHES))
def test_the_sidecars_unwrap_recovers_the_pkcs8_key(enc: str) -> None:
    key_hsm = wrap_key_hsm(RELEASED, EPHEMERAL.public_key(), enc=enc, wrapping_kid="eph")

    pkcs8 = sidecar_unwrap(key_hsm, enc, EPHEMERAL)

    recovered = serialization.load_der_private_key(pkcs8, password=None)
    assert isinstance(recovered, rsa.RSAPrivateKey)
    assert recovered.private_numbers() == RELEASED.private_numbers()
    assert unwrap_key_hsm(key_hsm, enc, EPHEMERAL) == pkcs8
    blob = json.loads(b64url_decode(key_hsm))
    assert blob["header"] == {"kid": "eph", "alg": "dir", "enc": enc}
    assert blob["schema_version"] == "1.0.0"


def test_key_vaults_default_is_the_sha1_mechanism() -> None:
    assert DEFAULT_ENC == "CKM_RSA_AES_KEY_WRAP"
    key_hsm = wrap_key_hsm(RELEASED, EPHEMERAL.public_key())
    with pytest.raises(ValueError, match=r"[Dd]ecryption failed"):
        sidecar_unwrap(key_hsm, "RSA_AES_KEY_WRAP_256", EPHEMERAL)  # the hash matters
    assert sidecar_unwrap(key_hsm, "CKM_RSA_AES_KEY_WRAP", EPHEMERAL)


def test_each_wrap_uses_a_fresh_transfer_key() -> None:
    first, second = (wrap_key_hsm(RELEASED, EPHEMERAL.public_key()) for _ in range(2))
    cipher = [b64url_decode(json.loads(b64url_decode(k))["ciphertext"]) for k in (first, second)]
    assert cipher[0][256:] != cipher[1][256:]


def test_only_the_wrapping_keys_holder_can_unwrap() -> None:
    key_hsm = wrap_key_hsm(RELEASED, EPHEMERAL.public_key())
    with pytest.raises(KeyTransferError, match="does not open with this wrapping key"):
        unwrap_key_hsm(key_hsm, DEFAULT_ENC, STRANGER)


def test_an_altered_blob_is_refused() -> None:
    blob = json.loads(b64url_decode(wrap_key_hsm(RELEASED, EPHEMERAL.public_key())))
    ciphertext = bytearray(b64url_decode(blob["ciphertext"]))
    ciphertext[-1] ^= 1
    blob["ciphertext"] = b64url(bytes(ciphertext))
    altered = b64url(json.dumps(blob).encode())
    with pytest.raises(KeyTransferError, match="does not open"):
        unwrap_key_hsm(altered, DEFAULT_ENC, EPHEMERAL)
    with pytest.raises(KeyTransferError, match="not a key transfer blob"):
        unwrap_key_hsm(b64url(b"{}"), DEFAULT_ENC, EPHEMERAL)
    with pytest.raises(KeyTransferError, match="unsupported"):
        unwrap_key_hsm(altered, "A256KW", EPHEMERAL)
