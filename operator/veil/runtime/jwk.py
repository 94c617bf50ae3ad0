"""RSA JSON Web Keys (RFC 7517/7518) to and from `cryptography` key objects.

The SKR sidecar hands the released Key Vault key back as a private RSA JWK; Veil records an
RFC 7638 thumbprint of the wrapping key in each sealed model so that a wrong key is named as
such instead of surfacing as an opaque decryption failure.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

MIN_RSA_BITS = 2048
_B64URL = re.compile(r"[A-Za-z0-9_-]*={0,2}")
_RSA_KEY_TYPES = frozenset({"RSA", "RSA-HSM"})


class JwkError(ValueError):
    """A JSON Web Key is malformed, of the wrong type, or not a usable RSA key."""


def b64url_decode(value: str) -> bytes:
    """Decode unpadded (or padded) base64url, as JOSE uses it; other characters are refused."""
    if not _B64URL.fullmatch(value):
        raise JwkError("not valid base64url: unexpected characters")
    padded = value.rstrip("=") + "=" * (-len(value.rstrip("=")) % 4)
    try:
        return base64.urlsafe_b64decode(padded.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise JwkError(f"not valid base64url: {exc}") from exc


def b64url_encode(data: bytes) -> str:
    """Encode bytes as unpadded base64url."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_to_b64url(value: int) -> str:
    return b64url_encode(value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big"))


def _member_int(jwk: Mapping[str, Any], name: str) -> int:
    value = jwk.get(name)
    if not isinstance(value, str) or not value:
        raise JwkError(f"RSA JWK member {name!r} is missing or not a base64url string")
    try:
        raw = b64url_decode(value)
    except JwkError as exc:
        raise JwkError(f"RSA JWK member {name!r} is {exc}") from exc
    return int.from_bytes(raw, "big")


def _as_mapping(jwk: Mapping[str, Any] | str | bytes) -> Mapping[str, Any]:
    if isinstance(jwk, str | bytes):
        try:
            parsed = json.loads(jwk)
        except (ValueError, UnicodeDecodeError) as exc:
            raise JwkError(f"the key is not valid JSON: {exc}") from exc
        if not isinstance(parsed, dict):
            raise JwkError("the key is JSON but not a JSON object")
        return parsed
    return jwk


def _check_rsa_type(jwk: Mapping[str, Any]) -> None:
    kty = jwk.get("kty")
    if kty not in _RSA_KEY_TYPES:
        raise JwkError(f"expected an RSA key (kty RSA or RSA-HSM), got kty={kty!r}")


def rsa_public_key_from_jwk(jwk: Mapping[str, Any] | str | bytes) -> rsa.RSAPublicKey:
    """Build an RSA public key from a JWK's `n` and `e`."""
    members = _as_mapping(jwk)
    _check_rsa_type(members)
    numbers = rsa.RSAPublicNumbers(e=_member_int(members, "e"), n=_member_int(members, "n"))
    try:
        key = numbers.public_key()
    except ValueError as exc:
        raise JwkError(f"the RSA public key is invalid: {exc}") from exc
    if key.key_size < MIN_RSA_BITS:
        raise JwkError(f"RSA key of {key.key_size} bits is below the minimum {MIN_RSA_BITS}")
    return key


def rsa_private_key_from_jwk(jwk: Mapping[str, Any] | str | bytes) -> rsa.RSAPrivateKey:
    """Build an RSA private key from a private JWK (n, e, d and, normally, p, q, dp, dq, qi).

    When only n, e and d are present, the primes are recovered from them. `cryptography`
    checks the numbers for consistency, so a corrupted member is refused here rather than
    producing a key that decrypts garbage.
    """
    members = _as_mapping(jwk)
    _check_rsa_type(members)
    if "d" not in members:
        raise JwkError(
            "the JWK holds no private exponent 'd': it is a public key, not a released key"
        )
    n = _member_int(members, "n")
    e = _member_int(members, "e")
    d = _member_int(members, "d")
    crt_names = ("p", "q", "dp", "dq", "qi")
    present = [name for name in crt_names if name in members]
    if present and len(present) != len(crt_names):
        missing = ", ".join(name for name in crt_names if name not in members)
        raise JwkError(f"RSA JWK has some CRT members but not {missing}")
    if present:
        p = _member_int(members, "p")
        q = _member_int(members, "q")
        dmp1 = _member_int(members, "dp")
        dmq1 = _member_int(members, "dq")
        iqmp = _member_int(members, "qi")
    else:
        try:
            p, q = rsa.rsa_recover_prime_factors(n, e, d)
        except ValueError as exc:
            raise JwkError(f"cannot recover the RSA primes from n, e, d: {exc}") from exc
        dmp1 = rsa.rsa_crt_dmp1(d, p)
        dmq1 = rsa.rsa_crt_dmq1(d, q)
        iqmp = rsa.rsa_crt_iqmp(p, q)
    numbers = rsa.RSAPrivateNumbers(
        p=p, q=q, d=d, dmp1=dmp1, dmq1=dmq1, iqmp=iqmp, public_numbers=rsa.RSAPublicNumbers(e, n)
    )
    try:
        key = numbers.private_key()
    except ValueError as exc:
        raise JwkError(f"the RSA private key numbers are inconsistent: {exc}") from exc
    finally:
        del d, p, q, dmp1, dmq1, iqmp, numbers
    if key.key_size < MIN_RSA_BITS:
        raise JwkError(f"RSA key of {key.key_size} bits is below the minimum {MIN_RSA_BITS}")
    return key


def rsa_public_jwk(key: rsa.RSAPublicKey) -> dict[str, str]:
    """The public JWK (kty, n, e) of an RSA key."""
    numbers = key.public_numbers()
    return {"kty": "RSA", "n": _int_to_b64url(numbers.n), "e": _int_to_b64url(numbers.e)}


def rsa_private_jwk(key: rsa.RSAPrivateKey) -> dict[str, str]:
    """The full private JWK of an RSA key, as the SKR sidecar returns a released key."""
    numbers = key.private_numbers()
    return {
        **rsa_public_jwk(key.public_key()),
        "d": _int_to_b64url(numbers.d),
        "p": _int_to_b64url(numbers.p),
        "q": _int_to_b64url(numbers.q),
        "dp": _int_to_b64url(numbers.dmp1),
        "dq": _int_to_b64url(numbers.dmq1),
        "qi": _int_to_b64url(numbers.iqmp),
    }


def rsa_thumbprint(key: rsa.RSAPublicKey) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url) of an RSA public key."""
    jwk = rsa_public_jwk(key)
    canonical = json.dumps(
        {"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"), sort_keys=True
    )
    return b64url_encode(hashlib.sha256(canonical.encode("ascii")).digest())
