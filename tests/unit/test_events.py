"""Events: one per transition or action, folded into series like client-go's, none on a no-op."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

from veil import events
from veil.conditions import Outcome
from veil.controllers.reconcile import Result, conclude

OWNER: dict[str, Any] = {
    "apiVersion": "veil.dev/v1alpha1",
    "kind": "SyntheticDataset",
    "metadata": {"name": "synth", "namespace": "ns", "uid": "uid-1", "generation": 1},
}


class Sink:
    def __init__(self) -> None:
        self.created: list[dict[str, Any]] = []
        self.patched: list[tuple[str, dict[str, Any]]] = []
        self.gone: set[str] = set()

    def create(self, namespace: str, body: dict[str, Any]) -> None:
        assert namespace == body["metadata"]["namespace"]
        self.created.append(body)

    def patch(self, namespace: str, name: str, body: dict[str, Any]) -> bool:
        if name in self.gone:
            return False
        self.patched.append((name, body))
        return True


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def recorder(sink: Sink, clock: Clock) -> Iterator[events.Recorder]:
    recorder = events.Recorder(sink, instance="veil-0", clock=clock)
    previous = events.configure(recorder)
    yield recorder
    events.configure(previous)


def test_an_event_names_its_object_and_reporter(recorder: events.Recorder, sink: Sink) -> None:
    recorder.record(OWNER, events.Event("Normal", "JobCreated", "Created Job synth", "StartJob"))
    (body,) = sink.created
    assert body["involvedObject"] == {
        "apiVersion": "veil.dev/v1alpha1",
        "kind": "SyntheticDataset",
        "namespace": "ns",
        "name": "synth",
        "uid": "uid-1",
    }
    assert body["metadata"]["name"].startswith("synth.")
    assert (body["type"], body["reason"], body["action"]) == ("Normal", "JobCreated", "StartJob")
    assert body["reportingComponent"] == "veil.dev/operator"
    assert body["reportingInstance"] == "veil-0"
    assert body["source"] == {"component": "veil.dev/operator"}
    assert body["eventTime"].endswith("Z")
    assert body["count"] == 1
    assert "series" not in body


def test_repeats_fold_into_one_series(recorder: events.Recorder, sink: Sink, clock: Clock) -> None:
    for note in ("restored Service/a", "restored Service/a", "restored NetworkPolicy/b"):
        recorder.record(OWNER, events.Event("Normal", "DriftCorrected", note, "Apply"))
        clock.now += 30
    assert len(sink.created) == 1
    name = sink.created[0]["metadata"]["name"]
    assert [patched_name for patched_name, _ in sink.patched] == [name, name]
    last = sink.patched[-1][1]
    assert last["series"]["count"] == 3
    assert last["count"] == 3
    assert last["message"] == "restored NetworkPolicy/b"  # the latest note, as client-go keeps


def test_another_reason_type_or_object_is_another_event(
    recorder: events.Recorder, sink: Sink
) -> None:
    other = {**OWNER, "metadata": {**OWNER["metadata"], "name": "other", "uid": "uid-2"}}
    recorder.record(OWNER, events.Event("Normal", "A", "x"))
    recorder.record(OWNER, events.Event("Normal", "B", "x"))
    recorder.record(OWNER, events.Event("Warning", "A", "x"))
    recorder.record(other, events.Event("Normal", "A", "x"))
    assert len(sink.created) == 4
    assert sink.patched == []


def test_a_series_ends_after_six_quiet_minutes_or_when_its_event_expired(
    recorder: events.Recorder, sink: Sink, clock: Clock
) -> None:
    recorder.record(OWNER, events.Event("Normal", "A", "x"))
    clock.now += events.SERIES_WINDOW_SECONDS + 1
    recorder.record(OWNER, events.Event("Normal", "A", "x"))
    assert len(sink.created) == 2
    sink.gone.add(sink.created[-1]["metadata"]["name"])
    clock.now += 1
    recorder.record(OWNER, events.Event("Normal", "A", "x"))
    assert len(sink.created) == 3


def test_notes_fit_the_api_limit_in_bytes(recorder: events.Recorder, sink: Sink) -> None:
    recorder.record(OWNER, events.Event("Warning", "A", "ε" * 2000))
    note = sink.created[0]["message"]
    assert len(note.encode()) <= events.NOTE_LIMIT_BYTES
    assert note.endswith("…")


def test_a_refused_post_never_fails_the_reconcile(clock: Clock) -> None:
    class Broken(Sink):
        def create(self, namespace: str, body: dict[str, Any]) -> None:
            raise RuntimeError("forbidden")

    events.Recorder(Broken(), clock=clock).record(OWNER, events.Event("Normal", "A", "x"))


def _conditions(*items: tuple[str, str, str]) -> list[dict[str, Any]]:
    return [{"type": t, "status": s, "reason": r, "message": f"{r} message"} for t, s, r in items]


def test_transitions_are_status_or_reason_changes_not_message_changes() -> None:
    before = _conditions(("Ready", "False", "RollingOut"), ("Placed", "True", "OnNodes"))
    same = [{**c, "message": "2/3 replica(s) ready"} for c in before]
    assert events.transitions(before, same, ready_warning=False) == []
    after = _conditions(
        ("Ready", "True", "ModelServing"),
        ("Placed", "False", "NoConfidentialCapacity"),
        ("Reconciling", "True", "ModelServing"),
    )
    found = events.transitions(before, after, ready_warning=False, detail="scheduler: 0/4")
    assert [(e.type, e.reason) for e in found] == [
        ("Normal", "ModelServing"),
        ("Warning", "NoConfidentialCapacity"),
    ]
    assert found[0].note == "Ready=True: ModelServing message"
    assert found[1].note.endswith("Detail: scheduler: 0/4")  # detail on Warnings only


def test_ready_warns_on_failures_and_exhausted_is_abnormal_true() -> None:
    found = events.transitions(
        [],
        _conditions(("Ready", "False", "KeyNotReady"), ("Exhausted", "True", "BudgetSpent")),
        ready_warning=True,
    )
    assert [(e.type, e.reason) for e in found] == [
        ("Warning", "KeyNotReady"),
        ("Warning", "BudgetSpent"),
    ]
    fine = events.transitions(
        [], _conditions(("Exhausted", "False", "BudgetAvailable")), ready_warning=False
    )
    assert [e.type for e in fine] == ["Normal"]


def _concluded(owner: dict[str, Any], result: Result) -> Any:
    return conclude("SyntheticDataset", owner, result, error=None, started=0.0, logger=_Quiet())


class _Quiet:
    def debug(self, *_: Any) -> None: ...

    def warning(self, *_: Any) -> None: ...


def test_a_settled_reconcile_has_no_events_and_no_patch() -> None:
    result = Result(Outcome.progressing("Synthesizing", "Job synth is running"))
    first = _concluded(OWNER, result)
    assert [(e.type, e.reason) for e in first.events] == [("Normal", "Synthesizing")]
    settled = {**OWNER, "status": first.status_patch}
    again = _concluded(settled, result)
    assert again.status_patch == {}
    assert again.events == []
    failed = _concluded(
        settled,
        Result(
            Outcome.failed("KeyNotReady", "Key Vault refused."),
            detail="DefaultAzureCredential failed\nEnvironmentCredential: ...",
        ),
    )
    (warning,) = failed.events
    assert warning.type == "Warning"
    assert "DefaultAzureCredential failed" in warning.note
    ready = failed.status_patch["conditions"][0]
    assert "DefaultAzureCredential" not in ready["message"]


def test_claim_decisions_are_recorded_on_the_budget_and_the_consumer(
    recorder: events.Recorder, sink: Sink
) -> None:
    budget = {
        "apiVersion": "veil.dev/v1alpha1",
        "kind": "PrivacyBudget",
        "metadata": {"name": "study", "namespace": "ns", "uid": "uid-b"},
    }
    decision = events.ClaimDecision(
        "Denied", "ε 2 asked, 1 left", "SyntheticDataset ns/synth", epsilon=2.0
    )
    events.claim_decided(budget, decision, consumer=OWNER)
    on_budget, on_consumer = sink.created
    assert (on_budget["type"], on_budget["reason"]) == ("Warning", "BudgetDenied")
    assert on_budget["involvedObject"]["kind"] == "PrivacyBudget"
    assert "Claim of SyntheticDataset ns/synth for ε 2 denied" in on_budget["message"]
    assert on_consumer["involvedObject"]["kind"] == "SyntheticDataset"
    assert "PrivacyBudget ns/study denied the claim for ε 2" in on_consumer["message"]
    # Asked again while still pending: one series on the budget, not an event per poll.
    pending = events.ClaimDecision("Pending", "waits", "SyntheticDataset ns/synth")
    events.claim_decided(budget, pending)
    events.claim_decided(budget, pending)
    assert len(sink.created) == 3
    assert sink.patched[-1][1]["series"]["count"] == 2


def test_a_consumer_announces_only_the_grant_of_its_claim(
    recorder: events.Recorder, sink: Sink
) -> None:
    events.claim_state_changed(OWNER, None, "Pending", "ns/study")
    events.claim_state_changed(OWNER, "Pending", "Consumed", "ns/study")
    events.claim_state_changed(OWNER, "Consumed", "Consumed", "ns/study")
    (granted,) = sink.created
    assert (granted["type"], granted["reason"]) == ("Normal", "ClaimGranted")


def test_a_budget_version_seen_first_is_the_baseline_then_transitions_are_events() -> None:
    from veil.controllers import budget_observer
    from veil.metrics import REGISTRY

    budget: dict[str, Any] = {
        "apiVersion": "veil.dev/v1alpha1",
        "kind": "PrivacyBudget",
        "metadata": {"name": "study", "namespace": "ns", "uid": "uid-observed"},
        "status": {
            "conditions": _conditions(("Ready", "True", "BudgetAvailable")),
            "claims": {"pending": 1, "consumed": 2},
        },
    }
    assert budget_observer.observe("ADDED", budget) == []  # after a restart: no event
    labels = {"namespace": "ns", "budget": "study", "state": "Consumed"}
    assert REGISTRY.get_sample_value("veil_privacy_budget_claims", labels) == 2
    assert budget_observer.observe("MODIFIED", budget) == []  # nothing changed
    budget["status"]["conditions"] = _conditions(
        ("Ready", "True", "Exhausted"), ("Exhausted", "True", "BudgetSpent")
    )
    found = budget_observer.observe("MODIFIED", budget)
    assert [(e.type, e.reason) for e in found] == [
        ("Normal", "Exhausted"),
        ("Warning", "BudgetSpent"),
    ]
    assert budget_observer.observe("DELETED", budget) == []
    assert budget_observer.observe("ADDED", budget) == []  # forgotten: a new baseline


class _SlowSink(Sink):
    """An API server that takes a while: the first write blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.entered = threading.Event()
        self.release = threading.Event()

    def create(self, namespace: str, body: dict[str, Any]) -> None:
        self.entered.set()
        assert self.release.wait(10)
        super().create(namespace, body)


def test_repeats_while_a_series_is_being_written_fold_in_without_waiting(clock: Clock) -> None:
    """64 claims granted at once on one budget: no caller waits for another's API call, and
    the series ends with all 64 counted (one create, then one patch for the rest)."""

    sink = _SlowSink()
    recorder = events.Recorder(sink, instance="veil-0", clock=clock)
    first = threading.Thread(
        target=recorder.record, args=(OWNER, events.Event("Normal", "ClaimGranted", "claim 0"))
    )
    first.start()
    assert sink.entered.wait(10)
    for index in range(1, 64):  # return at once: the first call is still writing
        recorder.record(OWNER, events.Event("Normal", "ClaimGranted", f"claim {index}"))
    assert not sink.created
    sink.release.set()
    first.join(10)
    assert len(sink.created) == 1
    assert sink.created[0]["count"] == 1
    assert len(sink.patched) == 1
    _, patch = sink.patched[0]
    assert patch["count"] == patch["series"]["count"] == 64
    assert patch["message"] == "claim 63"
