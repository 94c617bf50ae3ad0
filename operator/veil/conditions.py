"""Status conditions that tools like Flux (kstatus) and Argo CD read correctly.

The rules (fluxcd/pkg runtime/conditions): Ready is always present; Ready is False while
Reconciling or Stalled is True; Reconciling and Stalled are never both True;
observedGeneration never exceeds metadata.generation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

READY = "Ready"
RECONCILING = "Reconciling"
STALLED = "Stalled"

Status = Literal["True", "False", "Unknown"]


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Outcome:
    """What one reconcile concluded, in the words a person reads in `kubectl get`."""

    ready: Status
    reason: str
    message: str
    reconciling: bool = False
    stalled: bool = False
    # A failure or a dead end (a Warning event), not progress (a Normal one).
    warning: bool = False

    @classmethod
    def done(cls, reason: str = "Succeeded", message: str = "") -> Outcome:
        return cls("True", reason, message)

    @classmethod
    def progressing(cls, reason: str, message: str) -> Outcome:
        return cls("False", reason, message, reconciling=True)

    @classmethod
    def stalled_with(cls, reason: str, message: str) -> Outcome:
        return cls("False", reason, message, stalled=True, warning=True)

    @classmethod
    def failed(cls, reason: str, message: str) -> Outcome:
        """A failure Veil will retry: Ready False, still reconciling."""
        return cls("False", reason, message, reconciling=True, warning=True)


def set_condition(
    conditions: Sequence[Mapping[str, Any]],
    type_: str,
    *,
    status: Status,
    reason: str,
    message: str,
    generation: int,
    now: str,
) -> list[dict[str, Any]]:
    """Upsert one condition; lastTransitionTime moves only when the status changes."""
    result = [dict(c) for c in conditions if c.get("type") != type_]
    previous = next((c for c in conditions if c.get("type") == type_), None)
    transition = (
        previous["lastTransitionTime"]
        if previous is not None
        and previous.get("status") == status
        and previous.get("lastTransitionTime")
        else now
    )
    result.append(
        {
            "type": type_,
            "status": status,
            "observedGeneration": generation,
            "lastTransitionTime": transition,
            "reason": reason,
            "message": message[:32768],
        }
    )
    return sorted(result, key=lambda c: (c["type"] != READY, c["type"]))


def remove_condition(conditions: Sequence[Mapping[str, Any]], type_: str) -> list[dict[str, Any]]:
    return [dict(c) for c in conditions if c.get("type") != type_]


def apply_outcome(
    conditions: Sequence[Mapping[str, Any]], outcome: Outcome, generation: int, now: str
) -> list[dict[str, Any]]:
    """Conditions after a reconcile that ended with `outcome`, consistent by construction."""
    reason, message = outcome.reason, outcome.message
    result = set_condition(
        conditions,
        READY,
        status=outcome.ready,
        reason=reason,
        message=message,
        generation=generation,
        now=now,
    )
    for type_, present in ((RECONCILING, outcome.reconciling), (STALLED, outcome.stalled)):
        if present:
            result = set_condition(
                result,
                type_,
                status="True",
                reason=reason,
                message=message,
                generation=generation,
                now=now,
            )
        else:
            result = remove_condition(result, type_)
    return result


def kstatus_violations(obj: Mapping[str, Any]) -> list[str]:
    """Every way `obj`'s conditions break the rules above; empty when they hold."""
    problems: list[str] = []
    generation = obj.get("metadata", {}).get("generation", 0)
    status = obj.get("status") or {}
    by_type = {c.get("type"): c for c in status.get("conditions", [])}
    ready = by_type.get(READY)
    if ready is None:
        problems.append("Ready condition missing")
    reconciling = by_type.get(RECONCILING, {}).get("status") == "True"
    stalled = by_type.get(STALLED, {}).get("status") == "True"
    if reconciling and stalled:
        problems.append("Reconciling and Stalled are both True")
    if ready is not None and (reconciling or stalled) and ready.get("status") == "True":
        problems.append("Ready is True while Reconciling or Stalled")
    observed = status.get("observedGeneration")
    if observed is not None and observed > generation:
        problems.append(f"status.observedGeneration {observed} > generation {generation}")
    for condition in by_type.values():
        seen = condition.get("observedGeneration")
        if seen is not None and seen > generation:
            problems.append(f"{condition.get('type')}.observedGeneration {seen} > generation")
        if condition.get("status") not in ("True", "False", "Unknown"):
            problems.append(f"{condition.get('type')} has status {condition.get('status')!r}")
    return problems
