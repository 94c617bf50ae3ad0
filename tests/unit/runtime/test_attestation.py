"""MAA token verification against a local attestation authority serving OpenID config and JWKS."""

from __future__ import annotations

import base64
import json
import secrets
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry

from veil.runtime.attestation import (
    AttestationError,
    AttestationFailure,
    AttestationPolicy,
    AttestationVerifier,
    Placement,
)
from veil.runtime.jwks import IssuerKeys
from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.replay import ReplayCache, ReplayCacheFullError

from .doubles import HOSTDATA, TestAuthority, aci_claims, cvm_claims

pytestmark = pytest.mark.anyio

ACI_POLICY = AttestationPolicy(placement=Placement.CONFIDENTIAL_ACI, hostdata=HOSTDATA)
CVM_POLICY = AttestationPolicy(placement=Placement.CONFIDENTIAL_VM)


def _verifier(
    authority: TestAuthority,
    policy: AttestationPolicy = ACI_POLICY,
    *,
    metrics: RuntimeMetrics | None = None,
    **kwargs: Any,
) -> AttestationVerifier:
    return AttestationVerifier(
        [authority.issuer],
        policy,
        metrics=metrics,
        allow_insecure_loopback_issuers=True,
        **kwargs,
    )


async def _refused(
    verifier: AttestationVerifier, token: str, reason: AttestationFailure, **kwargs: Any
) -> AttestationError:
    with pytest.raises(AttestationError) as caught:
        await verifier.verify(token, **kwargs)
    assert caught.value.reason is reason, str(caught.value)
    return caught.value


def _b64(data: dict[str, Any]) -> str:
    raw = json.dumps(data).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def test_confidential_container_token_is_accepted(authority: TestAuthority) -> None:
    nonce = secrets.token_urlsafe(16)
    result = await _verifier(authority).verify(
        authority.token(aci_claims(nonce)), expected_nonce=nonce
    )
    assert result.issuer == authority.issuer
    assert result.attestation_type == "sevsnpvm"
    assert result.nonce == nonce
    assert result.claims["x-ms-sevsnpvm-hostdata"] == HOSTDATA


async def test_cvm_tokens_with_x5c_and_ne_keys_are_accepted(authority: TestAuthority) -> None:
    verifier = _verifier(authority, CVM_POLICY)
    snp = await verifier.verify(authority.token(cvm_claims(), kid="x5c-key"))
    assert snp.attestation_type == "sevsnpvm"
    tdx_claims = cvm_claims(**{"x-ms-attestation-type": "tdxvm", "tdx_td_attributes_debug": False})
    del tdx_claims["x-ms-isolation-tee"]["x-ms-sevsnpvm-is-debuggable"]
    tdx = await verifier.verify(authority.token(tdx_claims, kid="ne-key"))
    assert tdx.attestation_type == "tdxvm"


async def test_signing_keys_are_fetched_once_and_cached(authority: TestAuthority) -> None:
    verifier = _verifier(authority)
    for _ in range(3):
        await verifier.verify(authority.token(aci_claims()))
    assert authority.hits == {"/.well-known/openid-configuration": 1, "/certs": 1}


async def test_forged_signature_is_refused(
    authority: TestAuthority, other_key: rsa.RSAPrivateKey
) -> None:
    forged = authority.token(aci_claims(), signing_key=other_key)
    error = await _refused(_verifier(authority), forged, AttestationFailure.SIGNATURE)
    assert "forged or altered" in str(error)


async def test_altered_claims_are_refused(authority: TestAuthority) -> None:
    header, _, signature = authority.token(
        aci_claims(**{"x-ms-sevsnpvm-is-debuggable": True})
    ).split(".")
    payload = _b64({"iss": authority.issuer, "exp": int(time.time()) + 600, **aci_claims()})
    await _refused(
        _verifier(authority), f"{header}.{payload}.{signature}", AttestationFailure.SIGNATURE
    )


async def test_expired_token_is_refused_beyond_the_leeway(authority: TestAuthority) -> None:
    verifier = _verifier(authority, leeway_seconds=60)
    error = await _refused(
        verifier, authority.token(aci_claims(), lifetime=-600), AttestationFailure.EXPIRED
    )
    assert "expired at" in str(error)
    # 10 s past expiry is within the 60 s leeway
    await verifier.verify(authority.token(aci_claims(), lifetime=-10))


async def test_token_from_the_future_is_refused(authority: TestAuthority) -> None:
    token = authority.token(aci_claims(nbf=int(time.time()) + 3600))
    await _refused(_verifier(authority), token, AttestationFailure.NOT_YET_VALID)


async def test_token_without_exp_is_refused(authority: TestAuthority) -> None:
    token = jwt.encode(
        {"iss": authority.issuer, **aci_claims()},
        authority.signing_keys["x5c-key"],
        algorithm="RS256",
        headers={"kid": "x5c-key"},
    )
    error = await _refused(_verifier(authority), token, AttestationFailure.MALFORMED)
    assert "'exp'" in str(error)


def test_leeway_is_bounded() -> None:
    with pytest.raises(ValueError, match="leeway"):
        AttestationVerifier(["https://maa.test"], ACI_POLICY, leeway_seconds=3600)


async def test_wrong_issuer_is_refused_without_fetching_its_keys(
    authority: TestAuthority, rogue_authority: TestAuthority
) -> None:
    token = rogue_authority.token(aci_claims())
    error = await _refused(_verifier(authority), token, AttestationFailure.ISSUER)
    assert rogue_authority.issuer in str(error)
    assert rogue_authority.total_hits == 0


async def test_jku_header_pointing_elsewhere_is_ignored(
    authority: TestAuthority, rogue_authority: TestAuthority
) -> None:
    verifier = _verifier(authority)
    # a genuine token whose jku points at the rogue server still verifies with the pinned keys
    genuine = authority.token(aci_claims(), headers={"jku": f"{rogue_authority.issuer}/certs"})
    await verifier.verify(genuine)
    # the attacker signs with its own key and points jku at its own JWKS: refused
    forged = rogue_authority.token(
        aci_claims(iss=authority.issuer), headers={"jku": f"{rogue_authority.issuer}/certs"}
    )
    await _refused(verifier, forged, AttestationFailure.SIGNATURE)
    assert rogue_authority.total_hits == 0


@pytest.mark.parametrize(
    ("claim", "message"),
    [
        ("x-ms-compliance-status", "x-ms-compliance-status is missing"),
        ("x-ms-attestation-type", "x-ms-attestation-type is missing"),
        ("x-ms-sevsnpvm-hostdata", "x-ms-sevsnpvm-hostdata is missing"),
        ("x-ms-sevsnpvm-is-debuggable", "cannot be shown to be non-debuggable"),
    ],
)
async def test_missing_claim_is_refused(authority: TestAuthority, claim: str, message: str) -> None:
    claims = aci_claims()
    del claims[claim]
    reason = AttestationFailure.HOSTDATA if "hostdata" in claim else AttestationFailure.CLAIM
    error = await _refused(_verifier(authority), authority.token(claims), reason)
    assert message in str(error)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"x-ms-compliance-status": "azure-compliant-cvm"}, "expected 'azure-compliant-uvm'"),
        ({"x-ms-attestation-type": "tdxvm"}, "'tdxvm', not one of: sevsnpvm"),
        ({"x-ms-sevsnpvm-hostdata": "00" * 32}, "container security policy differs"),
    ],
)
async def test_wrong_claim_is_refused(
    authority: TestAuthority, override: dict[str, Any], message: str
) -> None:
    token = authority.token(aci_claims(**override))
    hostdata = "x-ms-sevsnpvm-hostdata" in override
    reason = AttestationFailure.HOSTDATA if hostdata else AttestationFailure.CLAIM
    error = await _refused(_verifier(authority), token, reason)
    assert message in str(error)


async def test_cvm_token_without_isolation_tee_is_refused(authority: TestAuthority) -> None:
    token = authority.token(aci_claims())  # container-shaped token offered for a CVM policy
    error = await _refused(_verifier(authority, CVM_POLICY), token, AttestationFailure.CLAIM)
    assert "x-ms-isolation-tee" in str(error)


async def test_debuggable_tee_is_refused(authority: TestAuthority) -> None:
    metrics = RuntimeMetrics(CollectorRegistry())
    aci = authority.token(aci_claims(**{"x-ms-sevsnpvm-is-debuggable": True}))
    error = await _refused(
        _verifier(authority, metrics=metrics), aci, AttestationFailure.DEBUGGABLE
    )
    assert "debuggable" in str(error)
    cvm = authority.token(cvm_claims(**{"x-ms-sevsnpvm-is-debuggable": True}))
    await _refused(_verifier(authority, CVM_POLICY), cvm, AttestationFailure.DEBUGGABLE)
    assert (
        metrics.registry.get_sample_value(
            "veil_attestation_failures_total", {"reason": "debuggable"}
        )
        == 1
    )


async def test_replayed_nonce_is_refused(authority: TestAuthority) -> None:
    verifier = _verifier(authority)
    nonce = secrets.token_urlsafe(16)
    token = authority.token(aci_claims(nonce))
    await verifier.verify(token, expected_nonce=nonce)
    error = await _refused(verifier, token, AttestationFailure.REPLAY, expected_nonce=nonce)
    assert "replayed" in str(error)
    # a second token carrying the same nonce is a replay as well
    again = authority.token(aci_claims(nonce))
    await _refused(verifier, again, AttestationFailure.REPLAY, expected_nonce=nonce)


async def test_wrong_or_missing_nonce_is_refused(authority: TestAuthority) -> None:
    verifier = _verifier(authority)
    await _refused(
        verifier,
        authority.token(aci_claims("nonce-a")),
        AttestationFailure.NONCE,
        expected_nonce="nonce-b",
    )
    await _refused(
        verifier, authority.token(aci_claims()), AttestationFailure.NONCE, expected_nonce="n"
    )
    requiring = _verifier(
        authority,
        AttestationPolicy(Placement.CONFIDENTIAL_VM, require_nonce=True),
    )
    await _refused(requiring, authority.token(cvm_claims()), AttestationFailure.NONCE)
    accepted = await requiring.verify(authority.token(cvm_claims("fresh")))
    assert accepted.nonce == "fresh"


async def test_alg_none_is_refused(authority: TestAuthority) -> None:
    header = _b64({"alg": "none", "typ": "JWT", "kid": "x5c-key"})
    payload = _b64({"iss": authority.issuer, "exp": int(time.time()) + 600, **aci_claims()})
    error = await _refused(
        _verifier(authority), f"{header}.{payload}.", AttestationFailure.ALGORITHM
    )
    assert "'none'" in str(error)


async def test_hs256_signed_with_the_public_key_is_refused(
    authority: TestAuthority, authority_keys: dict[str, rsa.RSAPrivateKey]
) -> None:
    # the classic key-confusion attack: HMAC keyed with the issuer's public key PEM
    public_pem = (
        authority_keys["x5c-key"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    header = _b64({"alg": "HS256", "typ": "JWT", "kid": "x5c-key"})
    payload = _b64({"iss": authority.issuer, "exp": int(time.time()) + 600, **aci_claims()})
    import hashlib
    import hmac

    mac = hmac.new(public_pem, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    signature = base64.urlsafe_b64encode(mac).rstrip(b"=").decode()
    await _refused(
        _verifier(authority), f"{header}.{payload}.{signature}", AttestationFailure.ALGORITHM
    )


async def test_unknown_kid_is_refused_and_refetch_is_rate_limited(
    authority: TestAuthority, authority_keys: dict[str, rsa.RSAPrivateKey]
) -> None:
    verifier = _verifier(authority, keys=IssuerKeys(refresh_cooldown_seconds=3600))
    await verifier.verify(authority.token(aci_claims()))
    for _ in range(3):
        token = authority.token(
            aci_claims(), kid="rotated-key", signing_key=authority_keys["ne-key"]
        )
        error = await _refused(verifier, token, AttestationFailure.SIGNING_KEY)
        assert "'rotated-key'" in str(error)
    assert authority.hits["/certs"] == 1


def test_malformed_token_is_refused() -> None:
    import asyncio

    verifier = AttestationVerifier(["https://maa.test"], ACI_POLICY)
    with pytest.raises(AttestationError) as caught:
        asyncio.run(verifier.verify("not-a-jwt"))
    assert caught.value.reason is AttestationFailure.MALFORMED


def test_issuers_must_be_https() -> None:
    with pytest.raises(ValueError, match="https"):
        AttestationVerifier(["http://maa.example.com"], ACI_POLICY)
    with pytest.raises(ValueError, match="https"):
        AttestationVerifier(
            ["http://maa.example.com"], ACI_POLICY, allow_insecure_loopback_issuers=True
        )


def test_policy_from_file(tmp_path: Path) -> None:
    path = tmp_path / "policy.json"
    path.write_text(
        json.dumps({"placement": "confidentialACI", "hostdata": HOSTDATA.upper()}), "utf-8"
    )
    policy = AttestationPolicy.from_file(path)
    assert policy.placement is Placement.CONFIDENTIAL_ACI
    assert policy.hostdata == HOSTDATA
    assert policy.compliance_status == "azure-compliant-uvm"
    assert policy.attestation_types == frozenset({"sevsnpvm"})
    assert not policy.allow_debuggable


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({}, "must name a placement"),
        ({"placement": "kata"}, "placement must be one of"),
        ({"placement": "confidentialVM", "hostdata": HOSTDATA}, "only applies to confidentialACI"),
        ({"placement": "confidentialACI", "hostdata": "xyz"}, "64 hex digits"),
        ({"placement": "confidentialVM", "debug": True}, "unknown policy fields: debug"),
        ({"placement": "confidentialVM", "allowDebuggable": "no"}, "true or false"),
    ],
)
def test_bad_policies_are_refused(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AttestationPolicy.from_mapping(data)


def test_replay_cache_is_bounded_and_forgets_only_expired_values() -> None:
    now = [1000.0]
    cache = ReplayCache(max_entries=3, clock=lambda: now[0])
    assert cache.first_use("a", 2000)
    assert not cache.first_use("a", 2000)
    for value in ("b", "c"):
        assert cache.first_use(value, 2000)
    # full of unexpired nonces: a new one is refused, none is forgotten
    with pytest.raises(ReplayCacheFullError, match="forgets none early"):
        cache.first_use("d", 2000)
    assert len(cache) == 3
    assert not cache.first_use("a", 2000)  # still remembered
    now[0] = 2500.0  # everything expired
    assert cache.first_use("a", 3000)
    assert len(cache) == 1


def test_replay_cache_inserts_scale_with_many_entries() -> None:
    now = [0.0]
    cache = ReplayCache(max_entries=200_000, clock=lambda: now[0])
    started = time.perf_counter()
    for index in range(100_000):
        now[0] = index * 0.001
        assert cache.first_use(str(index), 1e9)
    # O(n) inserts (a scan per insert) would take minutes here
    assert time.perf_counter() - started < 10
    assert len(cache) == 100_000


async def test_a_full_replay_cache_refuses_the_token(authority: TestAuthority) -> None:
    verifier = _verifier(authority, replay_cache=ReplayCache(max_entries=1))
    await verifier.verify(authority.token(aci_claims("first-nonce")), expected_nonce="first-nonce")
    error = await _refused(
        verifier,
        authority.token(aci_claims("second-nonce")),
        AttestationFailure.REPLAY,
        expected_nonce="second-nonce",
    )
    assert "unexpired nonces" in str(error)
