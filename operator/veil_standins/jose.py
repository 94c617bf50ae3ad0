"""The JOSE encodings the LOCAL STAND-INS speak: base64url, RSA JWKs and x5c certificates.

Written here rather than imported from `veil` on purpose: the stand-ins play the other side of
Veil's wire formats, so a mistake in Veil's own encoders must not cancel out in its tests.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Decode base64url with or without padding; raises ValueError on anything else."""
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"not base64url: {exc}") from exc


def _uint(value: int) -> str:
    return b64url(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def _int(jwk: Mapping[str, Any], name: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"the JWK has no {name!r}")
    return int.from_bytes(b64url_decode(value), "big")


def rsa_public_jwk(key: rsa.RSAPublicKey) -> dict[str, str]:
    numbers = key.public_numbers()
    return {"kty": "RSA", "n": _uint(numbers.n), "e": _uint(numbers.e)}


def rsa_private_jwk(key: rsa.RSAPrivateKey) -> dict[str, str]:
    numbers = key.private_numbers()
    return {
        **rsa_public_jwk(key.public_key()),
        "d": _uint(numbers.d),
        "p": _uint(numbers.p),
        "q": _uint(numbers.q),
        "dp": _uint(numbers.dmp1),
        "dq": _uint(numbers.dmq1),
        "qi": _uint(numbers.iqmp),
    }


def rsa_public_key_from_jwk(jwk: Mapping[str, Any]) -> rsa.RSAPublicKey:
    if jwk.get("kty") not in ("RSA", "RSA-HSM"):
        raise ValueError(f"not an RSA JWK (kty {jwk.get('kty')!r})")
    return rsa.RSAPublicNumbers(_int(jwk, "e"), _int(jwk, "n")).public_key()


def rsa_public_key_from_x5c(chain: Any) -> rsa.RSAPublicKey:
    """The RSA key of the first certificate of a JWK's `x5c` (standard base64 DER)."""
    if not isinstance(chain, list) or not chain or not isinstance(chain[0], str):
        raise ValueError("x5c is not a list of certificates")
    try:
        certificate = x509.load_der_x509_certificate(base64.b64decode(chain[0], validate=True))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"x5c[0] is not a DER certificate: {exc}") from exc
    key = certificate.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("x5c[0] holds no RSA key")
    return key
