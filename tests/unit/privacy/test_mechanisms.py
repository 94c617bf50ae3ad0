from __future__ import annotations

import pytest
from dp_accounting import dp_event
from pydantic import ValidationError

from veil.privacy.mechanisms import (
    MECHANISM,
    DpSgdMechanism,
    EpsilonDeltaDpEvent,
    EpsilonDeltaMechanism,
    GaussianMechanism,
    LaplaceMechanism,
    ZcdpMechanism,
    merge,
    subtract,
    to_dp_event,
)

SGD = DpSgdMechanism(sampling_rate=0.01, noise_multiplier=2.0, steps=2000)


def test_wire_is_camel_case_and_round_trips() -> None:
    wire = SGD.to_wire()
    assert wire == {"type": "dpsgd", "samplingRate": 0.01, "noiseMultiplier": 2.0, "steps": 2000}
    assert MECHANISM.validate_python(wire) == SGD
    assert (
        MECHANISM.validate_python(
            {"type": "dpsgd", "sampling_rate": 0.01, "noise_multiplier": 2.0, "steps": 2000}
        )
        == SGD
    )


@pytest.mark.parametrize(
    "wire",
    [
        {"type": "gaussian", "noiseMultiplier": 0},
        {"type": "laplace", "scale": -1},
        {"type": "dpsgd", "samplingRate": 1.5, "noiseMultiplier": 1, "steps": 1},
        {"type": "zcdp", "rho": 0},
        {"type": "epsilonDelta", "epsilon": 1, "delta": 1},
        {"type": "exponential", "epsilon": 1},
        {"type": "gaussian", "noiseMultiplier": 1, "sigma": 1},
    ],
)
def test_invalid_mechanisms_are_rejected(wire: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        MECHANISM.validate_python(wire)


def test_dp_events() -> None:
    gaussian = GaussianMechanism(noise_multiplier=3.0, count=4).to_dp_event()
    assert gaussian == dp_event.SelfComposedDpEvent(dp_event.GaussianDpEvent(3.0), 4)
    assert LaplaceMechanism(scale=2.0).to_dp_event() == dp_event.LaplaceDpEvent(2.0)
    assert SGD.to_dp_event() == dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(0.01, dp_event.GaussianDpEvent(2.0)), 2000
    )
    assert ZcdpMechanism(rho=0.1).to_dp_event() == dp_event.ZCDpEvent(0.1)
    assert EpsilonDeltaMechanism(epsilon=1.0, delta=1e-6).to_dp_event() == EpsilonDeltaDpEvent(
        1.0, 1e-6
    )
    both = to_dp_event([SGD, ZcdpMechanism(rho=0.1)])
    assert isinstance(both, dp_event.ComposedDpEvent)
    assert len(both.events) == 2


def test_merge_groups_equal_units_and_subtract_refunds() -> None:
    query = GaussianMechanism(noise_multiplier=1.0)
    composition = merge([SGD, SGD], [query], [SGD])
    assert composition == merge([query, SGD.with_multiplicity(6000)])
    assert subtract(composition, [SGD]) == merge([SGD, SGD, query])
    assert subtract(composition, [query]) == (SGD.with_multiplicity(6000),)
    with pytest.raises(ValueError, match="not in the composition"):
        subtract(composition, [LaplaceMechanism(scale=1.0)])
