"""MAA's guest attestation stand-in against real TPM evidence (swtpm): what it accepts, and the
forgeries it must refuse as MAA does."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import struct
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from veil.node_agent.guest_attestation import GuestAttestor, HclReport
from veil.node_agent.tpm import HCL_REPORT_INDEX, Tpm
from veil_standins.jose import b64url, b64url_decode
from veil_standins.maa_guest import (
    DECRYPT,
    FIXED_PARENT,
    FIXED_TPM,
    SENSITIVE_DATA_ORIGIN,
    USER_WITH_AUTH,
    GuestEvidenceError,
    encrypt_token,
    parse_tpm2b_public,
    verify_guest_evidence,
)
from veil_standins.vtpm import AkCa, SoftwareCvm, hcl_report

ROGUE = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def evidence(attestor: GuestAttestor) -> dict[str, Any]:
    """AttestationInfo as the agent sends it, fresh from the TPM."""
    report, tpm_info, key = attestor._evidence()
    attestor.tpm.discard(key)
    body = attestor._request(report, tpm_info, asyncio.run(attestor.vcek_chain()))
    info: dict[str, Any] = json.loads(b64url_decode(body["AttestationInfo"]))
    return info


@pytest.fixture
def info(attestor: GuestAttestor) -> dict[str, Any]:
    return evidence(attestor)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _refused(info: dict[str, Any], cvm: SoftwareCvm, why: str) -> None:
    with pytest.raises(GuestEvidenceError, match=why):
        verify_guest_evidence(info, cvm.trust())


def _tpm2b_public(key: rsa.RSAPublicKey, attributes: int) -> bytes:
    """A TPM2B_PUBLIC for a key made outside any TPM, with whatever attributes it claims."""
    n = key.public_numbers().n.to_bytes(key.key_size // 8, "big")
    area = (
        struct.pack(">HHI", 0x0001, 0x000B, attributes)
        + struct.pack(">H", 0)
        + struct.pack(">HHHI", 0x0010, 0x0010, key.key_size, 0)
        + struct.pack(">H", len(n))
        + n
    )
    return struct.pack(">H", len(area)) + area


def test_genuine_evidence_gets_cvm_claims_naming_the_tpm_key(
    info: dict[str, Any], cvm: SoftwareCvm
) -> None:
    claims = verify_guest_evidence(info, cvm.trust())

    tee = claims["x-ms-isolation-tee"]
    assert tee["x-ms-attestation-type"] == "sevsnpvm"
    assert tee["x-ms-compliance-status"] == "azure-compliant-cvm"
    assert tee["x-ms-sevsnpvm-is-debuggable"] is False
    assert tee["x-ms-runtime"]["keys"][0]["kid"] == "HCLAkPub"
    (runtime_key,) = claims["x-ms-runtime"]["keys"]
    assert runtime_key["key_ops"] == ["encrypt"]
    submitted = parse_tpm2b_public(base64.b64decode(info["TpmInfo"]["EncKeyPub"])).key
    assert int.from_bytes(b64url_decode(runtime_key["n"]), "big") == submitted.public_numbers().n


def test_the_agent_reads_the_hcl_report_size_from_the_tpm(tpm: Tpm) -> None:
    blob = tpm.nv_read(HCL_REPORT_INDEX)
    report = HclReport.parse(blob)
    assert len(blob) < 2048  # swtpm's NV limit
    assert report.isolation == "SevSnp"
    assert json.loads(report.runtime_data)["keys"][0]["kid"] == "HCLAkPub"


def test_a_replayed_quote_is_refused(info: dict[str, Any], cvm: SoftwareCvm) -> None:
    trust = cvm.trust()
    verify_guest_evidence(info, trust)
    with pytest.raises(GuestEvidenceError, match="nonce was used before"):
        verify_guest_evidence(copy.deepcopy(info), trust)


def test_an_ak_certificate_from_another_ca_is_refused(
    info: dict[str, Any], cvm: SoftwareCvm
) -> None:
    info["TpmInfo"]["AikCert"] = _b64(AkCa.create("rogue vTPM CA").issue(cvm.ak_public))
    _refused(info, cvm, "not issued by the vTPM CA")


def test_a_genuine_certificate_for_another_ak_is_refused(
    info: dict[str, Any], cvm: SoftwareCvm
) -> None:
    info["TpmInfo"]["AikCert"] = _b64(cvm.ak_ca.issue(ROGUE.public_key()))
    _refused(info, cvm, "certificate is for another key")


def test_a_quote_signed_by_another_key_is_refused(info: dict[str, Any], cvm: SoftwareCvm) -> None:
    quote = base64.b64decode(info["TpmInfo"]["PcrQuote"])
    info["TpmInfo"]["PcrSignature"] = _b64(ROGUE.sign(quote, padding.PKCS1v15(), hashes.SHA256()))
    _refused(info, cvm, "PCR quote is not signed by the AK")


def test_pcr_values_other_than_the_quoted_ones_are_refused(
    info: dict[str, Any], cvm: SoftwareCvm
) -> None:
    info["TpmInfo"]["PCRs"][0]["Digest"] = _b64(hashlib.sha256(b"a different boot").digest())
    _refused(info, cvm, "do not match the quote's digest")


def test_tampered_runtime_data_is_refused(info: dict[str, Any], cvm: SoftwareCvm) -> None:
    evidence = info["IsolationInfo"]["Evidence"]
    runtime = json.loads(b64url_decode(evidence["RunTimeData"]))
    runtime["vm-configuration"]["secure-boot"] = False
    evidence["RunTimeData"] = b64url(json.dumps(runtime).encode())
    _refused(info, cvm, "REPORT_DATA is not the runtime data's hash")


def test_a_tampered_snp_report_is_refused(info: dict[str, Any], cvm: SoftwareCvm) -> None:
    evidence = info["IsolationInfo"]["Evidence"]
    proof = json.loads(b64url_decode(evidence["Proof"]))
    report = bytearray(b64url_decode(proof["SnpReport"]))
    report[0x08 + 2] |= 0x08  # policy bit 19: debugging allowed
    proof["SnpReport"] = b64url(bytes(report))
    evidence["Proof"] = b64url(json.dumps(proof).encode())
    _refused(info, cvm, "not signed by the trusted hardware key")


def test_a_report_from_other_hardware_naming_an_attackers_ak_is_refused(
    info: dict[str, Any], cvm: SoftwareCvm
) -> None:
    """An attacker's own "CVM": a report signed by other hardware, binding its own AK, sent with
    the genuine VCEK chain, then with its own hardware's."""
    rogue_hardware = ec.generate_private_key(ec.SECP384R1())
    forged = HclReport.parse(hcl_report(ROGUE.public_key(), rogue_hardware))
    info["IsolationInfo"]["Evidence"] = _evidence(info, forged)
    _refused(info, cvm, "not signed by the trusted hardware key")
    rogue_chain = rogue_hardware.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    info["IsolationInfo"]["Evidence"] = _evidence(info, forged, rogue_chain)
    _refused(info, cvm, "does not lead to a trusted root")
    info["IsolationInfo"]["Evidence"] = _evidence(info, forged, b"")
    _refused(info, cvm, "VCEK chain is missing")


def _evidence(info: dict[str, Any], report: HclReport, chain: bytes | None = None) -> Any:
    """Isolation evidence for `report`, with the VCEK chain the genuine request sent unless
    `chain` is given."""
    proof = json.loads(b64url_decode(info["IsolationInfo"]["Evidence"]["Proof"]))
    vcek = proof["VcekCertChain"] if chain is None else b64url(chain)
    return {
        "Proof": b64url(
            json.dumps(
                {"SnpReport": b64url(report.hardware_report), "VcekCertChain": vcek}
            ).encode()
        ),
        "RunTimeData": b64url(report.runtime_data),
    }


def test_runtime_data_naming_another_ak_is_refused(info: dict[str, Any], cvm: SoftwareCvm) -> None:
    """Genuine hardware, but the report binds a different AK than the one that quoted."""
    other = HclReport.parse(hcl_report(ROGUE.public_key(), cvm.hardware_key))
    info["IsolationInfo"]["Evidence"] = _evidence(info, other)
    _refused(info, cvm, "does not name this AK")


def test_a_software_key_in_place_of_the_certified_tpm_key_is_refused(
    info: dict[str, Any], cvm: SoftwareCvm
) -> None:
    attributes = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | DECRYPT
    info["TpmInfo"]["EncKeyPub"] = _b64(_tpm2b_public(ROGUE.public_key(), attributes))
    _refused(info, cvm, "certified another key")


def test_a_software_key_certified_by_another_key_is_refused(
    info: dict[str, Any], cvm: SoftwareCvm
) -> None:
    attributes = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | DECRYPT
    info["TpmInfo"]["EncKeyPub"] = _b64(_tpm2b_public(ROGUE.public_key(), attributes))
    certify = base64.b64decode(info["TpmInfo"]["EncKeyCertifyInfo"])
    info["TpmInfo"]["EncKeyCertifyInfoSignature"] = _b64(
        ROGUE.sign(certify, padding.PKCS1v15(), hashes.SHA256())
    )
    _refused(info, cvm, "certify info is not signed by the AK")


def test_an_exportable_key_is_refused(info: dict[str, Any], cvm: SoftwareCvm) -> None:
    info["TpmInfo"]["EncKeyPub"] = _b64(
        _tpm2b_public(ROGUE.public_key(), SENSITIVE_DATA_ORIGIN | USER_WITH_AUTH | DECRYPT)
    )
    _refused(info, cvm, "not a TPM-resident decryption-only key")


def test_the_token_envelope_opens_only_inside_the_tpm(attestor: GuestAttestor, tpm: Tpm) -> None:
    key = tpm.create_ephemeral_key()
    try:
        envelope = encrypt_token("header.payload.signature", key.public_key)
        assert b"header.payload" not in b64url_decode(envelope)
        assert attestor._decrypt(envelope, key) == "header.payload.signature"
    finally:
        tpm.discard(key)


def test_maa_issues_an_encrypted_token_over_http(
    attestor: GuestAttestor, maa: Any, cvm: SoftwareCvm
) -> None:
    import anyio

    attested = anyio.run(attestor.attest, maa.issuer)
    try:
        claims = jwt.decode(attested.token, options={"verify_signature": False})
        assert claims["iss"] == maa.issuer
        assert claims["x-ms-isolation-tee"]["x-ms-compliance-status"] == "azure-compliant-cvm"
        n = claims["x-ms-runtime"]["keys"][0]["n"]
        assert int.from_bytes(b64url_decode(n), "big") == attested.key.public_key.public_numbers().n
    finally:
        attestor.tpm.discard(attested.key)
