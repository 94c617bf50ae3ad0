"""Reading a Job's outcome from its status."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def job_outcome(job: Mapping[str, Any] | None) -> tuple[str, str]:
    """("Complete" | "Failed" | "Running", the message of the finishing condition)."""
    for condition in ((job or {}).get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Complete", "Failed"):
            return condition["type"], condition.get("message") or condition.get("reason", "")
    return "Running", ""
