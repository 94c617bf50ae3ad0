"""How a Kata agent policy's digest appears in attestation, and the release-policy claims that
pin it. Pure: no I/O.

Two bindings exist, and they hash different bytes:

policy (AKS Kata confidential containers, `io.katacontainers.config.agent.policy`)
    The host sets the TEE's launch-time config field to the digest of the policy text itself;
    the kata agent recomputes it before accepting a policy (`check_policy_hash` in the agent's
    policy.rs): sha256(text) == SEV-SNP HOST_DATA (32 bytes), sha384(text) == TDX MRCONFIGID
    (48 bytes).

init-data (upstream CoCo, `io.katacontainers.config.hypervisor.cc_init_data`)
    The policy is the `policy.rego` entry of an init-data TOML document (version 0.1.0, an
    `algorithm` of sha256/sha384/sha512); the annotation is base64(gzip(TOML)). The digest is the
    named hash of the TOML text, cut or zero-padded to the field: 32 bytes for SNP HOST_DATA,
    48 for TDX MRCONFIGID (kata's initdata crate, `adjust_digest`). The attestation agent checks
    the document against that field before using the policy.

MAA claim names (Azure Attestation token profiles): SEV-SNP `x-ms-attestation-type` "sevsnpvm",
`x-ms-sevsnpvm-hostdata` (hex), `x-ms-sevsnpvm-is-debuggable`; TDX `x-ms-attestation-type`
"tdxvm", `tdx_mrconfigid` (96 hex characters), `tdx_td_attributes_debug`.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
from collections.abc import Mapping
from typing import Final, Literal

from veil.resources.kata_policy import KataPolicy

Platform = Literal["sevsnp", "tdx"]
InitDataAlgorithm = Literal["sha256", "sha384", "sha512"]
ClaimValue = str | bool

INIT_DATA_ANNOTATION: Final = "io.katacontainers.config.hypervisor.cc_init_data"
INIT_DATA_VERSION: Final = "0.1.0"
INIT_DATA_POLICY_KEY: Final = "policy.rego"
FIELD_BYTES: Final[Mapping[Platform, int]] = {"sevsnp": 32, "tdx": 48}

ATTESTATION_TYPE: Final = "x-ms-attestation-type"
SEVSNP_HOSTDATA: Final = "x-ms-sevsnpvm-hostdata"
SEVSNP_IS_DEBUGGABLE: Final = "x-ms-sevsnpvm-is-debuggable"
TDX_MRCONFIGID: Final = "tdx_mrconfigid"
TDX_DEBUG: Final = "tdx_td_attributes_debug"


class KataClaimsError(ValueError):
    """The measurement cannot be expressed for the platform; the message says why."""


def policy_measurement(policy: KataPolicy, platform: Platform) -> str:
    """Hex of the config field when the policy itself is bound (AKS): HOST_DATA or MRCONFIGID."""
    return policy.sha256 if platform == "sevsnp" else policy.sha384


def init_data(
    policy: KataPolicy,
    *,
    algorithm: InitDataAlgorithm = "sha384",
    extra: Mapping[str, str] | None = None,
) -> str:
    """An init-data TOML document carrying the policy (and e.g. `aa.toml`, `cdh.toml` in
    `extra`). Deterministic: entries sorted, each a multi-line literal string."""
    entries = {**(extra or {}), INIT_DATA_POLICY_KEY: policy.rego}
    lines = [f'algorithm = "{algorithm}"', f'version = "{INIT_DATA_VERSION}"', "", "[data]"]
    for key in sorted(entries):
        value = entries[key]
        if "'''" in value or '"' in key or "\\" in key:
            raise KataClaimsError(f"init-data entry {key!r} cannot be a TOML literal string")
        # A newline right after the opening ''' is dropped by TOML, so the value is exact.
        lines.append(f"\"{key}\" = '''\n{value}'''")
    return "\n".join(lines) + "\n"


def init_data_annotation(document: str) -> str:
    """The annotation value: base64 of the gzipped document (mtime 0, so the bytes repeat)."""
    return base64.b64encode(gzip.compress(document.encode("utf-8"), mtime=0)).decode("ascii")


def init_data_measurement(document: str, algorithm: InitDataAlgorithm, platform: Platform) -> str:
    """Hex of HOST_DATA / MRCONFIGID for an init-data document hashed with `algorithm`."""
    digest = hashlib.new(algorithm, document.encode("utf-8")).digest()
    size = FIELD_BYTES[platform]
    return digest[:size].ljust(size, b"\0").hex()


def release_claims_for(measurement: str, platform: Platform) -> dict[str, ClaimValue]:
    """MAA claims pinning a coco guest of `platform` to `measurement` (hex of the config field)
    with debugging off."""
    size = FIELD_BYTES[platform]
    value = measurement.lower()
    if len(value) != 2 * size or any(c not in "0123456789abcdef" for c in value):
        raise KataClaimsError(f"a {platform} measurement is {size} bytes of hex")
    if platform == "sevsnp":
        return {
            ATTESTATION_TYPE: "sevsnpvm",
            SEVSNP_HOSTDATA: value,
            SEVSNP_IS_DEBUGGABLE: False,
        }
    return {ATTESTATION_TYPE: "tdxvm", TDX_MRCONFIGID: value, TDX_DEBUG: False}


def coco_release_claims(policy: KataPolicy, platform: Platform) -> dict[str, ClaimValue]:
    """The claims for a pod whose agent policy itself is bound to the TEE (AKS Kata CC)."""
    return release_claims_for(policy_measurement(policy, platform), platform)
