"""The ledger seal: only the holder of the ledger key can produce a ledger that verifies."""

from __future__ import annotations

import json

import pytest

from tests.unit.privacy.helpers import at, request
from veil.privacy import BudgetTerms, EpsilonDeltaMechanism, Ledger, decide, mark_consumed
from veil.privacy.ledger import Binding, bind, recompute_charged
from veil.privacy.seal import (
    LedgerSeal,
    LedgerTamperedError,
    SealWatermarks,
    canonical,
    seal,
    verify_seal,
)

KEY = b"k" * 32
UID = "0b6f9d1e-budget"
TERMS = BudgetTerms(epsilon=1.0, delta=1e-5, accountant="rdp")


def spent_ledger() -> Ledger:
    ledger = bind(Ledger(), Binding(dataset="file:///data/x.csv"))
    for index in range(3):
        ledger, _ = decide(
            ledger, request(f"k{index}", EpsilonDeltaMechanism(epsilon=0.3)), TERMS, at(index)
        )
        ledger = mark_consumed(ledger, f"k{index}", at(index))
    return ledger


def test_a_sealed_ledger_verifies_after_a_round_trip_through_json() -> None:
    ledger = spent_ledger()
    sealed = seal(ledger, UID, KEY, None)
    # What the API server hands back: plain JSON, parsed again.
    again = Ledger.from_wire(json.loads(json.dumps(ledger.to_wire())))
    verify_seal(
        again, UID, KEY, LedgerSeal.model_validate(json.loads(json.dumps(sealed.to_wire())))
    )
    assert canonical(again) == canonical(ledger)


def test_a_forged_consistent_ledger_fails_the_seal() -> None:
    ledger = spent_ledger()
    sealed = seal(ledger, UID, KEY, None)
    emptied = ledger.model_copy(update={"claims": {}})
    forged = emptied.model_copy(update={"charged": recompute_charged(emptied)})
    Ledger.model_validate(forged.to_wire())  # passes the ledger's own consistency check
    with pytest.raises(LedgerTamperedError):
        verify_seal(forged, UID, KEY, sealed)
    # A seal the forger makes with another key does not help, nor one from another budget.
    with pytest.raises(LedgerTamperedError):
        verify_seal(forged, UID, KEY, seal(forged, UID, b"x" * 32, None))
    with pytest.raises(LedgerTamperedError):
        verify_seal(ledger, "another-budget", KEY, sealed)


def test_the_chain_advances_and_a_rollback_is_caught() -> None:
    ledger = spent_ledger()
    first = seal(ledger, UID, KEY, None)
    more, _ = decide(ledger, request("k9", EpsilonDeltaMechanism(epsilon=0.05)), TERMS, at(9))
    second = seal(more, UID, KEY, first)
    assert (second.seq, second.previous) == (2, first.mac)
    watermarks = SealWatermarks()
    watermarks.advance(UID, second)
    watermarks.check(UID, second)
    verify_seal(ledger, UID, KEY, first)  # genuine, but older:
    with pytest.raises(LedgerTamperedError, match="older"):
        watermarks.check(UID, first)
    with pytest.raises(LedgerTamperedError, match="older"):
        watermarks.check(UID, None)


def test_carried_spending_is_charged() -> None:
    carried = (EpsilonDeltaMechanism(epsilon=0.7),)
    ledger = bind(Ledger(), Binding(dataset="file:///data/x.csv", carried=carried))
    assert ledger.charged == carried
    refused, decision = decide(
        ledger, request("a", EpsilonDeltaMechanism(epsilon=0.5)), TERMS, at(0)
    )
    assert decision.state == "Denied"
    Ledger.model_validate(refused.to_wire())
