"""The `rdp` accountant is a Rényi privacy filter: checked against dp_accounting, order by order,
under an adaptive analyst who picks each claim after seeing the answers so far."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from tests.unit.privacy.helpers import at, request
from veil.privacy import (
    BudgetTerms,
    DpSgdMechanism,
    EpsilonDeltaMechanism,
    GaussianMechanism,
    Ledger,
    Mechanism,
    ZcdpMechanism,
    decide,
    epsilon_spent,
)
from veil.privacy.accounting import (
    FILTER_APPROX_DELTA_SHARE,
    FILTER_ORDERS,
    GUARANTEES,
    filter_epsilon,
)
from veil.privacy.ledger import CHARGED_STATES

DELTA = 1e-5


def independent_filter_holds(mechanisms: list[Mechanism], epsilon: float) -> bool:
    """The filter's condition computed from scratch: ∃ order α with Σ ε_α within budget."""
    approx = sum(m.delta * m.count for m in mechanisms if isinstance(m, EpsilonDeltaMechanism))
    if approx > DELTA * FILTER_APPROX_DELTA_SHARE:
        return False
    pure = sum(
        m.epsilon * m.count if isinstance(m, EpsilonDeltaMechanism) else math.inf
        for m in mechanisms
    )
    if pure <= epsilon + 1e-12:
        return True
    total = np.zeros(len(FILTER_ORDERS))
    for m in mechanisms:
        if isinstance(m, EpsilonDeltaMechanism):
            orders = np.array(FILTER_ORDERS)
            total += m.count * np.minimum(m.epsilon, orders * m.epsilon**2 / 2)
            continue
        accountant = rdp_privacy_accountant.RdpAccountant(orders=list(FILTER_ORDERS))
        total += np.asarray(accountant.compose(m.to_dp_event()).rdp)
    per_order = DELTA * (1 - FILTER_APPROX_DELTA_SHARE) / len(FILTER_ORDERS)
    return any(
        rdp_privacy_accountant.compute_epsilon([order], [value], per_order)[0] <= epsilon + 1e-12
        for order, value in zip(FILTER_ORDERS, total, strict=True)
    )


def adaptive_run(seed: int, epsilon: float) -> tuple[Ledger, list[Mechanism]]:
    """An analyst who, after each answer, asks for more when refused less: the claims depend
    on the earlier decisions, as they do when results are seen before the next job."""
    rng = random.Random(seed)
    budget = BudgetTerms(epsilon=epsilon, delta=DELTA, accountant="rdp")
    ledger, granted = Ledger(), []
    size = 1.0
    for index in range(40):
        choice = rng.choice(["gauss", "sgd", "zcdp", "pure", "approx"])
        mechanism: Mechanism = {
            "gauss": GaussianMechanism(noise_multiplier=4.0 / size),
            "sgd": DpSgdMechanism(sampling_rate=0.01, noise_multiplier=1.0 + 1 / size, steps=500),
            "zcdp": ZcdpMechanism(rho=0.01 * size),
            "pure": EpsilonDeltaMechanism(epsilon=0.1 * size),
            "approx": EpsilonDeltaMechanism(epsilon=0.05 * size, delta=1e-8),
        }[choice]
        ledger, decision = decide(ledger, request(f"k{index}", mechanism), budget, at(index))
        if decision.state in CHARGED_STATES:
            granted.append(mechanism)
            size *= 1.3  # emboldened by a grant
        else:
            size *= 0.5
    return ledger, granted


@pytest.mark.parametrize("seed", range(6))
def test_every_adaptive_run_stays_within_the_filter(seed: int) -> None:
    ledger, granted = adaptive_run(seed, epsilon=3.0)
    assert granted, "the analyst got something"
    assert independent_filter_holds(granted, 3.0)
    assert epsilon_spent(ledger.charged, DELTA, "rdp") <= 3.0
    # Whatever was denied would have broken the filter on top of what was granted before it.
    charged = [c for c in sorted(ledger.claims.values(), key=lambda c: c.seq)]
    for denied in (c for c in charged if c.state == "Denied"):
        before = [
            m
            for c in charged
            if c.seq < denied.seq and c.state in CHARGED_STATES
            for m in c.mechanisms
        ]
        assert not independent_filter_holds([*before, *denied.mechanisms], 3.0)


def test_the_filter_is_never_looser_than_plain_rdp_and_pure_claims_add_up() -> None:
    sgd = [DpSgdMechanism(sampling_rate=0.01, noise_multiplier=2.0, steps=2000)] * 20
    assert filter_epsilon(sgd, DELTA) >= epsilon_spent(sgd, DELTA, "pld")
    pure = [EpsilonDeltaMechanism(epsilon=0.25)] * 4
    assert filter_epsilon(pure, DELTA) == pytest.approx(1.0)
    over = [EpsilonDeltaMechanism(epsilon=0.1, delta=DELTA * FILTER_APPROX_DELTA_SHARE * 1.01)]
    assert filter_epsilon(over, DELTA) == math.inf


def test_each_accountant_says_what_it_promises() -> None:
    assert "not a privacy filter" in GUARANTEES["pld"]
    assert "fixed sequence" in GUARANTEES["pld"]
    assert "filter" in GUARANTEES["rdp"]
