"""Column plans, their encoding, and the quality figures, on small frames made here."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from veil.synthesis import domain, quality


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sex": ["f", "m", "f", None, "m", "f"],
            "age": [23, 35, 47, 51, 62, 70],
            "bmi": [18.5, 22.1, 30.0, 27.3, np.nan, 24.9],
            "visits": [0, 1, 2, 2, 5, 3],
        }
    )


def test_plan_rules() -> None:
    plan = domain.build_plan(_frame(), categorical=["visits"], bounds={"bmi": (10.0, 50.0)}, bins=8)
    by_name = {c.name: c for c in plan}
    assert by_name["sex"].kind == "categorical"  # not numeric
    assert by_name["sex"].categories == ("f", "m", None)
    assert by_name["visits"].categories == (0, 1, 2, 3, 5)  # declared
    assert by_name["age"].kind == "categorical"  # integer-valued, no bounds: pre-binned
    bmi = by_name["bmi"]
    assert (bmi.kind, bmi.bounds_source, bmi.lower, bmi.upper) == ("binned", "public", 10, 50)
    assert bmi.nullable
    assert bmi.cardinality == 9


def test_a_fractional_column_without_bounds_is_refused() -> None:
    with pytest.raises(domain.DomainError, match=r"bmi are continuous.*--bounds"):
        domain.build_plan(_frame())
    dp = domain.build_plan(_frame(), preprocessor_epsilon=0.1)
    assert {c.name: c.bounds_source for c in dp}["bmi"] == "dp"
    assert {c.name: c.bounds_source for c in dp}["age"] == "dp"
    data = domain.build_plan(_frame(), allow_non_private=True)
    bmi = {c.name: c for c in data}["bmi"]
    assert (bmi.bounds_source, bmi.lower, bmi.upper) == ("data", 18.5, 30.0)


@pytest.mark.parametrize(
    ("text", "message"),
    [("bmi=1", "COLUMN=LOW:HIGH"), ("bmi=3:1", "greater"), ("=1:2", "COLUMN"), ("x=a:b", "LOW")],
)
def test_bounds_parsing(text: str, message: str) -> None:
    assert domain.parse_bounds(["a=b=1:2.5"]) == {"a=b": (1.0, 2.5)}
    with pytest.raises(domain.DomainError, match=message):
        domain.parse_bounds([text])


def test_unknown_or_conflicting_columns_are_refused() -> None:
    with pytest.raises(domain.DomainError, match="no such column"):
        domain.build_plan(_frame(), categorical=["nope"], bounds={"bmi": (0, 1)})
    with pytest.raises(domain.DomainError, match="both categorical and bounded"):
        domain.build_plan(_frame(), categorical=["bmi"], bounds={"bmi": (0, 1)})


def test_encode_decode_round_trip() -> None:
    plan = domain.build_plan(_frame(), bounds={"bmi": (10.0, 50.0)}, bins=4)
    codes = domain.encode(_frame(), plan)
    bmi = [c.name for c in plan].index("bmi")
    assert codes[:, bmi].tolist() == [0, 1, 2, 1, 4, 1]  # width 10: [10,20) [20,30) [30,40)…
    decoded = domain.decode(codes, plan)
    assert math.isnan(decoded["bmi"][4])
    assert decoded["bmi"][0] == 15.0
    assert decoded["sex"].tolist() == ["f", "m", "f", None, "m", "f"]
    assert (domain.encode(decoded, plan) == codes).all()
    # Values outside the bounds are clipped into the edge bins.
    outside = _frame().assign(bmi=[-5.0, 99.0, 20.0, 20.0, 20.0, 20.0])
    assert domain.encode(outside, plan)[:2, bmi].tolist() == [0, 3]


def test_quality_figures() -> None:
    rng = np.random.default_rng(0)
    plan = [
        domain.ColumnPlan("a", "categorical", (0, 1)),
        domain.ColumnPlan("b", "binned", (), 0.0, 1.0, 4, "public"),
        domain.ColumnPlan("c", "categorical", ("x", "y", "z")),
    ]
    a = rng.integers(0, 2, 3000)
    source = np.stack([a, a * 3, rng.integers(0, 3, 3000)], axis=1)
    same = quality.quality_report(plan, source, source.copy(), seed=1)
    assert same["oneWayTvd"]["mean"] == 0
    assert same["twoWayTvd"]["worst"] == 0
    assert same["correlation"]["meanAbsDiff"] == 0
    assert same["dcr"] is None
    uniform = quality.uniform_codes(plan, 3000, rng)
    broken = quality.quality_report(plan, source, uniform, seed=1)
    assert broken["twoWayTvd"]["worstPair"] == ["a", "b"]  # the dependence it lost
    assert broken["twoWayTvd"]["mean"] > 0.3
    assert broken["correlation"]["maxAbsDiff"] > 0.9
    assert broken["uniformBaseline"]["twoWayTvdMean"] == pytest.approx(
        broken["twoWayTvd"]["mean"], abs=0.03
    )


def test_dcr_flags_a_copying_generator() -> None:
    rng = np.random.default_rng(3)
    plan = [
        domain.ColumnPlan("x", "binned", (), 0.0, 1.0, 50, "public"),
        domain.ColumnPlan("y", "binned", (), 0.0, 1.0, 50, "public"),
        domain.ColumnPlan("z", "categorical", tuple(range(20))),
    ]
    rows = np.stack(
        [rng.integers(0, 50, 1000), rng.integers(0, 50, 1000), rng.integers(0, 20, 1000)], 1
    )
    train, holdout = rows[:800], rows[800:]
    copied = quality.dcr(train, train, holdout, plan, rng=rng)
    assert copied["syntheticToTrain"]["exactMatchShare"] > 0.2
    assert copied["closerToTrainShare"] > 0.6
    fresh = quality.dcr(
        np.stack([rng.integers(0, 50, 500), rng.integers(0, 50, 500), rng.integers(0, 20, 500)], 1),
        train,
        holdout,
        plan,
        rng=rng,
    )
    assert 0.4 < fresh["closerToTrainShare"] < 0.6


def test_tvd_of_huge_domains_is_computed_sparsely() -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(0, 50, 4000)
    b = rng.integers(0, 60, 4000)
    dense = quality._tvd(a, b, 60)
    # The same codes spread over a domain too large to count densely.
    assert quality._tvd(a * 100_000, b * 100_000, 60 * 100_000) == pytest.approx(dense)
