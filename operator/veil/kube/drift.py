"""Does a live object already hold everything Veil wants in it?

The API server adds defaults (probe timeouts, termination message paths, cluster IPs…), so a
live object is a superset of what Veil applies. Veil applies only when some field it owns
differs: a settled child costs a read, never a write.
"""

from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal, InvalidOperation
from typing import Any

from kubernetes.utils.quantity import parse_quantity

_amount: Callable[[Any], Decimal] = parse_quantity  # the client's own parser, untyped

# Where values are resource quantities, which the API server stores in canonical form
# ("0.5" comes back "500m", "1024Mi" as "1Gi"): compared by amount, not by spelling.
_QUANTITY_MAPS = (".requests.", ".limits.")


def _is_quantity(path: str) -> bool:
    return any(marker in path for marker in _QUANTITY_MAPS) or path.endswith(".sizeLimit")


def _same_quantity(live: Any, desired: Any) -> bool:
    try:
        return _amount(live) == _amount(desired)
    except (ValueError, TypeError, InvalidOperation):
        return bool(live == desired)


def _same_scalar(live: Any, desired: Any, path: str) -> bool:
    if _is_quantity(path):
        return _same_quantity(live, desired)
    if isinstance(desired, bool) or isinstance(live, bool):
        return live is desired
    if isinstance(desired, int | float) and isinstance(live, int | float):
        return float(live) == float(desired)
    return bool(live == desired)


_MISSING = object()


def _children(live: Any, desired: Any) -> list[tuple[str, Any, Any]] | None:
    """(suffix, live child, desired child) for containers; None when the shapes differ."""
    if isinstance(desired, dict):
        if not isinstance(live, dict):
            return None
        return [(f".{k}", live.get(k, _MISSING), v) for k, v in desired.items()]
    if not isinstance(live, list) or len(live) != len(desired):
        return None
    return [
        (f"[{i}]", have, want) for i, (have, want) in enumerate(zip(live, desired, strict=True))
    ]


def first_difference(live: Any, desired: Any, path: str = "") -> str | None:
    """The path where `live` first departs from `desired`; None when it holds all of it."""
    if not isinstance(desired, dict | list):
        return None if _same_scalar(live, desired, path) else (path or ".")
    if not desired and (live is _MISSING or live is None):
        return None  # the API server drops an empty map or list (e.g. `requests: {}`)
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
