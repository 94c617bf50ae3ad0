"""How `veil` subcommands end: exit codes, one-line errors, and missing required settings."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def fail(command: str, message: str, code: int = EXIT_FAILED) -> int:
    """Say why on stderr, prefixed with the command; return the exit code."""
    print(f"{command}: {message}", file=sys.stderr)
    return code


def require(settings: Mapping[str, Any], flags: Iterable[tuple[str, str]]) -> None:
    """Refuse settings that lack any of `flags` (command-line flag, settings key)."""
    missing = [flag for flag, key in flags if settings.get(key) is None]
    if missing:
        raise ValueError(f"missing {', '.join(missing)} (or give them in --spec)")
