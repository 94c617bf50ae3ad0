"""Which CAs the SKR stand-in trusts, for TLS and for the signer of Key Vault's answers.

Part of the LOCAL STAND-INS, not a security boundary. Like the real sidecar (pkg/common/akv.go),
a release answer is believed only when its JWS header's `x5c` chain leads to a trusted root and
its leaf certificate names the vault's host; the leaf's key then verifies the signature.
"""

from __future__ import annotations

import ipaddress
import os
import ssl
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

# The stand-ins' own CA bundle first; SSL_CERT_FILE is what OpenSSL clients read.
TRUST_VARIABLES = ("VEIL_AZURE_CA_BUNDLE", "SSL_CERT_FILE")
_PEM_END = b"-----END CERTIFICATE-----"


class UntrustedChainError(Exception):
    """A certificate chain does not lead to a trusted root for the expected host."""


def _certificates(path: Path) -> list[x509.Certificate]:
    """The certificates of a PEM bundle; ones `cryptography` cannot read are skipped (system
    bundles hold a few odd ones)."""
    found = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation notes about those odd ones
        for block in path.read_bytes().split(_PEM_END):
            if b"-----BEGIN CERTIFICATE-----" not in block:
                continue
            try:
                found.append(x509.load_pem_x509_certificate(block + _PEM_END))
            except ValueError:
                continue
    return found


def _subject(host: str) -> x509.DNSName | x509.IPAddress:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


@dataclass(frozen=True)
class Trust:
    context: ssl.SSLContext
    roots: tuple[x509.Certificate, ...]

    @classmethod
    def from_files(cls, bundles: Iterable[Path]) -> Trust:
        """Trust the system's CAs for TLS plus `bundles`; for signers, `bundles` only, or the
        system's when there are none."""
        paths = list(bundles)
        context = ssl.create_default_context()
        roots: list[x509.Certificate] = []
        for path in paths:
            context.load_verify_locations(cafile=str(path))
            roots.extend(_certificates(path))
        if not paths:
            system = ssl.get_default_verify_paths().cafile
            if system and Path(system).is_file():
                roots.extend(_certificates(Path(system)))
        return cls(context, tuple(roots))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Trust:
        return cls.from_files(Path(environ[v]) for v in TRUST_VARIABLES if environ.get(v))

    def verify_chain(self, chain: list[x509.Certificate], host: str) -> None:
        """Raise UntrustedChainError unless chain[0] is a server certificate for `host` that
        chains (through chain[1:]) to a trusted root."""
        if not chain or not self.roots:
            raise UntrustedChainError("no certificate chain, or no trusted roots")
        verifier = (
            PolicyBuilder().store(Store(list(self.roots))).build_server_verifier(_subject(host))
        )
        try:
            verifier.verify(chain[0], chain[1:])
        except VerificationError as exc:
            raise UntrustedChainError(f"the signer's certificate is not trusted: {exc}") from exc
