from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from tests.unit.privacy.helpers import at, request
from veil.privacy import (
    BudgetTerms,
    GaussianMechanism,
    IllegalTransitionError,
    Ledger,
    UnknownClaimError,
    decide,
    mark_consumed,
    release,
)
from veil.privacy.ledger import CLAIM_STATES, TRANSITIONS, recompute_charged, transition

BUDGET = BudgetTerms(epsilon=5.0, delta=1e-5, accountant="rdp")
QUERY = GaussianMechanism(noise_multiplier=5.0)


def granted(key: str = "a", ledger: Ledger | None = None) -> Ledger:
    after, decision = decide(ledger or Ledger(), request(key, QUERY), BUDGET, at(0))
    assert decision.state == "Granted"
    return after


def test_consume_then_release_is_refused() -> None:
    ledger = mark_consumed(granted(), "a", at(1))
    assert ledger.claims["a"].state == "Consumed"
    with pytest.raises(IllegalTransitionError, match="could already read the data"):
        release(ledger, "a", at(2))


def test_release_refunds_a_grant_that_was_never_read() -> None:
    ledger = granted()
    assert ledger.charged == (QUERY,)
    refunded = release(ledger, "a", at(1))
    assert refunded.claims["a"].state == "Released"
    assert refunded.charged == ()
    assert refunded.totals.released == 1
    with pytest.raises(IllegalTransitionError, match="Released is final"):
        mark_consumed(refunded, "a", at(2))


def test_repeated_transitions_are_idempotent() -> None:
    consumed = mark_consumed(granted(), "a", at(1))
    assert mark_consumed(consumed, "a", at(5)) is consumed
    released = release(granted(), "a", at(1))
    assert release(released, "a", at(5)) is released


def test_pending_claims_may_be_withdrawn_but_not_consumed() -> None:
    ledger, decision = decide(Ledger(), request("p", QUERY), BUDGET, at(0), unlocked_fraction=0.0)
    assert decision.state == "Pending"
    with pytest.raises(IllegalTransitionError, match="only a granted claim may be read"):
        mark_consumed(ledger, "p", at(1))
    assert release(ledger, "p", at(1)).claims["p"].state == "Released"


def test_every_transition_outside_the_table_raises() -> None:
    base = granted()
    claim = base.claims["a"]
    for state in CLAIM_STATES:
        ledger = base.model_copy(
            update={
                "claims": {"a": claim.model_copy(update={"state": state})},
                "charged": (QUERY,) if state in ("Granted", "Consumed") else (),
            }
        )
        for target in CLAIM_STATES:
            if target in TRANSITIONS[state]:
                continue
            with pytest.raises(IllegalTransitionError):
                transition(ledger, "a", target, at(1), "test")


def test_unknown_claims_raise() -> None:
    with pytest.raises(UnknownClaimError):
        mark_consumed(Ledger(), "nobody", at(0))


def test_wire_round_trip_and_tamper_check() -> None:
    ledger = mark_consumed(granted("b", granted("a")), "a", at(1))
    wire = json.loads(json.dumps(ledger.to_wire()))
    assert isinstance(wire["claims"], list)  # a merge patch replaces it whole
    assert wire["claims"][0]["key"] == "a"
    assert "epsilonLeftAtDecision" in wire["claims"][0]
    assert Ledger.from_wire(wire) == ledger
    assert Ledger.from_wire(None) == Ledger()
    assert recompute_charged(ledger) == ledger.charged
    wire["charged"] = []
    with pytest.raises(ValidationError, match="does not match its claims"):
        Ledger.from_wire(wire)
