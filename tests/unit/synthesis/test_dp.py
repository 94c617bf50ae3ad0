"""The run's own DP mechanisms: value discovery, private bounds, the report's noisy marginals."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from veil.synthesis import dp
from veil.synthesis.privacy import BudgetSplit


def test_the_threshold_lets_a_single_record_through_with_probability_delta() -> None:
    epsilon, delta = 0.5, 1e-6
    tau = dp.discovery_threshold(epsilon, delta)
    # P[1 + Lap(1/ε) > τ] = ½·exp(−(τ − 1)·ε)
    assert 0.5 * math.exp(-(tau - 1) * epsilon) == pytest.approx(delta)
    with pytest.raises(ValueError, match="epsilon > 0"):
        dp.discovery_threshold(0.0, delta)


def test_discovery_finds_common_values_and_never_a_unique_one() -> None:
    keys = ["a"] * 300 + ["b"] * 120 + ["rare"] + [f"u{i}@example.com" for i in range(200)]
    for _ in range(20):
        found = dp.discover_values(keys, 1.0, 1e-6, max_values=10)
        assert found == ["a", "b"]


def test_discovery_releases_a_capped_sorted_key_set() -> None:
    keys = [f"v{i:02d}" for i in range(30) for _ in range(100 + i)]
    found = dp.discover_values(keys, 1.0, 1e-6, max_values=5)
    assert len(found) == 5
    assert found == sorted(found)
    assert all(isinstance(k, str) for k in found)  # keys only: no counts, no ranks
    assert dp.discover_values([], 1.0, 1e-6, max_values=5) == []


def test_discovery_adds_noise_to_the_counts_it_thresholds() -> None:
    seen: list[list[float]] = []

    def recording(counts: np.ndarray) -> np.ndarray:
        seen.append(counts.tolist())
        return counts + 100.0  # everything passes: the threshold is applied to this

    assert dp.discover_values(["x", "y", "y"], 1.0, 1e-6, 10, noise=recording) == ["x", "y"]
    assert seen == [[1.0, 2.0]]


def test_private_bounds_cover_the_data(monkeypatch: pytest.MonkeyPatch) -> None:
    values = pd.Series(np.linspace(3.0, 90.0, 5000))
    lower, upper = dp.infer_bounds(values, 1.0)
    assert lower <= 3.0
    assert upper >= 64.0
    import snsql.sql._mechanisms.approx_bounds as library

    # Nothing above the noise threshold: said without a data value.
    monkeypatch.setattr(library, "approx_bounds", lambda values, epsilon: (None, None))
    with pytest.raises(dp.MechanismError, match="no range"):
        dp.infer_bounds(values, 0.01)


def test_noisy_marginals_cost_what_the_claim_says() -> None:
    split = BudgetSplit(1.0, 1e-6, report_epsilon=0.1)
    rng = np.random.default_rng(1)
    codes = np.stack([rng.integers(0, 3, 4000), rng.integers(0, 5, 4000)], axis=1)
    noisy, rho = dp.noisy_marginals(codes, [3, 5], split.report_noise_multiplier)
    assert [len(n) for n in noisy] == [3, 5]
    assert rho == pytest.approx(split.report_rho, rel=1e-9)
    assert rho <= split.report_rho * (1 + 1e-9)
    sigma = split.report_noise_multiplier * math.sqrt(2)
    exact = np.bincount(codes[:, 0], minlength=3)
    assert np.all(np.abs(noisy[0] - exact) < 8 * sigma)
