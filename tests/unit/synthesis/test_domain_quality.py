"""Column plans from declared domains, their encoding, and the DP report's figures."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import TypeAdapter

from veil.api.synthetic_dataset import Column
from veil.synthesis import domain, quality


def _frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "sex": ["f", "m", "f", None, "m", "x"],
            "age": [23, 35, 47, 51, 62, 70],
            "bmi": [18.5, 22.1, 30.0, 27.3, np.nan, 24.9],
            "visits": [0, 1, 2, 2, 5, 3],
        }
    )


def columns(*items: dict[str, Any]) -> list[Column]:
    return TypeAdapter(list[Column]).validate_python(list(items))


DECLARED = columns(
    {"name": "sex", "type": "categorical", "values": ["f", "m"], "nullable": True},
    {"name": "age", "type": "numeric", "lower": 0, "upper": 100},
    {"name": "bmi", "type": "numeric", "lower": 10, "upper": 50, "bins": 4, "nullable": True},
    {"name": "visits", "type": "categorical", "values": [0, 1, 2, 3]},
)


def test_the_plan_holds_only_declared_and_paid_for_values() -> None:
    plan = domain.build_plan(DECLARED, bins=8)
    by_name = {c.name: c for c in plan}
    # Not the values present: "x" and 5 are in the data, never in the domain.
    assert by_name["sex"].categories == ("f", "m")
    assert by_name["sex"].cardinality == 3  # nullable: one more code
    assert by_name["visits"].categories == (0, 1, 2, 3)
    assert (by_name["age"].kind, by_name["age"].bins, by_name["age"].source) == (
        "binned",
        8,
        "public",
    )
    assert by_name["bmi"].cardinality == 5
    # Discovered values and privately inferred bounds come in from the mechanisms' outputs.
    found = columns(
        {"name": "city", "type": "categorical", "values": ["Oslo"], "discover": True},
        {"name": "income", "type": "numeric"},
    )
    plan = domain.build_plan(
        found, discovered={"city": ["Bergen", "Oslo"]}, inferred={"income": (0.0, 1024.0)}
    )
    assert (plan[0].categories, plan[0].source) == (("Oslo", "Bergen"), "dp")
    assert (plan[1].lower, plan[1].upper, plan[1].source) == (0.0, 1024.0, "dp")
    with pytest.raises(domain.DomainError, match="no bounds"):
        domain.build_plan(found)


def test_undeclared_or_missing_columns_are_refused_by_the_header() -> None:
    with pytest.raises(domain.DomainError) as refused:
        domain.check_header(["sex", "age", "bmi", "visits", "email"], DECLARED)
    message = str(refused.value)
    assert "email" in message
    assert "spec.synthesizer.columns" in message
    with pytest.raises(domain.DomainError, match=r"visits .*not in the source"):
        domain.check_header(["sex", "age", "bmi"], DECLARED)
    domain.check_header(["sex", "age", "bmi", "visits"], DECLARED)


def test_out_of_domain_values_go_to_null_or_drop_their_row() -> None:
    plan = domain.build_plan(DECLARED)
    codes = domain.encode(_frame(), plan)
    # Row 4 (visits 5, not declared; visits is not nullable) is dropped. "x" and None in the
    # nullable sex column become its null code; the missing bmi its null code.
    assert len(codes) == 5
    sex, bmi = codes[:, 0].tolist(), codes[:, 2].tolist()
    assert sex == [0, 1, 0, 2, 2]
    assert bmi == [0, 1, 2, 1, 1]  # width 10: [10,20) [20,30) [30,40)…
    # Values outside the bounds are clipped into the edge bins; a missing value in a column
    # that is not nullable drops the row.
    outside = _frame().assign(age=[-5.0, 130.0, 20.0, None, 20.0, 20.0], visits=0)
    age = domain.encode(outside, plan)[:, 1].tolist()
    assert age[:2] == [0, 9]
    assert len(age) == 5


def test_each_record_is_filtered_on_its_own() -> None:
    # Adding one record changes the encoded rows by at most that record (a stable transform).
    plan = domain.build_plan(DECLARED)
    base = domain.encode(_frame(), plan)
    extra = pd.DataFrame([{"sex": "zz", "age": 40, "bmi": 99.0, "visits": 1}])
    grown = domain.encode(pd.concat([_frame(), extra], ignore_index=True), plan)
    assert len(grown) == len(base) + 1
    assert (grown[:-1] == base).all()


def test_values_match_by_key_and_decode_with_the_plans_types() -> None:
    assert domain.value_key(3) == domain.value_key(3.0) == domain.value_key("3") == "3"
    assert domain.value_key(np.int64(2)) == "2"
    assert domain.value_key(0.5) == "0.5"
    assert domain.value_key("007") == "7"  # as a CSV reader reads it
    assert domain.value_key("f") == "f"
    assert [domain.from_key(domain.value_key(v)) for v in ("2", "0.5", "f")] == [2, 0.5, "f"]
    plan = domain.build_plan(DECLARED)
    text_visits = _frame().assign(visits=["0", "1", "2", "2", "3", "3"])
    codes = domain.encode(text_visits, plan)
    assert codes[:, 3].tolist() == [0, 1, 2, 2, 3, 3][: len(codes)]
    decoded = domain.decode(codes, plan)
    assert decoded["visits"].dtype == np.int64  # from the declared values, not the data
    assert decoded["sex"].tolist()[3] is None
    assert math.isnan(decoded["bmi"][4])
    assert decoded["bmi"][0] == 15.0
    assert (domain.encode(decoded, plan) == codes).all()


def test_decoded_dtypes_never_follow_the_data() -> None:
    plan = domain.build_plan(DECLARED)
    ints = domain.encode(_frame(), plan)
    as_floats = domain.encode(_frame().assign(visits=[0.0, 1.0, 2.0, 2.0, 5.0, 3.0]), plan)
    assert (ints == as_floats).all()
    assert domain.decode(ints, plan).dtypes.equals(domain.decode(as_floats, plan).dtypes)


@pytest.mark.parametrize(
    ("text", "message"),
    [("bmi=1", "COLUMN=LOW:HIGH"), ("bmi=3:1", "greater"), ("=1:2", "COLUMN"), ("x=a:b", "LOW")],
)
def test_bounds_parsing(text: str, message: str) -> None:
    assert domain.parse_bounds(["a=b=1:2.5"]) == {"a=b": (1.0, 2.5)}
    with pytest.raises(domain.DomainError, match=message):
        domain.parse_bounds([text])


def test_dp_report_is_post_processing_of_noisy_marginals() -> None:
    plan = [
        domain.ColumnPlan("a", "categorical", (0, 1)),
        domain.ColumnPlan("b", "binned", (), 0.0, 1.0, 4),
    ]
    rng = np.random.default_rng(0)
    synthetic = np.stack([rng.integers(0, 2, 1000), rng.integers(0, 4, 1000)], axis=1)
    exact = [np.array([500.0, 500.0]), np.array([250.0, 250.0, 250.0, 250.0])]
    figures = quality.dp_report(plan, exact, synthetic, report_epsilon=0.1, noise_multiplier=2.0)
    assert figures["kind"] == "dpEstimate"
    assert figures["oneWayTvd"]["mean"] < 0.05
    assert set(figures["oneWayTvd"]["columns"]) == {"a", "b"}
    assert figures["sigma"] == pytest.approx(2.0 * math.sqrt(2))
    # Negative noisy counts are clipped; all-negative becomes uniform.
    skewed = [np.array([-3.0, 10.0]), np.array([-1.0, -1.0, -1.0, -1.0])]
    figures = quality.dp_report(plan, skewed, synthetic, report_epsilon=0.1, noise_multiplier=2.0)
    assert figures["oneWayTvd"]["worstColumn"] == "a"
    assert figures["oneWayTvd"]["columns"]["b"] < 0.05
    assert figures["uniformOneWayTvd"]["mean"] == pytest.approx(0.25, abs=1e-4)


def test_exact_figures_for_benchmarks() -> None:
    rng = np.random.default_rng(0)
    plan = [
        domain.ColumnPlan("a", "categorical", (0, 1)),
        domain.ColumnPlan("b", "binned", (), 0.0, 1.0, 4),
        domain.ColumnPlan("c", "categorical", ("x", "y", "z")),
    ]
    a = rng.integers(0, 2, 3000)
    source = np.stack([a, a * 3, rng.integers(0, 3, 3000)], axis=1)
    same = quality.marginal_figures(source, source.copy(), plan)
    assert same["oneWayTvd"]["mean"] == 0
    assert same["twoWayTvd"]["worst"] == 0
    broken = quality.marginal_figures(source, quality.uniform_codes(plan, 3000, rng), plan)
    assert broken["twoWayTvd"]["mean"] > 0.3
    assert broken["correlation"]["maxAbsDiff"] > 0.9


def test_tvd_of_huge_domains_is_computed_sparsely() -> None:
    rng = np.random.default_rng(5)
    a = rng.integers(0, 50, 4000)
    b = rng.integers(0, 60, 4000)
    dense = quality._tvd(a, b, 60)
    # The same codes spread over a domain too large to count densely.
    assert quality._tvd(a * 100_000, b * 100_000, 60 * 100_000) == pytest.approx(dense)
