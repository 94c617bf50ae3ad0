"""Release policies built from specs: the grammar, golden documents per isolation mode,
determinism, and what the policies admit (evaluated against MAA-shaped claims)."""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.api.confidential_model import ConfidentialModelSpec
from veil.azure.release_policy import (
    ReleasePolicyError,
    build_release_policy,
    canonical_bytes,
    cce_policy_hostdata,
    normalize_policy,
    policies_equivalent,
    policy_digest,
    release_policy,
)
from veil_standins.release_policy import evaluate_release_policy, validate_policy_grammar

AUTHORITY = "https://sharedeus2.eus2.attest.azure.net"
CCE_TEXT = 'package policy\napi_svn := "0.10.0"\n'
CCE_B64 = base64.b64encode(CCE_TEXT.encode()).decode()
CCE_SHA = hashlib.sha256(CCE_TEXT.encode()).hexdigest()


def spec(
    isolation: str = "confidentialVM",
    platform: str = "sevsnp",
    claims: list[dict[str, Any]] | None = None,
    authority: str = AUTHORITY,
    **tee: Any,
) -> ConfidentialModelSpec:
    tee_wire: dict[str, Any] = {"isolation": isolation, "platform": platform, **tee}
    if isolation == "confidentialACI":
        tee_wire.setdefault("ccePolicy", CCE_B64)
    if isolation == "coco":
        tee_wire.setdefault(
            "runtimeClassName", f"kata-qemu-{'snp' if platform == 'sevsnp' else 'tdx'}"
        )
    return ConfidentialModelSpec.model_validate(
        {
            "model": {"uri": "az://models/m.onnx.sealed", "sha256": "a" * 64},
            "tee": tee_wire,
            "keyRelease": {
                "vaultUrl": "https://veil.vault.azure.net",
                "keyName": "m",
                "attestationAuthority": authority,
                "requiredClaims": claims or [],
            },
        }
    )


# -- golden documents --------------------------------------------------------------------------

GOLDEN_CVM_SNP = {
    "version": "1.0.0",
    "anyOf": [
        {
            "authority": AUTHORITY,
            "allOf": [
                {"claim": "x-ms-isolation-tee.x-ms-attestation-type", "equals": "sevsnpvm"},
                {
                    "claim": "x-ms-isolation-tee.x-ms-compliance-status",
                    "equals": "azure-compliant-cvm",
                },
            ],
        }
    ],
}
GOLDEN_CVM_TDX = {
    "version": "1.0.0",
    "anyOf": [
        {
            "authority": AUTHORITY,
            "allOf": [
                {"claim": "x-ms-isolation-tee.x-ms-attestation-type", "equals": "tdxvm"},
                {
                    "claim": "x-ms-isolation-tee.x-ms-compliance-status",
                    "equals": "azure-compliant-cvm",
                },
            ],
        }
    ],
}
GOLDEN_ACI = {
    "version": "1.0.0",
    "anyOf": [
        {
            "authority": AUTHORITY,
            "allOf": [
                {"claim": "x-ms-attestation-type", "equals": "sevsnpvm"},
                {"claim": "x-ms-compliance-status", "equals": "azure-compliant-uvm"},
                {"claim": "x-ms-sevsnpvm-hostdata", "equals": CCE_SHA},
                {"claim": "x-ms-sevsnpvm-is-debuggable", "equals": False},
            ],
        }
    ],
}
MEASUREMENT = "ab" * 48
GOLDEN_COCO_SNP = {
    "version": "1.0.0",
    "anyOf": [
        {
            "authority": AUTHORITY,
            "allOf": [
                {"claim": "x-ms-attestation-type", "equals": "sevsnpvm"},
                {"claim": "x-ms-sevsnpvm-is-debuggable", "equals": False},
                {"claim": "x-ms-sevsnpvm-launchmeasurement", "equals": MEASUREMENT},
            ],
        }
    ],
}
GOLDEN_COCO_TDX = {
    "version": "1.0.0",
    "anyOf": [
        {
            "authority": AUTHORITY,
            "allOf": [
                {"claim": "tdx_mrtd", "equals": MEASUREMENT},
                {"claim": "x-ms-attestation-type", "equals": "tdxvm"},
            ],
        }
    ],
}


@pytest.mark.parametrize(
    ("model_spec", "golden"),
    [
        pytest.param(spec("confidentialVM", "sevsnp"), GOLDEN_CVM_SNP, id="cvm-sevsnp"),
        pytest.param(spec("confidentialVM", "tdx"), GOLDEN_CVM_TDX, id="cvm-tdx"),
        pytest.param(spec("confidentialACI"), GOLDEN_ACI, id="aci"),
        pytest.param(
            spec(
                "coco",
                claims=[{"claim": "x-ms-sevsnpvm-launchmeasurement", "equals": MEASUREMENT}],
            ),
            GOLDEN_COCO_SNP,
            id="coco-sevsnp",
        ),
        pytest.param(
            spec("coco", "tdx", claims=[{"claim": "tdx_mrtd", "equals": MEASUREMENT}]),
            GOLDEN_COCO_TDX,
            id="coco-tdx",
        ),
    ],
)
def test_golden_policy_per_isolation_mode(
    model_spec: ConfidentialModelSpec, golden: dict[str, Any]
) -> None:
    document = build_release_policy(model_spec)
    assert document == golden
    assert validate_policy_grammar(document) is None
    built = release_policy(model_spec)
    assert json.loads(built.canonical) == golden
    assert built.digest == hashlib.sha256(built.canonical).hexdigest()


def test_canonical_bytes_are_exact() -> None:
    built = release_policy(spec("confidentialVM", "sevsnp"))
    assert built.canonical == (
        b'{"anyOf":[{"allOf":['
        b'{"claim":"x-ms-isolation-tee.x-ms-attestation-type","equals":"sevsnpvm"},'
        b'{"claim":"x-ms-isolation-tee.x-ms-compliance-status","equals":"azure-compliant-cvm"}'
        b'],"authority":"https://sharedeus2.eus2.attest.azure.net"}],"version":"1.0.0"}'
    )
    assert policy_digest(built.canonical) == built.digest
    assert policy_digest(built.document) == built.digest


def test_hostdata_is_sha256_of_the_decoded_policy_text() -> None:
    assert cce_policy_hostdata(CCE_B64) == CCE_SHA
    assert cce_policy_hostdata(CCE_B64) != hashlib.sha256(CCE_B64.encode()).hexdigest()
    with pytest.raises(ReleasePolicyError, match="base64"):
        cce_policy_hostdata("not*base64")


# -- requiredClaims -----------------------------------------------------------------------------


def test_required_claims_are_added_sorted_and_typed() -> None:
    document = build_release_policy(
        spec(
            "confidentialVM",
            claims=[
                {"claim": "x-ms-ver", "equals": "1.0"},
                {"claim": "x-ms-azurevm-vmid", "equals": "1234"},
                {"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-is-debuggable", "equals": False},
            ],
        )
    )
    claims = [c["claim"] for c in document["anyOf"][0]["allOf"]]
    assert claims == sorted(claims)
    assert {"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-is-debuggable", "equals": False} in document[
        "anyOf"
    ][0]["allOf"]


def test_a_required_claim_repeating_a_builtin_is_merged() -> None:
    repeated = spec(
        "confidentialACI", claims=[{"claim": "x-ms-sevsnpvm-is-debuggable", "equals": False}]
    )
    assert build_release_policy(repeated) == GOLDEN_ACI


@pytest.mark.parametrize(
    ("claims", "match"),
    [
        ([{"claim": "x-ms-sevsnpvm-is-debuggable", "equals": True}], "Veil's confidentialACI"),
        ([{"claim": "x-ms-compliance-status", "equals": "azure-compliant-cvm"}], "contradicts"),
        ([{"claim": "x-ms-sevsnpvm-is-debuggable", "equals": "false"}], "contradicts"),
        (
            [{"claim": "a", "equals": "1"}, {"claim": "a", "equals": "2"}],
            "another requiredClaims entry",
        ),
    ],
)
def test_contradicting_claims_are_refused(claims: list[dict[str, Any]], match: str) -> None:
    with pytest.raises(ReleasePolicyError, match=match):
        build_release_policy(spec("confidentialACI", claims=claims))


def test_coco_without_a_pinned_measurement_is_refused() -> None:
    with pytest.raises(ReleasePolicyError, match="requiredClaims pinning"):
        build_release_policy(spec("coco"))


# -- determinism --------------------------------------------------------------------------------


def test_authority_spelling_does_not_change_the_digest() -> None:
    plain = release_policy(spec(authority=AUTHORITY))
    for spelling in (AUTHORITY + "/", "https://SharedEUS2.eus2.attest.azure.net"):
        assert release_policy(spec(authority=spelling)).canonical == plain.canonical


def test_claim_order_does_not_change_the_digest() -> None:
    a = {"claim": "x-ms-a", "equals": "1"}
    b = {"claim": "x-ms-b", "equals": True}
    assert release_policy(spec(claims=[a, b])).digest == release_policy(spec(claims=[b, a])).digest


def test_what_is_demanded_changes_the_digest() -> None:
    digests = {
        release_policy(spec("confidentialVM", "sevsnp")).digest,
        release_policy(spec("confidentialVM", "tdx")).digest,
        release_policy(spec("confidentialACI")).digest,
        release_policy(spec(authority="https://other.weu.attest.azure.net")).digest,
        release_policy(spec(claims=[{"claim": "x", "equals": "1"}])).digest,
        release_policy(spec(claims=[{"claim": "x", "equals": True}])).digest,
    }
    assert len(digests) == 6


claim_names = st.from_regex(r"[a-z][a-z0-9_.-]{0,20}", fullmatch=True).filter(
    lambda n: not n.startswith("x-ms-isolation-tee")
)
claim_values = st.one_of(st.booleans(), st.text(min_size=0, max_size=12))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(claim_names, claim_values, max_size=6), st.randoms())
def test_same_claims_in_any_order_give_identical_bytes(claims: dict[str, Any], rnd: Any) -> None:
    items = [{"claim": k, "equals": v} for k, v in claims.items()]
    shuffled = list(items)
    rnd.shuffle(shuffled)
    first = release_policy(spec(claims=items))
    second = release_policy(spec(claims=shuffled))
    assert first.canonical == second.canonical
    assert validate_policy_grammar(first.document) is None
    assert json.loads(first.canonical) == first.document


# -- comparing with what Key Vault hands back ---------------------------------------------------


def test_equivalence_ignores_order_whitespace_and_authority_spelling() -> None:
    ours = release_policy(spec(claims=[{"claim": "x-ms-ver", "equals": "1"}])).canonical
    theirs = json.dumps(
        {
            "anyOf": [
                {
                    "allOf": list(reversed(json.loads(ours)["anyOf"][0]["allOf"])),
                    "authority": AUTHORITY.upper().replace("HTTPS", "https") + "/",
                }
            ],
        },
        indent=2,
    ).encode()
    assert policies_equivalent(ours, theirs)
    assert normalize_policy(theirs)["version"] == "1.0.0"
    other = release_policy(spec(claims=[{"claim": "x-ms-ver", "equals": "2"}])).canonical
    assert not policies_equivalent(ours, other)
    assert not policies_equivalent(ours, b"not json")
    assert canonical_bytes(normalize_policy(ours)) == ours


# -- what the policies admit --------------------------------------------------------------------


def cvm_token(
    attestation_type: str = "sevsnpvm", compliance: str = "azure-compliant-cvm"
) -> dict[str, Any]:
    return {
        "iss": AUTHORITY,
        "x-ms-attestation-type": "azurevm",
        "x-ms-isolation-tee": {
            "x-ms-attestation-type": attestation_type,
            "x-ms-compliance-status": compliance,
            "x-ms-sevsnpvm-is-debuggable": False,
        },
    }


def aci_token(hostdata: str = CCE_SHA, debuggable: bool = False) -> dict[str, Any]:
    return {
        "iss": AUTHORITY,
        "x-ms-attestation-type": "sevsnpvm",
        "x-ms-compliance-status": "azure-compliant-uvm",
        "x-ms-sevsnpvm-hostdata": hostdata,
        "x-ms-sevsnpvm-is-debuggable": debuggable,
    }


def test_cvm_policy_admits_a_compliant_cvm_and_nothing_else() -> None:
    policy = build_release_policy(spec("confidentialVM", "sevsnp"))
    assert evaluate_release_policy(policy, cvm_token())
    assert not evaluate_release_policy(policy, cvm_token("tdxvm"))
    assert not evaluate_release_policy(policy, cvm_token(compliance="azure-non-compliant"))
    assert not evaluate_release_policy(
        policy, {**cvm_token(), "iss": "https://evil.attest.example"}
    )
    assert not evaluate_release_policy(policy, aci_token())


def test_aci_policy_admits_only_the_pods_own_policy() -> None:
    policy = build_release_policy(spec("confidentialACI"))
    assert evaluate_release_policy(policy, aci_token())
    assert not evaluate_release_policy(policy, aci_token(hostdata="0" * 64))
    assert not evaluate_release_policy(policy, aci_token(debuggable=True))
    assert not evaluate_release_policy(policy, cvm_token())
