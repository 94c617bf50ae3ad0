"""The key that signs the Key Vault stand-in's Secure Key Release answers, and its certificate.

Part of the LOCAL STAND-INS, not a security boundary. Key Vault signs a release answer as a JWS
(RS256) whose header carries the signer's certificate chain (`x5c`, leaf first) and the leaf's
SHA-256 thumbprint (`x5t#S256`); the SKR sidecar verifies the signature with the leaf's key and
the chain against its trusted roots for the vault's host name. So the stand-in's signer has a
server certificate for the vault's hosts, issued by the stand-ins' CA.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from veil_standins.jose import b64url
from veil_standins.tls import LocalCa, certificate_hosts


@dataclass(frozen=True)
class ReleaseSigner:
    key: rsa.RSAPrivateKey
    chain: tuple[x509.Certificate, ...]

    @classmethod
    def issued_by(cls, ca: LocalCa, hosts: Iterable[str]) -> ReleaseSigner:
        """A signer whose certificate `ca` issued for the vault's `hosts` (plus loopback)."""
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return cls(key, (ca.issue(certificate_hosts(hosts), key), ca.certificate))

    @classmethod
    def untrusted(cls, hosts: Iterable[str]) -> ReleaseSigner:
        """A signer under a CA of its own that no one trusts: answers it signs open with
        `jwt.decode`, but a verifying SKR sidecar refuses them."""
        return cls.issued_by(LocalCa("veil untrusted release signer CA"), hosts)

    def sign(self, payload: Mapping[str, Any]) -> str:
        leaf = self.chain[0].public_bytes(serialization.Encoding.DER)
        headers = {
            "x5c": [
                base64.b64encode(c.public_bytes(serialization.Encoding.DER)).decode()
                for c in self.chain
            ],
            "x5t#S256": b64url(hashlib.sha256(leaf).digest()),
        }
        return jwt.encode(dict(payload), self.key, algorithm="RS256", headers=headers)
