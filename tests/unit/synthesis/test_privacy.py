"""The claim of a synthesis run is never below what smartnoise-synth spends, and is tight."""

from __future__ import annotations

import math

import pytest
from dp_accounting import rdp
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.privacy.mechanisms import MECHANISM, ZcdpMechanism, to_dp_event
from veil.synthesis.privacy import BudgetSplit, claim_mechanisms, zcdp_epsilon, zcdp_rho

GRID = [
    (0.1, 1e-6),
    (0.5, 1e-9),
    (1.0, 1e-6),
    (1.0, 1e-5),
    (4.0, 1e-6),
    (10.0, 1e-8),
    (50.0, 1e-3),
    (0.05, 0.1),
]


@pytest.mark.parametrize(("epsilon", "delta"), GRID)
def test_rho_upper_bounds_smartnoise_and_is_tight(epsilon: float, delta: float) -> None:
    from snsynth.utils import cdp_rho

    spent = cdp_rho(epsilon, delta)  # what MST and AIM run at, through OpenDP
    claimed = zcdp_rho(epsilon, delta)
    assert claimed >= spent
    assert claimed <= spent * (1 + 1e-6)


@settings(max_examples=30, deadline=None)
@given(
    epsilon=st.floats(min_value=0.01, max_value=100.0),
    log_delta=st.floats(min_value=-14.0, max_value=-1.0),
)
def test_rho_converts_back_to_at_least_epsilon(epsilon: float, log_delta: float) -> None:
    delta = 10.0**log_delta
    rho = zcdp_rho(epsilon, delta)
    # ρ is the upper end of the inversion: its ε at δ is epsilon, to the precision of floats.
    assert zcdp_epsilon(rho, delta) >= epsilon * (1 - 1e-9)
    assert zcdp_epsilon(rho, delta) <= epsilon * (1 + 1e-6)
    assert rho > 0


def test_zcdp_epsilon_is_the_cks_bound() -> None:
    # For ρ-zCDP the classic bound ε = ρ + 2√(ρ ln(1/δ)) is looser than CKS20's optimum.
    rho, delta = 0.05, 1e-6
    assert zcdp_epsilon(rho, delta) < rho + 2 * math.sqrt(rho * math.log(1 / delta))
    assert zcdp_epsilon(0.0, delta) == 0.0


def test_claim_wire_format_and_split() -> None:
    claim = claim_mechanisms("mst", 1.0, 1e-6, 0.25)
    assert [m["type"] for m in claim] == ["zcdp", "epsilonDelta"]
    assert claim[0] == {"type": "zcdp", "rho": zcdp_rho(0.75, 1e-6), "count": 1}
    assert claim[1] == {"type": "epsilonDelta", "epsilon": 0.25, "delta": 0.0, "count": 1}
    parsed = [MECHANISM.validate_python(m) for m in claim]
    assert isinstance(parsed[0], ZcdpMechanism)
    assert claim_mechanisms("aim", 1.0, 1e-6) == [claim_mechanisms("mst", 1.0, 1e-6)[0]]


def test_every_part_is_carved_out_of_the_total() -> None:
    split = BudgetSplit(1.0, 1e-6, 0.1, 0.05, 2e-7, 0.15)
    claim = claim_mechanisms(
        "mst", 1.0, 1e-6, 0.1, discovery_epsilon=0.05, discovery_delta=2e-7, report_epsilon=0.15
    )
    assert [m["type"] for m in claim] == ["zcdp", "gaussian", "epsilonDelta", "epsilonDelta"]
    assert claim[0]["rho"] == zcdp_rho(0.7, 1e-6 - 2e-7)
    assert claim[2] == {"type": "epsilonDelta", "epsilon": 0.1, "delta": 0.0, "count": 1}
    assert claim[3] == {"type": "epsilonDelta", "epsilon": 0.05, "delta": 2e-7, "count": 1}
    # The Gaussian report is ρ_rep-zCDP with ρ_rep = 1 / (2 m²): with the synthesizer's ρ it
    # makes exactly the zCDP part's ρ, which converts to (ε − ε_pre − ε_disc, δ − δ_disc).
    report_rho = 1 / (2 * claim[1]["noiseMultiplier"] ** 2)
    assert report_rho == pytest.approx(split.report_rho, rel=1e-12)
    zcdp_part = zcdp_epsilon(claim[0]["rho"] + report_rho, 1e-6 - 2e-7)
    total = zcdp_part + 0.1 + 0.05
    assert 1.0 * (1 - 1e-9) <= total <= 1.0 * (1 + 1e-6)
    assert split.synthesizer_epsilon == pytest.approx(0.7)


def test_a_full_claim_costs_at_most_its_epsilon_in_the_ledger() -> None:
    # Basic composition of the (ε, δ) parts with the RDP bound of the zCDP/Gaussian parts, as
    # the ledger does: never more than the spec's ε (up to the RDP grid's coarseness).
    claim = [
        MECHANISM.validate_python(m)
        for m in claim_mechanisms(
            "mst", 2.0, 1e-6, 0.1, discovery_epsilon=0.1, discovery_delta=1e-7, report_epsilon=0.2
        )
    ]
    native = [m for m in claim if m.type != "epsilonDelta"]
    ledger = rdp.RdpAccountant()
    ledger.compose(to_dp_event(native))
    total = ledger.get_epsilon(1e-6 - 1e-7) + 0.2
    assert 2.0 * (1 - 1e-9) <= total <= 2.0 * 1.001


@pytest.mark.parametrize(("epsilon", "delta"), GRID[:6])
def test_claim_costs_its_epsilon_in_the_ledger(epsilon: float, delta: float) -> None:
    # The ledger converts with dp_accounting's RDP accountant, on its grid of orders: the
    # claim costs ε there, up to that grid's coarseness (measured: +3.8% at ε 0.1, +0.05%
    # at ε 0.5, under 0.01% from ε 1 up) — never less.
    mechanisms = [MECHANISM.validate_python(m) for m in claim_mechanisms("mst", epsilon, delta)]
    accountant = rdp.RdpAccountant()
    accountant.compose(to_dp_event(mechanisms))
    ledger_epsilon = accountant.get_epsilon(delta)
    assert epsilon * (1 - 1e-9) <= ledger_epsilon <= epsilon * (1.05 if epsilon < 0.5 else 1.001)


def test_claim_refuses_what_it_cannot_bound() -> None:
    with pytest.raises(ValueError, match="not differentially private"):
        claim_mechanisms("marginals", 1.0, 1e-6)
    with pytest.raises(ValueError, match="smaller than epsilon"):
        claim_mechanisms("mst", 1.0, 1e-6, 1.0)
    with pytest.raises(ValueError, match="smaller than epsilon"):
        claim_mechanisms(
            "mst", 1.0, 1e-6, 0.3, discovery_epsilon=0.3, discovery_delta=1e-7, report_epsilon=0.4
        )
    with pytest.raises(ValueError, match="discovery delta"):
        claim_mechanisms("mst", 1.0, 1e-6, discovery_epsilon=0.1, discovery_delta=1e-6)
    with pytest.raises(ValueError, match="both an epsilon and a delta"):
        claim_mechanisms("mst", 1.0, 1e-6, discovery_epsilon=0.1)
