"""What a ConfidentialModel's pods say, in conditions a person acts on. Pure functions."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from veil.conditions import Status

Condition = tuple[str, Status, str, str]


def _condition(pod: Mapping[str, Any], type_: str) -> Mapping[str, Any]:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == type_:
            return condition  # type: ignore[no-any-return]
    return {}


def placed(pods: Sequence[Mapping[str, Any]], isolation: str) -> Condition:
    """Placed: every pod scheduled, onto confidential capacity by construction of its selector."""
    live = [p for p in pods if not p.get("metadata", {}).get("deletionTimestamp")]
    if not live:
        return ("Placed", "Unknown", "NoPods", "no pods yet")
    stuck = [p for p in live if _condition(p, "PodScheduled").get("reason") == "Unschedulable"]
    if stuck:
        why = _condition(stuck[0], "PodScheduled").get("message", "")
        return (
            "Placed",
            "False",
            "NoConfidentialCapacity",
            f"{len(stuck)} pod(s) cannot be scheduled: no {isolation} capacity fits. "
            f"Scheduler: {why}",
        )
    waiting = [p for p in live if not (p.get("spec") or {}).get("nodeName")]
    if waiting:
        return ("Placed", "Unknown", "Scheduling", f"{len(waiting)} pod(s) not yet scheduled")
    nodes = sorted({p["spec"]["nodeName"] for p in live})
    return ("Placed", "True", "OnConfidentialNodes", f"on {', '.join(nodes)}")


def key_released(pods: Sequence[Mapping[str, Any]]) -> Condition:
    """The runtime turns ready only after the key is released and the model unsealed."""
    ready = [p for p in pods if _condition(p, "Ready").get("status") == "True"]
    if ready:
        return (
            "KeyReleased",
            "True",
            "ModelUnsealed",
            f"{len(ready)} pod(s) released the key and loaded the model",
        )
    restarting = [
        c
        for p in pods
        for c in (p.get("status") or {}).get("containerStatuses") or []
        if c.get("name") == "runtime" and int(c.get("restartCount") or 0) > 0
    ]
    if restarting:
        last = restarting[0].get("lastState", {}).get("terminated", {})
        return (
            "KeyReleased",
            "False",
            "ReleaseRefused",
            f"the runtime exited ({last.get('reason', 'error')}): see its log for the "
            "attestation or Key Vault refusal",
        )
    return ("KeyReleased", "Unknown", "AwaitingRelease", "no pod has released the key yet")
