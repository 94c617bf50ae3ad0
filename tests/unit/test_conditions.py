from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from veil.conditions import Outcome, apply_outcome, kstatus_violations, set_condition

T0, T1 = "2026-01-01T00:00:00Z", "2026-01-01T00:05:00Z"

outcomes = st.builds(
    Outcome,
    ready=st.sampled_from(["True", "False", "Unknown"]),
    reason=st.sampled_from(["Succeeded", "Progressing", "InvalidSpec"]),
    message=st.text(max_size=20),
    reconciling=st.booleans(),
    stalled=st.booleans(),
)


def test_transition_time_moves_only_on_status_change() -> None:
    first = set_condition([], "Ready", status="False", reason="A", message="", generation=1, now=T0)
    same = set_condition(
        first, "Ready", status="False", reason="B", message="x", generation=2, now=T1
    )
    changed = set_condition(
        same, "Ready", status="True", reason="C", message="", generation=2, now=T1
    )
    assert same[0]["lastTransitionTime"] == T0
    assert same[0]["reason"] == "B"
    assert changed[0]["lastTransitionTime"] == T1


def test_constructors_obey_kstatus() -> None:
    for outcome in (
        Outcome.done(),
        Outcome.progressing("Progressing", "rolling out"),
        Outcome.stalled_with("InvalidSpec", "bad"),
        Outcome.failed("ReconcileError", "boom"),
    ):
        obj = {
            "metadata": {"generation": 3},
            "status": {"observedGeneration": 3, "conditions": apply_outcome([], outcome, 3, T0)},
        }
        assert kstatus_violations(obj) == []


@given(st.lists(outcomes, min_size=1, max_size=5))
def test_any_sequence_of_constructed_outcomes_keeps_ready_present(seq: list[Outcome]) -> None:
    conditions: list[dict[str, object]] = []
    for outcome in seq:
        conditions = apply_outcome(conditions, outcome, 1, T0)
        types = [c["type"] for c in conditions]
        assert types.count("Ready") == 1
        assert len(types) == len(set(types))
        assert ("Reconciling" in types) == outcome.reconciling
        assert ("Stalled" in types) == outcome.stalled


def test_checker_catches_each_violation() -> None:
    def obj(conditions: list[dict[str, object]], observed: int = 1) -> dict[str, object]:
        return {
            "metadata": {"generation": 1},
            "status": {"observedGeneration": observed, "conditions": conditions},
        }

    ready_true = {"type": "Ready", "status": "True", "reason": "X"}
    assert "Ready condition missing" in kstatus_violations(obj([]))
    assert any(
        "both True" in p
        for p in kstatus_violations(
            obj(
                [
                    {"type": "Ready", "status": "False"},
                    {"type": "Reconciling", "status": "True"},
                    {"type": "Stalled", "status": "True"},
                ]
            )
        )
    )
    assert any(
        "Ready is True" in p
        for p in kstatus_violations(obj([ready_true, {"type": "Reconciling", "status": "True"}]))
    )
    assert any("observedGeneration" in p for p in kstatus_violations(obj([ready_true], 2)))
    assert kstatus_violations(obj([ready_true])) == []


def test_an_unexpected_failure_leaves_one_line_and_points_to_the_log() -> None:
    from veil.controllers.reconcile import failure_message

    sdk_text = (
        "Operation returned an invalid status 'Forbidden'\n"
        'Content: {"error": {"code": "Forbidden", "message": "' + "x" * 500 + '"}}\n'
        'Traceback (most recent call last):\n  File "x.py", line 1'
    )
    message = failure_message(RuntimeError(sdk_text))
    assert "\n" not in message
    assert "Traceback" not in message
    assert "Content:" not in message
    assert message.startswith("Reconcile failed and will be retried (RuntimeError: Operation")
    assert message.endswith("Details are in the operator's log and the object's events.")
    assert len(failure_message(RuntimeError("y" * 5000))) < 300
