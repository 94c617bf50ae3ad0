"""Admission stays incremental: no decision scans or recomposes the whole ledger.

The charged composition is updated claim by claim (`Ledger.charged`), and what admission
asks of the claims (which are Pending, how many are open) is an index kept in step with
them; both must always agree with recomputing from scratch.
"""

from __future__ import annotations

import random

import pytest

from tests.unit.privacy.helpers import at, request
from veil.privacy import (
    BudgetTerms,
    EpsilonDeltaMechanism,
    GaussianMechanism,
    Ledger,
    LedgerError,
    compact,
    decide,
    mark_consumed,
    release,
)
from veil.privacy import ledger as ledger_module
from veil.privacy.ledger import _Index, recompute_charged

BUDGET = BudgetTerms(epsilon=4.0, delta=1e-5, accountant="rdp")


def assert_in_step(ledger: Ledger) -> None:
    fresh = _Index.of(ledger.claims)
    index = ledger.index()
    assert index.pending == fresh.pending
    assert dict(index.counts) == dict(fresh.counts)
    assert ledger.charged == recompute_charged(ledger)


def test_the_index_and_the_composition_stay_in_step_with_the_claims() -> None:
    rng = random.Random(7)
    ledger = Ledger()
    keys: list[str] = []
    for step in range(400):
        roll, now = rng.random(), at(step)
        unlocked = min(1.0, step / 300)  # claims wait, then are granted as ε unlocks
        try:
            if roll < 0.45 or not keys:
                key = f"k{step}"
                noise = rng.choice((3.0, 8.0, 20.0))
                ledger, _ = decide(
                    ledger, request(key, GaussianMechanism(noise_multiplier=noise)), BUDGET, now,
                    unlocked,
                )  # fmt: skip
                keys.append(key)
            elif roll < 0.7:
                ledger = mark_consumed(ledger, rng.choice(keys), now)
            elif roll < 0.85:
                ledger = release(ledger, rng.choice(keys), now)
            elif roll < 0.95:
                # A denied claim asked again with a higher attempt re-opens.
                key = rng.choice(keys)
                claim = ledger.claims.get(key)
                if claim is not None:
                    again = request(key, *claim.mechanisms, attempt=claim.attempt + 1)
                    ledger, _ = decide(ledger, again, BUDGET, now, unlocked)
            else:
                ledger, _ = compact(ledger, now, keep_terminal=20)
        except LedgerError:
            pass  # an illegal transition changes nothing
        assert_in_step(ledger)
    assert ledger.index().counts["Granted"] + ledger.index().counts["Consumed"] > 0


def test_a_ledger_copied_with_other_claims_gets_its_own_index() -> None:
    ledger, _ = decide(
        Ledger(), request("a", GaussianMechanism(noise_multiplier=5.0)), BUDGET, at(0)
    )
    ledger.index()
    emptied = ledger.model_copy(update={"claims": {}})
    assert emptied.open_claims() == 0
    assert ledger.open_claims() == 1
    assert Ledger.from_wire(ledger.to_wire()) == ledger, "the index is no part of equality"


@pytest.mark.parametrize("claims", [2_000])
def test_a_decision_on_a_big_ledger_neither_scans_nor_recomposes(
    claims: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    terms = BudgetTerms(epsilon=1e6, delta=1e-5, accountant="rdp")
    ledger = Ledger()
    for index in range(claims):
        mechanism = EpsilonDeltaMechanism(epsilon=0.05 + (index % 7) * 0.001)
        ledger, _ = decide(ledger, request(f"old-{index}", mechanism), terms, at(index))
        ledger = mark_consumed(ledger, f"old-{index}", at(index))
    assert len(ledger.charged) == 7, "thousands of claims, seven mechanisms composed"

    def scan(*_: object) -> _Index:
        raise AssertionError("a decision rebuilt the index from every claim")

    def recompute(*_: object) -> object:
        raise AssertionError("a decision recomposed the whole ledger")

    monkeypatch.setattr(_Index, "of", classmethod(scan))
    monkeypatch.setattr(ledger_module, "recompute_charged", recompute)
    for index in range(50):
        query = GaussianMechanism(noise_multiplier=50.0)
        ledger, decision = decide(ledger, request(f"new-{index}", query), terms, at(claims))
        assert decision.state == "Granted"
        ledger = mark_consumed(ledger, f"new-{index}", at(claims))
    assert len(ledger.charged) == 8
    assert ledger.open_claims() == 0
