"""A throwaway CA and the certificates the LOCAL STAND-INS serve and sign with.

Not a security boundary: the CA's key lives only in the memory of the process that made it, and
every certificate lasts a day. It exists so that the clients under test verify TLS (and the Key
Vault stand-in's signed release answers) exactly as they would against Azure, just against this
CA instead of a public one.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
LIFETIME = datetime.timedelta(days=1)

LeafKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def _general_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def certificate_hosts(hosts: Iterable[str]) -> list[str]:
    """The loopback names plus `hosts`, deduplicated, without wildcard bind addresses (0.0.0.0
    and :: name no host a client could dial, so no certificate can name them)."""
    names: list[str] = []
    for host in (*DEFAULT_HOSTS, *hosts):
        try:
            unspecified = ipaddress.ip_address(host).is_unspecified
        except ValueError:
            unspecified = False
        if host and not unspecified and host not in names:
            names.append(host)
    return names


class LocalCa:
    """A CA that issues server certificates for the stand-ins' hosts."""

    def __init__(self, name: str = "veil local stand-ins CA") -> None:
        now = datetime.datetime.now(datetime.UTC)
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(self._name)
            .issuer_name(self._name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), False)
            .sign(self._key, hashes.SHA256())
        )

    def issue(self, hosts: Iterable[str], key: LeafKey) -> x509.Certificate:
        """A server certificate for `key`, valid for `hosts` (their first one is its CN)."""
        names = list(hosts)
        if not names:
            raise ValueError("a server certificate needs at least one host")
        now = datetime.datetime.now(datetime.UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(self._name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + LIFETIME)
            .add_extension(
                x509.SubjectAlternativeName([_general_name(h) for h in names]), critical=False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), False
            )
            .sign(self._key, hashes.SHA256())
        )


@dataclass(frozen=True)
class TlsFiles:
    ca_file: Path
    cert_file: Path
    key_file: Path
    # The CA itself, for certificates issued later (the Key Vault stand-in's signing one).
    ca: LocalCa | None = field(default=None, repr=False, compare=False)

    def server_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(self.cert_file, self.key_file)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A client context that trusts this CA only."""
        return ssl.create_default_context(cafile=str(self.ca_file))


def make_tls(directory: Path, hosts: Iterable[str] = ()) -> TlsFiles:
    """Write ca.pem, server.crt and server.key (PEM) to `directory`; the server certificate is
    valid for 127.0.0.1, localhost and every one of `hosts`."""
    ca = LocalCa()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(certificate_hosts(hosts), key)
    directory.mkdir(parents=True, exist_ok=True)
    tls = TlsFiles(directory / "ca.pem", directory / "server.crt", directory / "server.key", ca)
    tls.ca_file.write_bytes(ca.certificate.public_bytes(serialization.Encoding.PEM))
    tls.cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tls.key_file.touch(mode=0o600)
    tls.key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tls
