"""What a PrivacyBudget's status says, as metrics and events, read from the watch stream.

The budget's status is written by `budget_store` (claims and refreshes, under optimistic
concurrency); this handler only reads each version the watch delivers: the claims-by-state
gauge, readiness, and an event per condition transition it sees. The first version seen after
the operator starts only sets the baseline (it cannot tell what changed before), so a restart
posts nothing. Writes nothing to the budget.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import Any

import kopf

from veil import API_GROUP, API_VERSION, events
from veil.conditions import READY, STALLED
from veil.metrics import RESOURCE_READY, forget_budget, observe_budget_claims

KIND = "PrivacyBudget"
PLURAL = "privacybudgets"

_seen: dict[str, list[dict[str, Any]]] = {}
_guard = threading.Lock()


def _status(conditions: list[dict[str, Any]], type_: str) -> str | None:
    return next((str(c.get("status")) for c in conditions if c.get("type") == type_), None)


def observe(event_type: str | None, body: Mapping[str, Any]) -> list[events.Event]:
    """Update the budget's metrics; the transitions since the last version seen (none for the
    first). Pure but for the metrics and the per-budget memory."""
    meta = body.get("metadata") or {}
    namespace, name, uid = meta.get("namespace", ""), meta.get("name", ""), meta.get("uid", "")
    if event_type == "DELETED" or meta.get("deletionTimestamp"):
        if event_type == "DELETED":
            with _guard:
                _seen.pop(uid, None)
        forget_budget(namespace, name)
        with contextlib.suppress(KeyError):
            RESOURCE_READY.remove(KIND, namespace, name)
        return []
    status = body.get("status") or {}
    conditions = [dict(c) for c in status.get("conditions") or []]
    observe_budget_claims(namespace, name, dict(status.get("claims") or {}))
    ready = _status(conditions, READY)
    if ready is not None:
        RESOURCE_READY.labels(KIND, namespace, name).set(1.0 if ready == "True" else 0.0)
    with _guard:
        before = _seen.get(uid)
        _seen[uid] = conditions
    if before is None:
        return []
    return events.transitions(
        before, conditions, ready_warning=_status(conditions, STALLED) == "True"
    )


@kopf.on.event(API_GROUP, API_VERSION, PLURAL)
def on_budget_event(event: kopf.RawEvent, **_: Any) -> None:
    """Runs in kopf's executor: the events are posted from its thread."""
    body = event.get("object") or {}
    events.record_all(body, observe(event.get("type"), body))
