"""Secure Key Release policies, built from a ConfidentialModel spec. Pure: no I/O.

Key Vault releases an exportable HSM key only to a caller presenting a Microsoft Azure
Attestation (MAA) token whose issuer and claims satisfy the key's release policy. The grammar
(Azure Key Vault "secure key release policy grammar", version 1.0.0):

    {"version": "1.0.0",
     "anyOf": [{"authority": "<MAA instance URL, compared with the token's iss>",
                "allOf": [{"claim": "<name, dotted for nested claims>", "equals": <value>}, ...]}]}

What Veil demands, by isolation mode (`spec.tee.isolation`):

confidentialVM (AKS node pools of SEV-SNP / TDX confidential VMs, node-level vTPM attestation)
    x-ms-isolation-tee.x-ms-attestation-type   "sevsnpvm" (platform sevsnp) | "tdxvm" (tdx)
    x-ms-isolation-tee.x-ms-compliance-status  "azure-compliant-cvm"
    Every pod on the node shares this trust boundary; binding the release to the pod is the job
    of workload identity (Key Vault RBAC), not of the policy.

confidentialACI (Confidential ACI virtual nodes, per-pod utility VM)
    x-ms-attestation-type        "sevsnpvm"
    x-ms-compliance-status       "azure-compliant-uvm"
    x-ms-sevsnpvm-hostdata       hex sha256 of the CCE policy
    x-ms-sevsnpvm-is-debuggable  false
    HOSTDATA CHOICE: `tee.ccePolicy` holds the policy base64-encoded, as the ACI API takes it.
    The SEV-SNP HOST_DATA field is the sha256 of the *decoded* policy (the Rego text bytes), not
    of the base64 string: the ACI security context documents that the sha256 of the decoded
    `security-policy-base64` matches the attestation report's host_data, and `az confcom
    acipolicygen` prints the same digest. So: sha256(base64decode(ccePolicy)).

coco (Confidential Containers runtime classes)
    The pod's Kata agent policy is generated from its spec (resources/kata_policy.py) and bound
    to the TEE: HOST_DATA = sha256(policy) on SEV-SNP, MRCONFIGID = sha384(policy) on TDX. The
    controller passes those `measured` claims (resources/kata_claims.py):
        x-ms-attestation-type        "sevsnpvm" | "tdxvm"
        x-ms-sevsnpvm-hostdata       hex sha256 of the agent policy  (sevsnp)
        x-ms-sevsnpvm-is-debuggable  false                           (sevsnp)
        tdx_mrconfigid               hex sha384 of the agent policy  (tdx)
        tdx_td_attributes_debug      false                           (tdx)
    so the key is released only to a guest whose host could not have changed what the pod
    runs. Without measured claims a coco spec must pin its own measurement through
    `keyRelease.requiredClaims`, and `build_release_policy` refuses one that has none.

The user's `keyRelease.requiredClaims` are added to the same allOf. A required claim that repeats
a built-in one with the same value is merged; one that contradicts it (or another required claim)
is an error, since such a key could never be released.

Determinism: claims are sorted by name, the authority is normalised (lower-case scheme and host,
no trailing slash) and the bytes are canonical JSON (sorted keys, no whitespace, UTF-8), so the
same spec always yields identical bytes and `policy_digest` changes exactly when what the policy
demands changes. The controller records the digest in status; a new digest means a new key
version (Key Vault's immutable release policies cannot be edited).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

from veil.api.confidential_model import ConfidentialModelSpec, Platform

POLICY_VERSION: Final = "1.0.0"
POLICY_CONTENT_TYPE: Final = "application/json; charset=utf-8"

ISOLATION_TEE: Final = "x-ms-isolation-tee"
ATTESTATION_TYPE: Final = "x-ms-attestation-type"
COMPLIANCE_STATUS: Final = "x-ms-compliance-status"
SEVSNP_HOSTDATA: Final = "x-ms-sevsnpvm-hostdata"
SEVSNP_IS_DEBUGGABLE: Final = "x-ms-sevsnpvm-is-debuggable"

CVM_COMPLIANT: Final = "azure-compliant-cvm"
UVM_COMPLIANT: Final = "azure-compliant-uvm"
ATTESTATION_TYPES: Final[Mapping[Platform, str]] = {"sevsnp": "sevsnpvm", "tdx": "tdxvm"}

ClaimValue = str | bool


class ReleasePolicyError(ValueError):
    """The spec cannot be turned into a release policy; the message says why, in plain words."""


@dataclass(frozen=True)
class ReleasePolicy:
    """A built policy: the document, its canonical bytes and their sha256 (hex)."""

    document: Mapping[str, Any]
    canonical: bytes
    digest: str


def cce_policy_hostdata(cce_policy_b64: str) -> str:
    """The `x-ms-sevsnpvm-hostdata` value for a base64 CCE policy: hex sha256 of the decoded
    policy text (see the module docstring for why the decoded bytes)."""
    try:
        decoded = base64.b64decode(cce_policy_b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ReleasePolicyError(f"tee.ccePolicy is not valid base64: {exc}") from exc
    if not decoded:
        raise ReleasePolicyError("tee.ccePolicy decodes to an empty policy")
    return hashlib.sha256(decoded).hexdigest()


def normalize_authority(authority: str) -> str:
    """Lower-case scheme and host, no trailing slash: MAA issuers look like
    `https://sharedeus2.eus2.attest.azure.net`."""
    parts = urlsplit(authority.strip())
    if parts.scheme.lower() != "https" or not parts.netloc:
        raise ReleasePolicyError(
            f"attestation authority {authority!r} must be an https URL of an MAA instance"
        )
    path = parts.path.rstrip("/")
    return urlunsplit(("https", parts.netloc.lower(), path, parts.query, parts.fragment))


def _builtin_claims(
    spec: ConfidentialModelSpec, measured: Mapping[str, ClaimValue] | None = None
) -> dict[str, ClaimValue]:
    tee = spec.tee
    attestation_type = ATTESTATION_TYPES[tee.platform]
    if tee.isolation == "confidentialVM":
        return {
            f"{ISOLATION_TEE}.{ATTESTATION_TYPE}": attestation_type,
            f"{ISOLATION_TEE}.{COMPLIANCE_STATUS}": CVM_COMPLIANT,
        }
    if tee.isolation == "confidentialACI":
        if tee.platform != "sevsnp":
            raise ReleasePolicyError("confidentialACI runs on AMD SEV-SNP only: platform sevsnp")
        if tee.cce_policy is None:
            raise ReleasePolicyError("confidentialACI needs tee.ccePolicy to bind the key to")
        return {
            ATTESTATION_TYPE: attestation_type,
            COMPLIANCE_STATUS: UVM_COMPLIANT,
            SEVSNP_HOSTDATA: cce_policy_hostdata(tee.cce_policy),
            SEVSNP_IS_DEBUGGABLE: False,
        }
    # coco
    if measured:
        return dict(measured)
    if not spec.key_release.required_claims:
        raise ReleasePolicyError(
            "isolation coco with Key Vault needs keyRelease.requiredClaims pinning the guest's "
            "measurement (e.g. x-ms-sevsnpvm-launchmeasurement): without one any "
            f"{tee.platform} guest attested by the authority could release the key"
        )
    claims: dict[str, ClaimValue] = {ATTESTATION_TYPE: attestation_type}
    if tee.platform == "sevsnp":
        claims[SEVSNP_IS_DEBUGGABLE] = False
    return claims


def _merge_required(claims: dict[str, ClaimValue], spec: ConfidentialModelSpec) -> None:
    builtin = dict(claims)
    for required in spec.key_release.required_claims:
        name, value = required.claim, required.equals
        if name not in claims:
            claims[name] = value
            continue
        if claims[name] == value and type(claims[name]) is type(value):
            continue
        origin = (
            f"Veil's {spec.tee.isolation} policy"
            if name in builtin
            else "another requiredClaims entry"
        )
        raise ReleasePolicyError(
            f"requiredClaims {name} = {json.dumps(value)} contradicts {origin}, which demands "
            f"{json.dumps(claims[name])}: no attestation token could satisfy both"
        )


def build_release_policy(
    spec: ConfidentialModelSpec, measured: Mapping[str, ClaimValue] | None = None
) -> dict[str, Any]:
    """The release policy document for a spec (see the module docstring for the claims);
    `measured`: the claims that bind a coco pod's agent policy."""
    claims = _builtin_claims(spec, measured)
    _merge_required(claims, spec)
    all_of = [{"claim": name, "equals": claims[name]} for name in sorted(claims)]
    authority = normalize_authority(spec.key_release.key_vault().attestation_authority)
    return {"version": POLICY_VERSION, "anyOf": [{"authority": authority, "allOf": all_of}]}


def canonical_bytes(document: Mapping[str, Any]) -> bytes:
    """Canonical JSON: sorted keys, no insignificant whitespace, UTF-8."""
    return json.dumps(
        document, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def policy_digest(policy: bytes | Mapping[str, Any]) -> str:
    """Hex sha256 of a policy's canonical bytes (a document is canonicalised first; bytes are
    hashed as given, so pass the bytes `release_policy` produced)."""
    data = policy if isinstance(policy, bytes) else canonical_bytes(policy)
    return hashlib.sha256(data).hexdigest()


def release_policy(
    spec: ConfidentialModelSpec, measured: Mapping[str, ClaimValue] | None = None
) -> ReleasePolicy:
    """Build the policy for a spec: document, canonical bytes and digest in one call."""
    document = build_release_policy(spec, measured)
    data = canonical_bytes(document)
    return ReleasePolicy(document=document, canonical=data, digest=policy_digest(data))


def _normalize(node: Any) -> Any:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key == "authority" and isinstance(value, str):
                try:
                    out[key] = normalize_authority(value)
                except ReleasePolicyError:
                    out[key] = value
            elif key in ("anyOf", "allOf") and isinstance(value, list):
                items = [_normalize(item) for item in value]
                out[key] = sorted(items, key=lambda item: canonical_bytes({"_": item}))
            else:
                out[key] = _normalize(value)
        return out
    if isinstance(node, list):
        return [_normalize(item) for item in node]
    return node


def normalize_policy(data: bytes) -> dict[str, Any]:
    """A policy as Key Vault returns it, reduced to a comparable form: condition lists sorted,
    authorities normalised, the default version filled in. Raises ReleasePolicyError on bytes
    that are not a JSON object."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ReleasePolicyError(f"release policy is not JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise ReleasePolicyError("release policy must be a JSON object")
    normalized: dict[str, Any] = _normalize(document)
    normalized.setdefault("version", POLICY_VERSION)
    return normalized


def policies_equivalent(left: bytes, right: bytes) -> bool:
    """Whether two encoded policies demand the same thing (ordering, whitespace and authority
    spelling aside). Unparseable bytes are equivalent only when byte-identical."""
    if left == right:
        return True
    try:
        return normalize_policy(left) == normalize_policy(right)
    except ReleasePolicyError:
        return False
