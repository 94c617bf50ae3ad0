"""MAA's guest attestation of an Azure confidential VM through its vTPM (`/attest/AzureGuest`),
for the LOCAL STAND-IN. NOT a security boundary: the "hardware" key it trusts is a test key.

The request is what Azure's clients (Azure/cvm-attestation-tools, the guest attestation
library) send:

    POST /attest/AzureGuest?api-version=2020-10-01   {"AttestationInfo": base64url(JSON)}

    AttestationInfo  {"AttestationProtocolVersion", "OSType", ..., "TcgLogs", "ClientPayload",
                      "TpmInfo": {"AikCert", "AikPub", "PcrQuote", "PcrSignature", "PcrSet",
                                  "PCRs": [{"Index", "Digest"}], "EncKeyPub",
                                  "EncKeyCertifyInfo", "EncKeyCertifyInfoSignature"},
                      "IsolationInfo": {"Type": "SevSnp", "Evidence": {
                          "Proof": base64url(JSON {"SnpReport", "VcekCertChain"}),
                          "RunTimeData": base64url(the HCL runtime data)}}}

TPM structures are standard base64 of their TPM marshaling (TPM2B_PUBLIC, TPMS_ATTEST, raw
RSASSA signatures). The stand-in refuses, as MAA does, unless:

  * the AK certificate was issued by the trusted vTPM CA and holds the AK's public key;
  * the SNP report is signed by the trusted hardware key (standing for AMD's VCEK chain), its
    REPORT_DATA starts with SHA-256 of the runtime data, and the runtime data's `HCLAkPub` key
    is the AK (so the AK belongs to this very confidential VM);
  * the PCR quote is signed by the AK, covers exactly the submitted PCR values, and its
    qualifying data (a 32-byte nonce) has not been seen before;
  * the ephemeral key's TPM2_Certify is signed by the AK and names exactly the submitted key,
    whose attributes make it a TPM-resident, non-exportable decryption key.

Refusals are HTTP 400 with `{"error": {"code", "message"}}`. The answer is `{"token": envelope}`:
the JWT encrypted to the ephemeral key, as MAA does it (AES-256-GCM with additional data
"Transport Key"; the AES key RSAES-PKCS1-v1_5 to the TPM key):

    envelope = base64url(JSON {"Jwt": b64(ciphertext), "AuthenticationData": b64(GCM tag),
                               "EncryptionParams": {"Iv": b64(iv)}, "EncryptedInnerKey": b64})
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import os
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil_standins.jose import b64url, b64url_decode, rsa_public_jwk

GUEST_ATTEST_PATH = "/attest/AzureGuest"
TRANSPORT_KEY_AAD = b"Transport Key"

# HCL report layout (Azure/cvm-attestation-tools ReportParser).
HCL_SIGNATURE = b"HCLA"
HW_REPORT_OFFSET = 32
SNP_REPORT_SIZE = 1184
HCL_DATA_OFFSET = 1216
RUNTIME_DATA_OFFSET = HCL_DATA_OFFSET + 20
HCL_REPORT_TYPE_SNP = 2
# SEV-SNP ATTESTATION_REPORT: REPORT_DATA, POLICY (bit 19: debug allowed), signature.
SNP_POLICY_OFFSET = 0x08
SNP_POLICY_DEBUG = 1 << 19
SNP_REPORT_DATA_OFFSET = 0x50
SNP_SIGNATURE_OFFSET = 0x2A0
SNP_SIGNATURE_COMPONENT = 72

# TPM 2.0 constants.
TPM_GENERATED_VALUE = 0xFF544347
TPM_ST_ATTEST_CERTIFY = 0x8017
TPM_ST_ATTEST_QUOTE = 0x8018
TPM_ALG_RSA = 0x0001
TPM_ALG_SHA256 = 0x000B
TPM_ALG_NULL = 0x0010
FIXED_TPM = 1 << 1
FIXED_PARENT = 1 << 4
SENSITIVE_DATA_ORIGIN = 1 << 5
USER_WITH_AUTH = 1 << 6
RESTRICTED = 1 << 16
DECRYPT = 1 << 17
SIGN = 1 << 18
NONCE_BYTES = 32
# GuestTrust.to_files / load_guest_trust: the vTPM AK CA certificate, the "hardware" public key.
AK_CA_FILE = "ak-ca.pem"
HARDWARE_KEY_FILE = "hardware-key.pem"


class GuestEvidenceError(ValueError):
    """The evidence does not prove what it claims; the message says which check failed."""


@dataclass
class GuestTrust:
    """What the stand-in believes: the vTPM AK CA, and the key that signs "hardware" reports."""

    ak_ca: x509.Certificate
    hardware_key: ec.EllipticCurvePublicKey
    _nonces: set[bytes] = field(default_factory=set, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def use_nonce(self, nonce: bytes) -> None:
        if len(nonce) != NONCE_BYTES:
            raise GuestEvidenceError(
                f"the quote's qualifying data is not a {NONCE_BYTES}-byte nonce"
            )
        with self._lock:
            if nonce in self._nonces:
                raise GuestEvidenceError("the quote's nonce was used before (a replayed quote)")
            self._nonces.add(nonce)

    def to_files(self, directory: Path) -> None:
        """Write the trust (public material only) as PEM for another process to load with
        `load_guest_trust`: the stand-ins run apart from whatever provisioned the vTPM."""
        directory.mkdir(parents=True, exist_ok=True)
        pem, spki = serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        (directory / AK_CA_FILE).write_bytes(self.ak_ca.public_bytes(pem))
        (directory / HARDWARE_KEY_FILE).write_bytes(self.hardware_key.public_bytes(pem, spki))


def load_guest_trust(directory: Path) -> GuestTrust:
    """The trust `GuestTrust.to_files` wrote in `directory`, with a fresh nonce memory.
    Raises OSError for a missing file and ValueError for one that is not what it should be."""
    ak_ca = x509.load_pem_x509_certificate((directory / AK_CA_FILE).read_bytes())
    hardware_key = serialization.load_pem_public_key((directory / HARDWARE_KEY_FILE).read_bytes())
    if not isinstance(hardware_key, ec.EllipticCurvePublicKey):
        raise ValueError(f"{directory / HARDWARE_KEY_FILE} is not an EC public key")
    return GuestTrust(ak_ca, hardware_key)


# -- TPM structures -------------------------------------------------------------------------


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def take(self, size: int) -> bytes:
        if self.at + size > len(self.data):
            raise GuestEvidenceError("a TPM structure is truncated")
        chunk = self.data[self.at : self.at + size]
        self.at += size
        return chunk

    def u16(self) -> int:
        return int(struct.unpack(">H", self.take(2))[0])

    def u32(self) -> int:
        return int(struct.unpack(">I", self.take(4))[0])

    def sized(self) -> bytes:
        return self.take(self.u16())


@dataclass(frozen=True)
class TpmPublic:
    """An RSA TPMT_PUBLIC: its key, attributes, and TPM Name (nameAlg || SHA-256 of it)."""

    key: rsa.RSAPublicKey
    attributes: int
    name: bytes


def parse_tpm2b_public(blob: bytes) -> TpmPublic:
    outer = _Reader(blob)
    area = outer.sized()
    reader = _Reader(area)
    if reader.u16() != TPM_ALG_RSA:
        raise GuestEvidenceError("the TPM key is not an RSA key")
    if reader.u16() != TPM_ALG_SHA256:
        raise GuestEvidenceError("the TPM key's name algorithm is not SHA-256")
    attributes = reader.u32()
    reader.sized()  # authPolicy
    if reader.u16() != TPM_ALG_NULL:  # symmetric: a storage parent's, not ours
        reader.take(4)
    if reader.u16() != TPM_ALG_NULL:  # scheme with its hash
        reader.take(2)
    reader.u16()  # keyBits
    exponent = reader.u32() or 65537
    modulus = int.from_bytes(reader.sized(), "big")
    if reader.at != len(area):
        raise GuestEvidenceError("the TPM public area has trailing bytes")
    key = rsa.RSAPublicNumbers(exponent, modulus).public_key()
    name = struct.pack(">H", TPM_ALG_SHA256) + hashlib.sha256(area).digest()
    return TpmPublic(key, attributes, name)


@dataclass(frozen=True)
class Attest:
    kind: int
    signer: bytes
    extra_data: bytes
    attested: _Reader


def parse_attest(blob: bytes) -> Attest:
    reader = _Reader(blob)
    if reader.u32() != TPM_GENERATED_VALUE:
        raise GuestEvidenceError("the attestation was not generated by a TPM")
    kind = reader.u16()
    signer = reader.sized()
    extra = reader.sized()
    reader.take(17 + 8)  # clockInfo, firmwareVersion
    return Attest(kind, signer, extra, reader)


def _verify_tpm_signature(
    key: rsa.RSAPublicKey, message: bytes, signature: bytes, what: str
) -> None:
    try:
        key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature as exc:
        raise GuestEvidenceError(f"{what} is not signed by the AK") from exc


# -- the checks -----------------------------------------------------------------------------


def _b64(info: Mapping[str, Any], name: str) -> bytes:
    value = info.get(name)
    if not isinstance(value, str):
        raise GuestEvidenceError(f"{name} is missing")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as exc:
        raise GuestEvidenceError(f"{name} is not base64") from exc


def _check_ak(tpm_info: Mapping[str, Any], trust: GuestTrust) -> TpmPublic:
    ak = parse_tpm2b_public(_b64(tpm_info, "AikPub"))
    if ak.attributes & (FIXED_TPM | RESTRICTED | SIGN) != FIXED_TPM | RESTRICTED | SIGN:
        raise GuestEvidenceError("the AK is not a restricted signing key fixed to its TPM")
    try:
        certificate = x509.load_der_x509_certificate(_b64(tpm_info, "AikCert"))
        certificate.verify_directly_issued_by(trust.ak_ca)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise GuestEvidenceError(f"the AK certificate is not issued by the vTPM CA: {exc}") from exc
    now = dt.datetime.now(dt.UTC)
    if not certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc:
        raise GuestEvidenceError("the AK certificate is not valid now")
    if certificate.public_key() != ak.key:
        raise GuestEvidenceError("the AK certificate is for another key")
    return ak


def _check_quote(tpm_info: Mapping[str, Any], ak: TpmPublic, trust: GuestTrust) -> None:
    message = _b64(tpm_info, "PcrQuote")
    _verify_tpm_signature(ak.key, message, _b64(tpm_info, "PcrSignature"), "the PCR quote")
    quote = parse_attest(message)
    # (qualifiedSigner is hierarchy-qualified; the AK's signature already says who signed.)
    if quote.kind != TPM_ST_ATTEST_QUOTE:
        raise GuestEvidenceError("the PCR quote is not a quote by the AK")
    selected: list[int] = []
    for _ in range(quote.attested.u32()):
        if quote.attested.u16() != TPM_ALG_SHA256:
            raise GuestEvidenceError("the PCR quote covers a bank other than SHA-256")
        bitmap = quote.attested.take(quote.attested.take(1)[0])
        selected += [i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1]
    digest = quote.attested.sized()
    pcrs = tpm_info.get("PCRs")
    if not isinstance(pcrs, list):
        raise GuestEvidenceError("PCRs is missing")
    values = {int(p["Index"]): _b64(p, "Digest") for p in pcrs if isinstance(p, Mapping)}
    if sorted(values) != selected:
        raise GuestEvidenceError("the submitted PCRs are not the quoted ones")
    if hashlib.sha256(b"".join(values[i] for i in selected)).digest() != digest:
        raise GuestEvidenceError("the submitted PCR values do not match the quote's digest")
    trust.use_nonce(quote.extra_data)


def _check_ephemeral_key(tpm_info: Mapping[str, Any], ak: TpmPublic) -> TpmPublic:
    key = parse_tpm2b_public(_b64(tpm_info, "EncKeyPub"))
    needed = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | DECRYPT
    if key.attributes & needed != needed or key.attributes & SIGN:
        raise GuestEvidenceError("the ephemeral key is not a TPM-resident decryption-only key")
    info = _b64(tpm_info, "EncKeyCertifyInfo")
    _verify_tpm_signature(
        ak.key,
        info,
        _b64(tpm_info, "EncKeyCertifyInfoSignature"),
        "the ephemeral key's certify info",
    )
    certify = parse_attest(info)
    if certify.kind != TPM_ST_ATTEST_CERTIFY:
        raise GuestEvidenceError("the ephemeral key's certify info is not a TPM2_Certify by the AK")
    if certify.attested.sized() != key.name:
        raise GuestEvidenceError("the AK certified another key than the submitted ephemeral key")
    return key


def _vcek_key(pem: bytes) -> ec.EllipticCurvePublicKey | None:
    """The EC key of the first PEM block of a VCEK chain (a certificate or a public key)."""
    key: object
    try:
        if b"CERTIFICATE" in pem.split(b"\n", 1)[0]:
            key = x509.load_pem_x509_certificate(pem).public_key()
        else:
            key = serialization.load_pem_public_key(pem)
    except ValueError:
        return None
    return key if isinstance(key, ec.EllipticCurvePublicKey) else None


def _check_isolation(
    isolation: Any, ak: TpmPublic, trust: GuestTrust
) -> tuple[dict[str, Any], bool]:
    """The HCL runtime data and whether the VM is debuggable, once the report vouches for it."""
    if not isinstance(isolation, Mapping) or isolation.get("Type") != "SevSnp":
        raise GuestEvidenceError("only SevSnp isolation evidence is supported by this stand-in")
    evidence = isolation.get("Evidence")
    if not isinstance(evidence, Mapping):
        raise GuestEvidenceError("IsolationInfo.Evidence is missing")
    try:
        proof = json.loads(b64url_decode(str(evidence.get("Proof", ""))))
        report = b64url_decode(str(proof["SnpReport"]))
        vcek_pem = b64url_decode(str(proof.get("VcekCertChain", "")))
        runtime_bytes = b64url_decode(str(evidence.get("RunTimeData", "")))
        runtime = json.loads(runtime_bytes)
    except (ValueError, KeyError, TypeError) as exc:
        raise GuestEvidenceError(f"the isolation evidence is malformed: {exc}") from exc
    if len(report) != SNP_REPORT_SIZE:
        raise GuestEvidenceError("the SNP report has the wrong size")
    component = SNP_SIGNATURE_COMPONENT
    r = int.from_bytes(report[SNP_SIGNATURE_OFFSET : SNP_SIGNATURE_OFFSET + component], "little")
    s = int.from_bytes(
        report[SNP_SIGNATURE_OFFSET + component : SNP_SIGNATURE_OFFSET + 2 * component], "little"
    )
    # MAA checks the report with the VCEK the chain holds, and the chain up to AMD's root; here
    # the trusted "hardware" key stands for both, so the chain must name exactly that key.
    vcek = _vcek_key(vcek_pem)
    if vcek is None or vcek.public_numbers() != trust.hardware_key.public_numbers():
        raise GuestEvidenceError("the VCEK chain is missing or does not lead to a trusted root")
    try:
        vcek.verify(
            encode_dss_signature(r, s), report[:SNP_SIGNATURE_OFFSET], ec.ECDSA(hashes.SHA384())
        )
    except InvalidSignature as exc:
        raise GuestEvidenceError(
            "the SNP report is not signed by the trusted hardware key"
        ) from exc
    report_data = report[SNP_REPORT_DATA_OFFSET : SNP_REPORT_DATA_OFFSET + 32]
    if report_data != hashlib.sha256(runtime_bytes).digest():
        raise GuestEvidenceError("the SNP report's REPORT_DATA is not the runtime data's hash")
    keys = runtime.get("keys") if isinstance(runtime, Mapping) else None
    ak_jwk = next(
        (k for k in keys or [] if isinstance(k, Mapping) and k.get("kid") == "HCLAkPub"), None
    )
    if ak_jwk is None or (ak_jwk.get("n"), ak_jwk.get("e")) != tuple(
        rsa_public_jwk(ak.key)[m] for m in ("n", "e")
    ):
        raise GuestEvidenceError("the HCL runtime data does not name this AK (HCLAkPub)")
    (policy,) = struct.unpack_from("<Q", report, SNP_POLICY_OFFSET)
    return dict(runtime), bool(policy & SNP_POLICY_DEBUG)


def _client_payload(info: Mapping[str, Any]) -> dict[str, Any]:
    """The ClientPayload (base64 of a JSON object, or empty), as MAA passes it through."""
    encoded = info.get("ClientPayload") or ""
    try:
        raw = base64.b64decode(str(encoded), validate=True)
        payload = json.loads(raw) if raw else {}
    except (ValueError, binascii.Error) as exc:
        raise GuestEvidenceError(f"ClientPayload is not base64 JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise GuestEvidenceError("ClientPayload is not a JSON object")
    return payload


def verify_guest_evidence(info: Mapping[str, Any], trust: GuestTrust) -> dict[str, Any]:
    """The claims MAA issues for verified guest evidence; GuestEvidenceError otherwise."""
    tpm_info = info.get("TpmInfo")
    if not isinstance(tpm_info, Mapping):
        raise GuestEvidenceError("TpmInfo is missing")
    ak = _check_ak(tpm_info, trust)
    runtime, debuggable = _check_isolation(info.get("IsolationInfo"), ak, trust)
    ephemeral = _check_ephemeral_key(tpm_info, ak)
    _check_quote(tpm_info, ak, trust)
    runtime_key = {
        **rsa_public_jwk(ephemeral.key),
        "kid": "TpmEphemeralEncryptionKey",
        "key_ops": ["encrypt"],
    }
    return {
        "x-ms-attestation-type": "azurevm",
        "x-ms-azurevm-vmid": str(runtime.get("vm-configuration", {}).get("vmUniqueId", "")),
        "x-ms-isolation-tee": {
            "x-ms-attestation-type": "sevsnpvm",
            "x-ms-compliance-status": "azure-compliant-cvm",
            "x-ms-sevsnpvm-is-debuggable": debuggable,
            "x-ms-runtime": runtime,
        },
        "x-ms-runtime": {"keys": [runtime_key], "client-payload": _client_payload(info)},
        "x-ms-ver": "1.0",
        "x-veil-simulated": True,
    }


def encrypt_token(token: str, key: rsa.RSAPublicKey) -> str:
    """The envelope MAA returns for guest attestation: the JWT readable only with the TPM key."""
    inner_key, iv = AESGCM.generate_key(bit_length=256), os.urandom(12)
    sealed = AESGCM(inner_key).encrypt(iv, token.encode(), TRANSPORT_KEY_AAD)
    document = {
        "Jwt": base64.b64encode(sealed[:-16]).decode(),
        "AuthenticationData": base64.b64encode(sealed[-16:]).decode(),
        "EncryptionParams": {"Iv": base64.b64encode(iv).decode()},
        "EncryptedInnerKey": base64.b64encode(key.encrypt(inner_key, padding.PKCS1v15())).decode(),
    }
    return b64url(json.dumps(document).encode())


def guest_attest_handler(
    trust: Callable[[], GuestTrust | None], sign: Callable[[dict[str, Any]], str]
) -> Callable[[web.Request], Any]:
    """The aiohttp handler of `/attest/AzureGuest`; `sign` turns claims into a token."""

    async def handle(request: web.Request) -> web.Response:
        def refuse(code: str, message: str) -> web.Response:
            return web.json_response({"error": {"code": code, "message": message}}, status=400)

        if "api-version" not in request.query:
            return refuse("InvalidParameter", "api-version is required")
        trusted = trust()
        if trusted is None:
            return refuse("InvalidParameter", "no trusted vTPM CA: guest attestation is off")
        try:
            body = await request.json()
            info = json.loads(b64url_decode(str(body["AttestationInfo"])))
            if not isinstance(info, dict):
                raise TypeError("AttestationInfo is not a JSON object")
        except (ValueError, KeyError, TypeError) as exc:
            return refuse("InvalidParameter", f"bad AzureGuest request: {exc}")
        try:
            claims = verify_guest_evidence(info, trusted)
        except GuestEvidenceError as exc:
            return refuse("AttestationFailed", f"guest attestation failed: {exc}")
        key = parse_tpm2b_public(base64.b64decode(info["TpmInfo"]["EncKeyPub"])).key
        return web.json_response({"token": encrypt_token(sign(claims), key)})

    return handle
