"""Guest attestation of this confidential VM to Microsoft Azure Attestation, through the vTPM.

The wire format is the one Azure's own clients speak (Azure/cvm-attestation-tools,
Azure/confidential-computing-cvm-guest-attestation):

    POST https://{maa}/attest/AzureGuest?api-version=2020-10-01  {"AttestationInfo": b64url(JSON)}
      -> {"token": b64url(JSON {"Jwt", "AuthenticationData", "EncryptionParams": {"Iv"},
                                "EncryptedInnerKey"})}

The evidence: the HCL report (the SEV-SNP report whose REPORT_DATA binds the HCL runtime data,
which names the AK), the AK certificate and public key, a PCR quote by the AK, and a fresh TPM
decryption key certified by the AK. MAA encrypts its token to that key (AES-256-GCM, the AES key
RSAES-PKCS1-v1_5 to the TPM key) and names it in `x-ms-runtime.keys`, so Key Vault wraps released
keys to it too: only this TPM can open either.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import os
import platform
import ssl
import struct
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from veil.node_agent.tpm import (
    AK_CERT_INDEX,
    AK_HANDLE,
    DEFAULT_PCRS,
    HCL_REPORT_INDEX,
    EphemeralKey,
    Tpm,
    TpmError,
)
from veil.runtime.jwk import b64url_decode, b64url_encode, rsa_public_jwk

log = logging.getLogger("veil.node_agent.attestation")

API_VERSION = "2020-10-01"
PROTOCOL_VERSION = "2.0"
TRANSPORT_KEY_AAD = b"Transport Key"
IMDS_VCEK_URL = "http://169.254.169.254/metadata/THIM/amd/certification"
TCG_LOG_PATH = Path("/sys/kernel/security/tpm0/binary_bios_measurements")
# Re-attest this long before MAA's token expires, so no release presents a dying token.
RENEW_BEFORE_SECONDS = 300
MAX_RESPONSE_BYTES = 1024 * 1024

# HCL report layout: "HCLA" header, hardware report at 32, IGVM request data at 1216 (its
# report type at +8, the runtime data's size at +16, the runtime data itself at +20).
_HW_REPORT_OFFSET = 32
_HCL_DATA_OFFSET = 1216
_REPORT_TYPES = {2: ("SevSnp", 1184), 4: ("Tdx", 1024)}


class AttestationError(Exception):
    """Attestation failed. `retriable` says whether trying again later may help."""

    def __init__(self, message: str, *, retriable: bool) -> None:
        super().__init__(message)
        self.retriable = retriable


@dataclass(frozen=True)
class HclReport:
    isolation: str  # "SevSnp" | "Tdx"
    hardware_report: bytes
    runtime_data: bytes

    @classmethod
    def parse(cls, blob: bytes) -> HclReport:
        if blob[:4] != b"HCLA" or len(blob) < _HCL_DATA_OFFSET + 20:
            raise AttestationError("NV 0x01400001 holds no HCL report", retriable=False)
        report_type, size = struct.unpack_from("<I4xI", blob, _HCL_DATA_OFFSET + 8)
        if report_type not in _REPORT_TYPES:
            raise AttestationError(f"unknown HCL report type {report_type}", retriable=False)
        isolation, hw_size = _REPORT_TYPES[report_type]
        start = _HCL_DATA_OFFSET + 20
        if start + size > len(blob):
            raise AttestationError("the HCL runtime data runs past the report", retriable=False)
        hardware = blob[_HW_REPORT_OFFSET : _HW_REPORT_OFFSET + hw_size]
        return cls(isolation, hardware, blob[start : start + size])


def der_prefix(blob: bytes) -> bytes:
    """The DER object at the start of `blob` (NV indices are zero-padded past it)."""
    if len(blob) < 2 or blob[0] != 0x30:
        raise AttestationError("the AK certificate index holds no DER certificate", retriable=False)
    length, header = blob[1], 2
    if length & 0x80:
        count = length & 0x7F
        length, header = int.from_bytes(blob[2 : 2 + count], "big"), 2 + count
    return blob[: header + length]


@dataclass(frozen=True)
class AttestedToken:
    """MAA's token for this node, and the TPM key that token (and Key Vault) encrypts to."""

    token: str = field(repr=False)
    key: EphemeralKey = field(repr=False)
    expires_at: float


VcekSource = Callable[[], Awaitable[bytes]]


def imds_vcek_chain(url: str = IMDS_VCEK_URL) -> VcekSource:
    """The VCEK certificate chain of this host from the Azure IMDS (THIM), as Azure's clients
    send it with an SEV-SNP report."""

    async def fetch() -> bytes:
        timeout = aiohttp.ClientTimeout(total=10)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url, headers={"Metadata": "true"}) as response,
            ):
                response.raise_for_status()
                document = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise AttestationError(
                f"cannot read the VCEK chain from IMDS: {exc}", retriable=True
            ) from exc
        return (
            str(document.get("vcekCert", "")) + str(document.get("certificateChain", ""))
        ).encode()

    return fetch


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def maa_base_url(endpoint: str) -> str:
    """`https://host` for an MAA endpoint given as a URL or, as the SKR sidecar takes it, a host."""
    parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
    if parts.scheme != "https" or not parts.netloc or parts.path.strip("/") or parts.query:
        raise ValueError(f"{endpoint!r} is not an attestation endpoint (https://host)")
    return f"https://{parts.netloc.lower()}"


@dataclass
class GuestAttestor:
    """Attests the node with the TPM; `ssl_context` says whom to trust for MAA's HTTPS."""

    tpm: Tpm
    vcek_chain: VcekSource
    pcrs: Sequence[int] = DEFAULT_PCRS
    tcg_log: Path = TCG_LOG_PATH
    ssl_context: ssl.SSLContext | None = None
    timeout: float = 30.0

    def _evidence(self) -> tuple[HclReport, dict[str, Any], EphemeralKey]:
        """What the TPM says (blocking: tpm2-tools)."""
        report = HclReport.parse(self.tpm.nv_read(HCL_REPORT_INDEX))
        ak_cert = der_prefix(self.tpm.nv_read(AK_CERT_INDEX))
        ak_pub, _ = self.tpm.read_public(AK_HANDLE)
        quote = self.tpm.quote(os.urandom(32), self.pcrs)
        key = self.tpm.create_ephemeral_key()
        digest = len(quote.pcr_values) // max(1, len(quote.pcrs))
        tpm_info = {
            "AikCert": _b64(ak_cert),
            "AikPub": _b64(ak_pub),
            "PcrQuote": _b64(quote.message),
            "PcrSignature": _b64(quote.signature),
            "PcrSet": list(quote.pcrs),
            "PCRs": [
                {"Index": index, "Digest": _b64(quote.pcr_values[i * digest : (i + 1) * digest])}
                for i, index in enumerate(quote.pcrs)
            ],
            "EncKeyPub": _b64(key.public_area),
            "EncKeyCertifyInfo": _b64(key.certify_info),
            "EncKeyCertifyInfoSignature": _b64(key.certify_signature),
        }
        return report, tpm_info, key

    def _tcg_log(self) -> bytes:
        try:
            return self.tcg_log.read_bytes()
        except OSError as exc:
            # MAA appraises without the log; its absence only shows in the log here.
            log.warning("no TCG event log at %s (%s); attesting without it", self.tcg_log, exc)
            return b""

    def _isolation(self, report: HclReport, vcek: bytes) -> dict[str, Any]:
        if report.isolation == "SevSnp":
            proof = json.dumps(
                {
                    "SnpReport": b64url_encode(report.hardware_report),
                    "VcekCertChain": b64url_encode(vcek),
                }
            ).encode()
            return {
                "Type": "SevSnp",
                "Evidence": {
                    "Proof": b64url_encode(proof),
                    "RunTimeData": b64url_encode(report.runtime_data),
                },
            }
        raise AttestationError(
            "TDX nodes need a TD quote from IMDS, which this agent does not fetch yet",
            retriable=False,
        )

    def _request(
        self,
        report: HclReport,
        tpm_info: dict[str, Any],
        vcek: bytes,
        client_payload: bytes = b"",
    ) -> dict[str, str]:
        info = {
            "AttestationProtocolVersion": PROTOCOL_VERSION,
            "OSType": _b64(b"Linux"),
            "OSDistro": _b64(platform.system().encode()),
            "OSVersionMajor": "0",
            "OSVersionMinor": "0",
            "OSBuild": _b64(platform.release().encode()),
            "TcgLogs": _b64(self._tcg_log()),
            "ClientPayload": _b64(client_payload),
            "TpmInfo": tpm_info,
            "IsolationInfo": self._isolation(report, vcek),
        }
        return {"AttestationInfo": b64url_encode(json.dumps(info).encode())}

    async def _post(self, url: str, body: Mapping[str, str]) -> str:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(url, json=body, ssl=self.ssl_context or True) as response,
            ):
                payload = await response.content.read(MAX_RESPONSE_BYTES + 1)
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AttestationError(f"cannot reach MAA at {url}: {exc!r}", retriable=True) from exc
        if status != 200:
            reason = payload[:300].decode("utf-8", errors="replace")
            raise AttestationError(
                f"MAA answered HTTP {status}: {reason}", retriable=status >= 500 or status == 429
            )
        try:
            token = json.loads(payload)["token"]
        except (ValueError, KeyError, TypeError) as exc:
            raise AttestationError("MAA's answer holds no token", retriable=True) from exc
        return str(token)

    def _decrypt(self, envelope: str, key: EphemeralKey) -> str:
        """The JWT inside MAA's envelope: the AES key opens only inside the TPM."""
        try:
            document = json.loads(b64url_decode(envelope))
            inner = base64.b64decode(document["EncryptedInnerKey"])
            iv = base64.b64decode(document["EncryptionParams"]["Iv"])
            sealed = base64.b64decode(document["Jwt"]) + base64.b64decode(
                document["AuthenticationData"]
            )
        except (ValueError, KeyError, TypeError, binascii.Error) as exc:
            raise AttestationError(
                f"MAA's token envelope is malformed: {exc}", retriable=False
            ) from exc
        aes_key = self.tpm.decrypt(key, inner, "rsaes")
        try:
            return AESGCM(aes_key).decrypt(iv, sealed, TRANSPORT_KEY_AAD).decode()
        except (InvalidTag, ValueError) as exc:
            raise AttestationError(
                "MAA's token does not open with the TPM key", retriable=False
            ) from exc
        finally:
            del aes_key

    async def attest(
        self, maa_endpoint: str, client_payload: Mapping[str, Any] | None = None
    ) -> AttestedToken:
        """A fresh MAA token for this node, encrypted to (and naming) a new TPM key; with a
        `client_payload` (a JSON object), the token carries it as `x-ms-runtime.client-payload`."""
        url = f"{maa_base_url(maa_endpoint)}/attest/AzureGuest?api-version={API_VERSION}"
        payload = b"" if client_payload is None else json.dumps(dict(client_payload)).encode()
        vcek = await self.vcek_chain()
        try:
            report, tpm_info, key = await asyncio.to_thread(self._evidence)
            body = await asyncio.to_thread(self._request, report, tpm_info, vcek, payload)
        except TpmError as exc:
            raise AttestationError(f"the TPM failed: {exc}", retriable=True) from exc
        try:
            envelope = await self._post(url, body)
            token = await asyncio.to_thread(self._decrypt, envelope, key)
        except TpmError as exc:
            self.tpm.discard(key)
            raise AttestationError(f"the TPM failed: {exc}", retriable=True) from exc
        except AttestationError:
            self.tpm.discard(key)
            raise
        claims = jwt.decode(token, options={"verify_signature": False})
        runtime_keys = claims.get("x-ms-runtime", {}).get("keys", [])
        ours = rsa_public_jwk(key.public_key)
        if not any(k.get("n") == ours["n"] for k in runtime_keys if isinstance(k, dict)):
            self.tpm.discard(key)
            raise AttestationError("MAA's token names another runtime key", retriable=False)
        if client_payload is not None and (
            claims.get("x-ms-runtime", {}).get("client-payload") != dict(client_payload)
        ):
            self.tpm.discard(key)
            raise AttestationError("MAA's token does not carry the client payload", retriable=False)
        return AttestedToken(token, key, float(claims.get("exp", time.time())))


@dataclass
class TokenCache:
    """One MAA token per attestation endpoint, renewed shortly before it expires."""

    attestor: GuestAttestor
    renew_before: float = RENEW_BEFORE_SECONDS
    clock: Callable[[], float] = time.time
    _tokens: dict[str, AttestedToken] = field(default_factory=dict, repr=False)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    async def fresh(self, maa_endpoint: str, client_payload: Mapping[str, Any]) -> str:
        """A token of its own carrying `client_payload` (not cached; its TPM key discarded at
        once, as nothing is released to it), serialized with the cached token's TPM use."""
        async with self._lock:
            attested = await self.attestor.attest(maa_base_url(maa_endpoint), client_payload)
            self.attestor.tpm.discard(attested.key)
            return attested.token

    async def token(self, maa_endpoint: str) -> AttestedToken:
        base = maa_base_url(maa_endpoint)
        async with self._lock:
            cached = self._tokens.get(base)
            if cached is not None and cached.expires_at - self.renew_before > self.clock():
                return cached
            fresh = await self.attestor.attest(base)
            self._tokens[base] = fresh
            if cached is not None:
                self.attestor.tpm.discard(cached.key)
            log.info("node attested by %s; token valid until %d", base, fresh.expires_at)
            return fresh
