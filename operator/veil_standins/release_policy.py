"""Secure Key Release policies (grammar version 1.0.0) as the Key Vault stand-in reads them.

Part of the LOCAL STAND-INS, not a security boundary: it mirrors what Azure Key Vault checks so
that Veil's policies are exercised end to end, nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

_MISSING = object()


def normalize_authority(url: str) -> str:
    """Lower-case scheme and host, no port 443, no trailing slash: how an authority in a policy
    and the `iss` of a token are compared."""
    parts = urlsplit(url.strip())
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = host if port in (None, 443) else f"{host}:{port}"
    return f"{parts.scheme.lower()}://{netloc}{parts.path.rstrip('/')}"


def _claim(claims: Mapping[str, Any], path: str) -> Any:
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _condition_holds(condition: Mapping[str, Any], claims: Mapping[str, Any]) -> bool:
    if "allOf" in condition:
        return all(_condition_holds(c, claims) for c in condition["allOf"])
    if "anyOf" in condition:
        return any(_condition_holds(c, claims) for c in condition["anyOf"])
    value = _claim(claims, str(condition["claim"]))
    if value is _MISSING:
        return False
    expected = condition["equals"]
    return bool(type(value) is type(expected) and value == expected)


def authorities(policy: Mapping[str, Any]) -> list[str]:
    """The normalized authorities a policy names, in order."""
    return [normalize_authority(str(b.get("authority", ""))) for b in policy.get("anyOf", [])]


def evaluate_release_policy(policy: Mapping[str, Any], claims: Mapping[str, Any]) -> bool:
    """Whether an attestation token's claims satisfy a release policy: some anyOf branch whose
    authority is the token's issuer has all its conditions hold."""
    issuer = normalize_authority(str(claims.get("iss", "")))
    for branch in policy.get("anyOf", []):
        if normalize_authority(str(branch.get("authority", ""))) != issuer:
            continue
        if _condition_holds(branch, claims):
            return True
    return False


def validate_policy_grammar(policy: Any) -> str | None:
    """None when `policy` follows the grammar, else what is wrong (Key Vault answers 400)."""
    if not isinstance(policy, dict):
        return "the policy must be a JSON object"
    if policy.get("version", "1.0.0") not in ("1.0.0", "0.2"):
        return f"unsupported policy version {policy.get('version')!r}"
    branches = policy.get("anyOf")
    if not isinstance(branches, list) or not branches:
        return "anyOf must be a non-empty list"
    for branch in branches:
        if not isinstance(branch, dict) or not str(branch.get("authority", "")).startswith(
            "https://"
        ):
            return "each anyOf entry needs an https authority"
        problem = _validate_conditions(branch)
        if problem:
            return problem
    return None


def _validate_conditions(node: dict[str, Any]) -> str | None:
    lists = [k for k in ("allOf", "anyOf") if k in node]
    if len(lists) != 1 or not isinstance(node[lists[0]], list) or not node[lists[0]]:
        return "each condition set needs exactly one non-empty allOf or anyOf"
    for condition in node[lists[0]]:
        if not isinstance(condition, dict):
            return "conditions must be objects"
        if "allOf" in condition or "anyOf" in condition:
            problem = _validate_conditions(condition)
            if problem:
                return problem
            continue
        if set(condition) != {"claim", "equals"}:
            return f"a condition needs exactly claim and equals, got {sorted(condition)}"
        if not isinstance(condition["equals"], str | bool):
            return "equals must be a string or a boolean"
    return None
