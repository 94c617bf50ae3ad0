"""What a caller expects of the TEE that serves a model, known before it sends anything.

A JSON (or YAML) file the model's owner publishes, or the ConfidentialModel manifest itself:

    {"issuers": ["https://<instance>.attest.azure.net"],      # spec.keyRelease.attestationAuthority
     "placement": "confidentialACI" | "confidentialVM",         # spec.tee.isolation
     "hostdata": "<64 hex>",                  # sha256 of the decoded spec.tee.ccePolicy (ACI)
     "requiredClaims": [{"claim": "x-ms-sevsnpvm-launchmeasurement", "equals": "..."}],
     "attestationTypes"?, "complianceStatus"?, "allowDebuggable"?}

`requiredClaims` names are dotted paths into the token (e.g. `x-ms-isolation-tee.x-ms-...`).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from veil.runtime.attestation import AttestationPolicy, Placement

_POLICY_KEYS = ("placement", "attestationTypes", "complianceStatus", "hostdata", "allowDebuggable")
_KEYS = frozenset({"issuers", "issuer", "requiredClaims", *_POLICY_KEYS})


def claim_value(claims: Mapping[str, Any], name: str) -> tuple[bool, Any]:
    """(found, value) of a claim named by a dotted path; a literal name with dots wins."""
    if name in claims:
        return True, claims[name]
    node: Any = claims
    for part in name.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


@dataclass(frozen=True)
class Expectations:
    """The issuers to trust, the TEE claims to demand, and further exact claims."""

    issuers: tuple[str, ...]
    policy: AttestationPolicy
    required_claims: tuple[tuple[str, Any], ...] = ()
    allow_insecure_loopback_issuers: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if not self.issuers:
            raise ValueError("expectations must name at least one issuer")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Expectations:
        if data.get("kind") == "ConfidentialModel":
            return cls.from_confidential_model(data)
        unknown = set(data) - _KEYS
        if unknown:
            raise ValueError(f"unknown expectation fields: {', '.join(sorted(unknown))}")
        issuers = data.get("issuers", [])
        if isinstance(data.get("issuer"), str):
            issuers = [*issuers, data["issuer"]]
        if not isinstance(issuers, list) or not all(isinstance(i, str) for i in issuers):
            raise ValueError("issuers must be a list of URLs")
        policy = AttestationPolicy.from_mapping({k: data[k] for k in _POLICY_KEYS if k in data})
        return cls(tuple(issuers), policy, _required(data.get("requiredClaims", [])))

    @classmethod
    def from_confidential_model(cls, manifest: Mapping[str, Any]) -> Expectations:
        """From a ConfidentialModel: its attestation authority, isolation, CCE policy (as
        hostdata) and required claims: what its release policy demands of the TEE."""
        spec = manifest.get("spec")
        if not isinstance(spec, Mapping):
            raise ValueError("the ConfidentialModel has no spec")
        tee = spec.get("tee") or {}
        release = spec.get("keyRelease") or {}
        authority = release.get("attestationAuthority")
        if not isinstance(authority, str):
            raise ValueError("the ConfidentialModel names no keyRelease.attestationAuthority")
        isolation = tee.get("isolation")
        if isolation not in {p.value for p in Placement}:
            raise ValueError(f"isolation {isolation!r} has no MAA attestation to verify")
        data: dict[str, Any] = {"issuers": [authority], "placement": isolation}
        if isinstance(tee.get("ccePolicy"), str):
            try:
                policy = base64.b64decode(tee["ccePolicy"], validate=True)
            except binascii.Error as exc:
                raise ValueError(f"tee.ccePolicy is not base64: {exc}") from exc
            data["hostdata"] = hashlib.sha256(policy).hexdigest()
        if release.get("requiredClaims"):
            data["requiredClaims"] = release["requiredClaims"]
        return cls.from_mapping(data)

    @classmethod
    def from_file(cls, path: Path) -> Expectations:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            data = json.loads(text)
        except ValueError:
            import yaml  # only for a manifest or YAML file

            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise ValueError(f"{path} is neither JSON nor YAML: {exc}") from exc
        if not isinstance(data, Mapping):
            raise ValueError(f"{path} does not hold an object")
        return cls.from_mapping(data)

    def with_issuer_loopback(self, allowed: bool) -> Expectations:
        return Expectations(self.issuers, self.policy, self.required_claims, allowed)


def _required(entries: Any) -> tuple[tuple[str, Any], ...]:
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise ValueError("requiredClaims must be a list of {claim, equals}")
    out = []
    for entry in entries:
        if not isinstance(entry, Mapping) or not isinstance(entry.get("claim"), str):
            raise ValueError("each of requiredClaims needs a 'claim' name")
        if "equals" not in entry:
            raise ValueError(f"required claim {entry['claim']!r} has no 'equals'")
        out.append((entry["claim"], entry["equals"]))
    return tuple(out)
