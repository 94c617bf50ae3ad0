"""Does a live object already hold everything Veil wants in it?

The API server adds defaults (probe timeouts, termination message paths, cluster IPs…), so a
live object is a superset of what Veil applies. Veil applies only when some field it owns
differs: a settled child costs a read, never a write.
"""

from __future__ import annotations

from typing import Any


def _same_scalar(live: Any, desired: Any) -> bool:
    if isinstance(desired, bool) or isinstance(live, bool):
        return live is desired
    if isinstance(desired, int | float) and isinstance(live, int | float):
        return float(live) == float(desired)
    return bool(live == desired)


def _children(live: Any, desired: Any) -> list[tuple[str, Any, Any]] | None:
    """(suffix, live child, desired child) for containers; None when the shapes differ."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return None
        missing = object()
        return [(f".{k}", live.get(k, missing), v) for k, v in desired.items()]
    if not isinstance(live, list) or len(live) != len(desired):
        return None
    return [
        (f"[{i}]", have, want) for i, (have, want) in enumerate(zip(live, desired, strict=True))
    ]


def first_difference(live: Any, desired: Any, path: str = "") -> str | None:
    """The path where `live` first departs from `desired`; None when it holds all of it."""
    if not isinstance(desired, dict | list):
        return None if _same_scalar(live, desired) else (path or ".")
    pairs = _children(live, desired)
    if pairs is None:
        return path or "."
    for suffix, have, want in pairs:
        found = first_difference(have, want, path + suffix)
        if found:
            return found
    return None


def contains(live: Any, desired: Any) -> bool:
    """True when every field of `desired` is present in `live` with the same value."""
    return first_difference(live, desired) is None
