from __future__ import annotations

import math

import pytest
from dp_accounting import dp_event
from dp_accounting.pld.pld_privacy_accountant import PLDAccountant
from dp_accounting.rdp.rdp_privacy_accountant import RdpAccountant
from hypothesis import given, settings
from hypothesis import strategies as st

from veil.privacy.accounting import (
    UnsupportedMechanismError,
    check_fit,
    epsilon_spent,
    pld_epsilon,
    rdp_epsilon,
    zcdp_epsilon,
)
from veil.privacy.mechanisms import (
    DpSgdMechanism,
    EpsilonDeltaMechanism,
    GaussianMechanism,
    LaplaceMechanism,
    Mechanism,
    ZcdpMechanism,
)

DELTA = 1e-5
SGD = DpSgdMechanism(sampling_rate=0.01, noise_multiplier=2.0, steps=2000)


def test_dp_accounting_quirks_this_module_relies_on() -> None:
    # No (ε, δ) event exists in dp_accounting 0.6, PLD cannot compose zCDP, RDP can.
    assert not hasattr(dp_event, "EpsilonDeltaDpEvent")
    assert not PLDAccountant().supports(dp_event.ZCDpEvent(0.1))
    assert RdpAccountant().supports(dp_event.ZCDpEvent(0.1))
    assert not RdpAccountant().supports(EpsilonDeltaMechanism(epsilon=1).to_dp_event())


def test_matches_dp_accounting_for_native_compositions() -> None:
    mechanisms: list[Mechanism] = [
        SGD,
        GaussianMechanism(noise_multiplier=4.0, count=3),
        LaplaceMechanism(scale=20.0),
    ]
    event = dp_event.ComposedDpEvent([m.to_dp_event() for m in mechanisms])
    assert rdp_epsilon(mechanisms, DELTA) == pytest.approx(
        RdpAccountant().compose(event).get_epsilon(DELTA), rel=1e-9
    )
    assert pld_epsilon(mechanisms, DELTA) == pytest.approx(
        PLDAccountant().compose(event).get_epsilon(DELTA), rel=1e-6
    )
    assert epsilon_spent(mechanisms, DELTA, "pld") == min(
        rdp_epsilon(mechanisms, DELTA), pld_epsilon(mechanisms, DELTA)
    )


def test_epsilon_delta_mechanisms_compose_basically() -> None:
    basic = EpsilonDeltaMechanism(epsilon=0.5, delta=1e-6, count=3)
    alone = epsilon_spent([SGD], DELTA - 3e-6, "pld")
    assert epsilon_spent([SGD, basic], DELTA, "pld") == pytest.approx(alone + 1.5)
    assert epsilon_spent([basic], DELTA, "pld") == pytest.approx(1.5)
    # The Rényi filter: pure parts at the order ∞ are basic composition too, and the δ of
    # (ε, δ) mechanisms must fit in the filter's fixed share of the budget's δ.
    small = EpsilonDeltaMechanism(epsilon=0.5, delta=1e-7, count=3)
    assert epsilon_spent([small], DELTA, "rdp") == pytest.approx(1.5)
    assert epsilon_spent([basic], DELTA, "rdp") == math.inf
    # Its δ alone exceeds the budget's: nothing can be promised.
    assert epsilon_spent([EpsilonDeltaMechanism(epsilon=0.1, delta=1e-4)], DELTA, "pld") == math.inf


def test_zcdp_under_pld_falls_back_to_a_sound_conversion() -> None:
    rho = 0.05
    assert zcdp_epsilon(rho, DELTA) == pytest.approx(rho + 2 * math.sqrt(rho * math.log(1e5)))
    assert pld_epsilon([ZcdpMechanism(rho=rho)], DELTA) == zcdp_epsilon(rho, DELTA)
    # RDP handles zCDP natively and more tightly; a pld budget takes the better bound.
    mixed: list[Mechanism] = [SGD, ZcdpMechanism(rho=rho)]
    assert rdp_epsilon(mixed, DELTA) < pld_epsilon(mixed, DELTA)
    assert epsilon_spent(mixed, DELTA, "pld") == rdp_epsilon(mixed, DELTA)
    # The PLD path is still an upper bound on the PLD part plus the converted zCDP part.
    assert pld_epsilon(mixed, DELTA) >= pld_epsilon([SGD], DELTA)


class _UnknownMechanism(GaussianMechanism):
    def unit_event(self) -> dp_event.DpEvent:
        return dp_event.UnsupportedDpEvent()


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
def test_unsupported_events_raise_a_clear_error(accountant: str) -> None:
    with pytest.raises(UnsupportedMechanismError, match="cannot compose a gaussian"):
        epsilon_spent([_UnknownMechanism(noise_multiplier=1.0)], DELTA, accountant)  # type: ignore[arg-type]


def test_check_fit_uses_rdp_first() -> None:
    claims = [SGD] * 62
    fast = check_fit(claims, 10.0, DELTA, "pld")
    assert fast.fits
    assert fast.epsilon == rdp_epsilon(claims, DELTA)  # decided by RDP: PLD never ran
    tight = check_fit([SGD] * 70, 10.0, DELTA, "pld")
    assert tight.fits
    assert tight.epsilon == pld_epsilon([SGD] * 70, DELTA)
    assert not check_fit([SGD] * 70, 10.0, DELTA, "rdp").fits


# PLD-native claims as they come in practice: DP-SGD runs, Gaussian and Laplace queries.
native_mechanisms = st.one_of(
    st.tuples(
        st.sampled_from([0.001, 0.004, 0.01, 0.05]),
        st.sampled_from([0.8, 1.0, 1.5, 2.0, 4.0]),
        st.sampled_from([100, 1000, 5000]),
    ).map(lambda t: DpSgdMechanism(sampling_rate=t[0], noise_multiplier=t[1], steps=t[2])),
    st.tuples(st.sampled_from([1.0, 5.0, 50.0]), st.integers(1, 50)).map(
        lambda t: GaussianMechanism(noise_multiplier=t[0], count=t[1])
    ),
    st.tuples(st.sampled_from([1.0, 10.0, 100.0]), st.integers(1, 20)).map(
        lambda t: LaplaceMechanism(scale=t[0], count=t[1])
    ),
)


@pytest.mark.slow
@settings(max_examples=12, deadline=None)
@given(st.lists(native_mechanisms, min_size=1, max_size=3))
def test_rdp_fast_path_is_sound(mechanisms: list[Mechanism]) -> None:
    """Whenever RDP says a claim fits, PLD agrees: PLD's ε never exceeds RDP's."""
    assert pld_epsilon(mechanisms, DELTA) <= rdp_epsilon(mechanisms, DELTA)
