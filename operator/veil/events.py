"""Kubernetes Events on Veil's objects: on every condition transition and every consequential
action, never on a resync that changes nothing.

Repeats are folded into an event series as client-go's events library does
(k8s.io/client-go/tools/events): an event isomorphic to one recorded in the last six minutes
(same object, type, reason and action; the note may differ) patches that Event's `series`
(count, lastObservedTime) instead of creating another, and its note becomes the latest one.
The Events are written through the core v1 API (the same objects events.k8s.io/v1 serves,
which the chart's RBAC already grants), with the new-style fields (`eventTime`, `action`,
`reportingComponent`, `series`) and the old ones that `kubectl get events
--sort-by=.lastTimestamp` reads.

Posting never fails a reconcile: a refused write is logged and dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Protocol

from veil.conditions import READY, RECONCILING, STALLED

log = logging.getLogger(__name__)

EventType = Literal["Normal", "Warning"]
REPORTING_CONTROLLER = "veil.dev/operator"
SOURCE_COMPONENT = REPORTING_CONTROLLER  # kopf writes its reporting component there too
# client-go's finishTime: an isomorphic event this long after the last one starts a new Event.
SERIES_WINDOW_SECONDS = 6 * 60
NOTE_LIMIT_BYTES = 1024  # the API server's limit on an Event's note (message)
REASON_LIMIT = 128
ACTION_RECONCILE = "Reconcile"


@dataclass(frozen=True)
class Event:
    """One event to record on an object; `reason` matches a condition reason where one does."""

    type: EventType
    reason: str
    note: str
    action: str = ACTION_RECONCILE


class Sink(Protocol):
    """Where Events are written: the API server, or a list in tests."""

    def create(self, namespace: str, body: dict[str, Any]) -> None: ...

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> bool:
        """Merge-patch an Event; False when it no longer exists (Events expire after an hour)."""
        ...


class ApiSink:
    """The core v1 events API, through the operator's dynamic client (its connection pool,
    plain JSON: the typed client's per-call validation cost more than the request)."""

    def create(self, namespace: str, body: dict[str, Any]) -> None:
        from veil.kube.apply import create_object

        create_object("v1", "Event", namespace, body)

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> bool:
        from veil.kube.apply import patch_object

        return patch_object("v1", "Event", name, namespace, body)


@dataclass
class _Coalesced:
    """Repeats of a series that arrived while one thread was writing it."""

    repeats: int = 0
    latest: tuple[dict[str, str], Event, float] | None = None


@dataclass
class _Series:
    name: str
    namespace: str
    count: int
    first: float
    last_observed: float


def _micro_time(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time(at: float) -> str:
    return datetime.fromtimestamp(at, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def clip_note(note: str, limit: int = NOTE_LIMIT_BYTES) -> str:
    """`note` within the API server's limit, which counts UTF-8 bytes."""
    encoded = note.encode()
    if len(encoded) <= limit:
        return note
    return encoded[: limit - len("…".encode())].decode(errors="ignore") + "…"


def _regarding(obj: Mapping[str, Any]) -> dict[str, str]:
    meta = obj.get("metadata") or {}
    ref = {
        "apiVersion": str(obj.get("apiVersion", "")),
        "kind": str(obj.get("kind", "")),
        "namespace": str(meta.get("namespace", "")),
        "name": str(meta.get("name", "")),
        "uid": str(meta.get("uid", "")),
    }
    return {key: value for key, value in ref.items() if value}


def _default_instance() -> str:
    return os.environ.get("POD_NAME") or socket.gethostname() or "veil-operator"


class Recorder:
    """Records events on objects, folding repeats into series; thread-safe, never raises."""

    def __init__(
        self,
        sink: Sink | None = None,
        *,
        instance: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._sink = sink
        self._instance = (instance or _default_instance())[:128]
        self._clock = clock
        self._series: dict[tuple[str, ...], _Series] = {}
        # Series being written by some thread, and what arrived for them meanwhile.
        self._writing: dict[tuple[str, ...], _Coalesced] = {}
        self._lock = threading.Lock()  # guards the two dicts, never held across an API call

    def _get_sink(self) -> Sink:
        if self._sink is None:
            self._sink = ApiSink()
        return self._sink

    def record(self, obj: Mapping[str, Any], event: Event) -> None:
        try:
            self._record(obj, event)
        except Exception as failed:  # events are auxiliary: never fail the caller
            log.warning(
                "could not post event %s %s on %s: %s",
                event.type,
                event.reason,
                _regarding(obj).get("name"),
                failed,
            )

    def _record(self, obj: Mapping[str, Any], event: Event) -> None:
        regarding = _regarding(obj)
        namespace = regarding.get("namespace")
        if not namespace or not regarding.get("name"):
            return
        now = self._clock()
        reason = event.reason[:REASON_LIMIT]
        action = event.action[:REASON_LIMIT]
        note = clip_note(event.note)
        key = (
            regarding.get("uid") or f"{namespace}/{regarding['name']}",
            regarding.get("kind", ""),
            event.type,
            reason,
            action,
        )
        clipped = Event(event.type, reason, note, action)
        with self._lock:
            self._expire(now)
            pending = self._writing.get(key)
            if pending is not None:
                # Another thread is writing this series: it writes this repeat too (count and
                # latest note) when its call returns, so no caller waits on another's API call.
                pending.repeats += 1
                pending.latest = (regarding, clipped, now)
                return
            pending = self._writing[key] = _Coalesced()
        try:
            self._post(key, regarding, clipped, now, repeats=1)
            while True:
                with self._lock:
                    if not pending.repeats:
                        break
                    repeats, pending.repeats = pending.repeats, 0
                    assert pending.latest is not None
                    regarding, clipped, now = pending.latest
                self._post(key, regarding, clipped, now, repeats=repeats)
        finally:
            with self._lock:
                self._writing.pop(key, None)

    def _post(
        self,
        key: tuple[str, ...],
        regarding: dict[str, str],
        event: Event,
        now: float,
        *,
        repeats: int,
    ) -> None:
        namespace, reason, action, note = (
            regarding["namespace"],
            event.reason,
            event.action,
            event.note,
        )
        series = self._series.get(key)
        if series is not None:
            series.count += repeats
            series.last_observed = now
            if self._get_sink().patch(
                series.namespace, series.name, self._series_patch(series, note)
            ):
                return
            with self._lock:
                self._series.pop(key, None)  # the Event expired: start a new one
        name = f"{regarding['name'][:236]}.{int(now * 1e9):x}"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": namespace},
            "involvedObject": regarding,
            "type": event.type,
            "reason": reason,
            "action": action,
            "message": note,
            "eventTime": _micro_time(now),
            "firstTimestamp": _time(now),
            "lastTimestamp": _time(now),
            "count": repeats,
            "reportingComponent": REPORTING_CONTROLLER,
            "reportingInstance": self._instance,
            # `kubectl describe` shows this as the event's "From".
            "source": {"component": SOURCE_COMPONENT},
        }
        self._get_sink().create(namespace, body)
        with self._lock:
            self._series[key] = _Series(name, namespace, repeats, now, now)

    @staticmethod
    def _series_patch(series: _Series, note: str) -> dict[str, Any]:
        return {
            "series": {
                "count": series.count,
                "lastObservedTime": _micro_time(series.last_observed),
            },
            "count": series.count,
            "lastTimestamp": _time(series.last_observed),
            "message": note,
        }

    def _expire(self, now: float) -> None:
        stale = [
            key
            for key, series in self._series.items()
            if now - series.last_observed > SERIES_WINDOW_SECONDS
        ]
        for key in stale:
            del self._series[key]


_recorder = Recorder()


def configure(recorder: Recorder) -> Recorder:
    """Replace the process's recorder (tests record into a list); returns the one replaced."""
    global _recorder
    previous, _recorder = _recorder, recorder
    return previous


def record(obj: Mapping[str, Any], event: Event) -> None:
    """Record `event` on `obj` (a Kubernetes object with apiVersion, kind and metadata).
    Blocking (an API call): call it from a worker thread, not the event loop."""
    _recorder.record(obj, event)


def normal(obj: Mapping[str, Any], reason: str, note: str, action: str = ACTION_RECONCILE) -> None:
    record(obj, Event("Normal", reason, note, action))


def warning(obj: Mapping[str, Any], reason: str, note: str, action: str = ACTION_RECONCILE) -> None:
    record(obj, Event("Warning", reason, note, action))


# --- condition transitions -------------------------------------------------------------------

# Reconciling and Stalled repeat Ready's reason and message: Ready's event says it once.
_MIRRORS = frozenset({RECONCILING, STALLED})
# Conditions whose True is the bad news (kstatus calls them abnormal-true).
ABNORMAL_TRUE = frozenset({"Exhausted"})


def with_detail(message: str, detail: str) -> str:
    """A condition message with the detail status leaves out (an SDK's full error text)."""
    detail = detail.strip()
    if not detail or detail in message:
        return message
    return f"{message} Detail: {detail}"


def transitions(
    before: Sequence[Mapping[str, Any]],
    after: Sequence[Mapping[str, Any]],
    *,
    ready_warning: bool,
    detail: str = "",
) -> list[Event]:
    """An event per condition whose status or reason changed (a new condition counts unless
    it is Unknown; a changed message alone does not). Ready's is a Warning when the outcome
    is a failure; another condition's when it turned False (True for an abnormal-true one
    such as Exhausted). `detail` goes into the note of Warnings."""
    previous = {c.get("type"): c for c in before}
    found = []
    for condition in after:
        type_ = condition.get("type")
        if type_ in _MIRRORS:
            continue
        old = previous.get(type_)
        status = condition.get("status")
        if old is None and status == "Unknown" and type_ != READY:
            continue  # a new condition with nothing to say yet (no pods, nothing fetched)
        if old is not None and (old.get("status"), old.get("reason")) == (
            status,
            condition.get("reason"),
        ):
            continue
        if type_ == READY:
            warn = ready_warning
        else:
            warn = status == ("True" if type_ in ABNORMAL_TRUE else "False")
        note = f"{type_}={status}: {condition.get('message') or condition.get('reason')}"
        found.append(
            Event(
                "Warning" if warn else "Normal",
                str(condition.get("reason") or type_),
                with_detail(note, detail) if warn else note,
            )
        )
    return found


def record_all(obj: Mapping[str, Any], found: Sequence[Event]) -> None:
    for event in found:
        record(obj, event)


# --- budget claims ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClaimDecision:
    """What a budget decided about one claim."""

    state: str  # Granted, Consumed, Pending, Denied, Released
    reason: str  # the budget's words
    consumer: str  # "SyntheticDataset ns/name"
    epsilon: float | None = None


# Named as the consumer's conditions name the same states (AwaitingBudget, BudgetDenied,
# ClaimReleased), and ClaimGranted.
_CLAIM_REASONS: dict[str, tuple[EventType, str]] = {
    "Granted": ("Normal", "ClaimGranted"),
    "Consumed": ("Normal", "ClaimGranted"),
    "Pending": ("Normal", "AwaitingBudget"),
    "Denied": ("Warning", "BudgetDenied"),
    "Released": ("Normal", "ClaimReleased"),
}
ACTION_CLAIM = "ClaimBudget"


def claim_decided(
    budget: Mapping[str, Any], decision: ClaimDecision, consumer: Mapping[str, Any] | None = None
) -> None:
    """Record a claim decision on the PrivacyBudget (and on the consumer's object when given;
    Veil's consumers announce their own claim states, see `claim_state_changed`). A Pending
    claim asked again is the same series, not a new event. Blocking."""
    type_, reason = _CLAIM_REASONS.get(decision.state, ("Normal", f"Claim{decision.state}"))
    cost = f" for ε {decision.epsilon:g}" if decision.epsilon is not None else ""
    record(
        budget,
        Event(
            type_,
            reason,
            f"Claim of {decision.consumer}{cost} {decision.state.lower()}: {decision.reason}",
            ACTION_CLAIM,
        ),
    )
    if consumer is not None:
        meta = budget.get("metadata") or {}
        record(
            consumer,
            Event(
                type_,
                reason,
                f"PrivacyBudget {meta.get('namespace')}/{meta.get('name')} "
                f"{decision.state.lower()} the claim{cost}: {decision.reason}",
                ACTION_CLAIM,
            ),
        )


def claim_state_changed(
    consumer: Mapping[str, Any], before: str | None, after: str | None, budget: str
) -> None:
    """A consumer's claim was granted (its status's claimState turned Consumed): ClaimGranted.
    Pending, Denied and Released are the consumer's Ready transitions (AwaitingBudget,
    BudgetDenied, ClaimReleased), announced with them. Blocking."""
    if after == before or after not in ("Granted", "Consumed") or before in ("Granted", "Consumed"):
        return
    record(
        consumer,
        Event(
            "Normal",
            "ClaimGranted",
            f"PrivacyBudget {budget} granted the claim; it is consumed before the Job can read "
            "the data",
            ACTION_CLAIM,
        ),
    )
