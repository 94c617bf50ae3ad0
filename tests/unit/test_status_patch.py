"""status_patch: the JSON merge patch (RFC 7386) that the API server applies to a status."""

from __future__ import annotations

from typing import Any

from veil.controllers.reconcile import status_patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, section 2, as the API server applies a merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = apply_merge_patch(result.get(key), value)
    return result


def test_the_patched_status_is_exactly_the_desired_one() -> None:
    current = {
        "ledger": {"binding": {"dataset": "file:///a"}, "claims": [1, 2], "folded": {"head": "x"}},
        "conditions": [{"type": "Ready"}],
        "other": "kept",
    }
    desired = {
        "ledger": {"claims": [1], "folded": {"head": "y", "batches": 1}},
        "conditions": [{"type": "Ready"}],
        "ledgerSeal": None,
    }
    patch = status_patch(current, desired)
    patched = apply_merge_patch(current, patch)
    # Keys the desired ledger no longer has are removed, not merged back in.
    assert patched["ledger"] == desired["ledger"]
    assert patched["other"] == "kept"
    assert "conditions" not in patch
    assert status_patch(patched, desired) == {}
