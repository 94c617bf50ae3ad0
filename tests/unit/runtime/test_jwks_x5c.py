"""The x5c certificates of an issuer's JWKS: used only while valid, with a key of at least 2048
bits, each certificate of a chain issued by the next; n/e must agree with the certificate."""

from __future__ import annotations

import base64
import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from veil.runtime.jwk import rsa_public_jwk
from veil.runtime.jwks import IssuerKeys, SigningKeyError, read_jwks

pytestmark = pytest.mark.anyio
NOW = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
ISSUER = "https://maa.example"


def _key(bits: int = 2048) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def _certificate(
    key: rsa.RSAPrivateKey,
    name: str,
    *,
    signer: rsa.RSAPrivateKey | None = None,
    issuer: str | None = None,
    days: tuple[int, int] = (-1, 1),
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer or name)])
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW + dt.timedelta(days=days[0]))
        .not_valid_after(NOW + dt.timedelta(days=days[1]))
        .sign(signer or key, hashes.SHA256())
    )


def _x5c(*certificates: x509.Certificate) -> list[str]:
    return [
        base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode() for c in certificates
    ]


def _entry(kid: str, chain: list[str], **extra: Any) -> dict[str, Any]:
    return {"kty": "RSA", "kid": kid, "x5c": chain, **extra}


@pytest.fixture(scope="module")
def signer() -> rsa.RSAPrivateKey:
    return _key()


@pytest.fixture(scope="module")
def ca() -> rsa.RSAPrivateKey:
    return _key()


def test_a_valid_self_issued_certificate_is_used(signer: rsa.RSAPrivateKey) -> None:
    keys, refused = read_jwks({"keys": [_entry("k", _x5c(_certificate(signer, "maa")))]}, NOW)
    assert keys["k"].public_numbers() == signer.public_key().public_numbers()
    assert refused == {}


@pytest.mark.parametrize(
    ("days", "message"),
    [((-10, -1), "x5c[0] expired at"), ((1, 10), "x5c[0] is not valid before")],
)
def test_a_certificate_outside_its_validity_is_refused(
    signer: rsa.RSAPrivateKey, days: tuple[int, int], message: str
) -> None:
    chain = _x5c(_certificate(signer, "maa", days=days))
    keys, refused = read_jwks({"keys": [_entry("k", chain)]}, NOW)
    assert keys == {}
    assert message in refused["k"]


def test_a_small_key_is_refused() -> None:
    small = _key(1024)
    keys, refused = read_jwks({"keys": [_entry("k", _x5c(_certificate(small, "maa")))]}, NOW)
    assert keys == {}
    assert "1024 bits is below the minimum 2048" in refused["k"]


def test_a_chain_is_checked_link_by_link(signer: rsa.RSAPrivateKey, ca: rsa.RSAPrivateKey) -> None:
    root = _certificate(ca, "maa root")
    leaf = _certificate(signer, "maa signer", signer=ca, issuer="maa root")
    keys, _ = read_jwks({"keys": [_entry("good", _x5c(leaf, root))]}, NOW)
    assert "good" in keys
    impostor = _certificate(_key(), "maa root")  # same name, another key
    forged = _certificate(signer, "maa signer", signer=_key(), issuer="maa root")
    expired_root = _certificate(ca, "maa root", days=(-10, -1))
    keys, refused = read_jwks(
        {
            "keys": [
                _entry("impostor", _x5c(leaf, impostor)),
                _entry("forged", _x5c(forged, root)),
                _entry("expired-root", _x5c(leaf, expired_root)),
            ]
        },
        NOW,
    )
    assert keys == {}
    assert "x5c[0] is not issued by x5c[1]" in refused["impostor"]
    assert "x5c[0] is not issued by x5c[1]" in refused["forged"]
    assert "x5c[1] expired" in refused["expired-root"]


def test_n_and_e_must_agree_with_the_certificate(signer: rsa.RSAPrivateKey) -> None:
    chain = _x5c(_certificate(signer, "maa"))
    other = rsa_public_jwk(_key().public_key())
    keys, refused = read_jwks({"keys": [_entry("k", chain, n=other["n"], e=other["e"])]}, NOW)
    assert keys == {}
    assert "different keys" in refused["k"]


async def test_a_refused_key_is_named_when_a_token_asks_for_it(signer: rsa.RSAPrivateKey) -> None:
    chain = _x5c(_certificate(signer, "maa", days=(-10, -1)))

    async def fetch(url: str) -> Any:
        if url.endswith("openid-configuration"):
            return {"issuer": ISSUER, "jwks_uri": f"{ISSUER}/certs"}
        return {"keys": [_entry("k", chain)]}

    keys = IssuerKeys(fetch, wall_clock=NOW.timestamp)
    with pytest.raises(SigningKeyError, match="signing key 'k' is refused: x5c\\[0\\] expired"):
        await keys.key_for(ISSUER, "k")
