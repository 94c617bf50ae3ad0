"""Privacy attacks on synthesis, as a privacy engineer would try them; each failed before the
fixes of issue 11.

- a unique value (an e-mail, an integer) of one person in 400 rows is never reproduced, with
  declared domains, and is never discovered by the DP discovery;
- two runs on D and D ∪ {x} with the same seed differ only in what was paid for;
- MST is handed a privately estimated total, never the row count;
- every number a run publishes (report, status) is public (from the spec) or paid for;
- a deleted Job never runs again on the same claim.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.unit.attacks.leaves import leaves
from veil.synthesis.commands import register
from veil.synthesis.privacy import BudgetSplit, claim_mechanisms

ROWS = 400
EMAIL = "jane.roe.1957@example.org"
UNIQUE = 4242


def people(rows: int = ROWS, seed: int = 0) -> pd.DataFrame:
    """Everyone has their own e-mail; one person has a code nobody else has."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "email": [f"person{i}@example.org" for i in range(rows)],
            "code": rng.integers(1, 6, rows),
            "sex": rng.choice(["f", "m"], rows),
            "age": rng.integers(18, 90, rows),
        }
    )
    frame.loc[7, ["email", "code"]] = [EMAIL, UNIQUE]
    return frame


def run(
    frame: pd.DataFrame, tmp_path: Path, columns: list[dict[str, Any]], *extra: str
) -> tuple[dict[str, Any], pd.DataFrame, str]:
    """`veil synthesize` (MST, ε 1) on the frame; the report, the output and stderr."""
    source, output = tmp_path / "source.csv", tmp_path / "synthetic.csv"
    frame.to_csv(source, index=False)
    parser = argparse.ArgumentParser(prog="veil")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        [
            *["synthesize", "--no-progress", "--source", str(source), "--output", str(output)],
            *["--method", "mst", "--epsilon", "1", "--rows", "2000", "--seed", "3"],
            *["--columns", json.dumps(columns), *extra],
        ]
    )
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = args.func(args)
    assert code == 0, err.getvalue()
    return json.loads(out.getvalue()), pd.read_csv(output, dtype=str), err.getvalue()


DECLARED = [
    {"name": "email", "type": "categorical", "values": ["info@example.org"], "nullable": True},
    {"name": "code", "type": "categorical", "values": [1, 2, 3, 4, 5]},
    {"name": "sex", "type": "categorical", "values": ["f", "m"]},
    {"name": "age", "type": "numeric", "lower": 0, "upper": 100},
]


def test_unique_values_are_never_reproduced_with_declared_domains(tmp_path: Path) -> None:
    _, synthetic, _ = run(people(), tmp_path, DECLARED)
    real_emails = set(people()["email"])
    assert not real_emails & set(synthetic["email"].dropna())
    assert str(UNIQUE) not in set(synthetic["code"])
    # A numeric column is binned: only bin midpoints come out, never a person's own value.
    assert set(synthetic["age"].astype(float)) <= {5.0 + 10 * i for i in range(10)}


def test_unique_values_are_never_discovered(tmp_path: Path) -> None:
    discovered = [
        {"name": "email", "type": "categorical", "discover": True, "nullable": True},
        {"name": "code", "type": "categorical", "discover": True, "nullable": True},
        {"name": "sex", "type": "categorical", "values": ["f", "m"]},
        {"name": "age", "type": "numeric", "lower": 0, "upper": 100},
    ]
    report, synthetic, _ = run(
        people(),
        tmp_path,
        discovered,
        *["--discovery-epsilon", "0.3", "--discovery-delta", "1e-7"],
    )
    assert set(synthetic["email"].dropna()) == set()  # every address is one person's
    assert str(UNIQUE) not in set(synthetic["code"])
    assert set(synthetic["code"].dropna()) <= {"1", "2", "3", "4", "5"}
    email = next(c for c in report["columns"] if c["name"] == "email")
    assert email["cardinality"] == 1  # the null code only: no address was discovered


def _unpaid(report: dict[str, Any]) -> dict[str, Any]:
    """The report without what was paid for (the DP estimate, the synthetic output's digest)."""
    kept = {k: v for k, v in report.items() if k != "quality"}
    kept["output"] = {k: v for k, v in report["output"].items() if k not in ("sha256", "bytes")}
    return kept


@pytest.mark.parametrize("report_epsilon", ["0", "0.1"])
def test_differencing_two_runs_reveals_nothing_unpaid(tmp_path: Path, report_epsilon: str) -> None:
    base = people(seed=1)
    x = pd.DataFrame([{"email": EMAIL, "code": 5, "sex": "f", "age": 99}])
    grown = pd.concat([base, x], ignore_index=True)
    first, _, first_log = run(base, tmp_path, DECLARED, "--report-epsilon", report_epsilon)
    second, _, second_log = run(grown, tmp_path, DECLARED, "--report-epsilon", report_epsilon)
    assert _unpaid(first) == _unpaid(second)
    assert first_log == second_log  # nothing sized by the data in the logs either
    assert "seconds" not in first
    if report_epsilon == "0":
        assert first["quality"] is None
    else:
        assert first["quality"]["kind"] == second["quality"]["kind"] == "dpEstimate"


@pytest.fixture
def totals(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The `known_total` each of mbi's estimations is handed, as the synthesizer runs."""
    from mbi import estimation

    seen: list[Any] = []
    real = estimation.mirror_descent

    def recording(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("known_total"))
        return real(*args, **kwargs)

    monkeypatch.setattr(estimation, "mirror_descent", recording)
    return seen


def test_mst_is_given_a_private_total_never_the_row_count(
    tmp_path: Path, totals: list[Any]
) -> None:
    frame = people()
    run(frame, tmp_path, DECLARED)
    kept = len(frame)  # every row is in the domain: email is nullable, the rest declared
    assert len(totals) == 2  # the selection's estimate and the final one
    for total in totals:
        assert total is not None
        assert total != float(kept)
        assert abs(total - kept) < 0.25 * kept  # an estimate of it, from noisy counts


def test_aim_estimates_its_total_from_noisy_measurements(tmp_path: Path, totals: list[Any]) -> None:
    report, _, _ = run(people(), tmp_path, DECLARED, "--method", "aim", "--rounds", "4")
    assert report["method"] == "aim"
    # No total given: mbi estimates it from the noisy measurements (post-processing).
    assert totals
    assert set(totals) == {None}


def _spec_facts(split: BudgetSplit, columns: list[dict[str, Any]], rows: int) -> dict[str, Any]:
    """Every report leaf that must equal a public fact, computed from the spec alone."""
    from snsynth.utils import cdp_rho

    facts: dict[str, Any] = {
        "method": "mst",
        "private": True,
        "epsilon": split.epsilon,
        "delta": split.delta,
        "budget.preprocessorEpsilon": split.preprocessor_epsilon,
        "budget.discoveryEpsilon": split.discovery_epsilon,
        "budget.discoveryDelta": split.discovery_delta,
        "budget.reportEpsilon": split.report_epsilon,
        "budget.synthesizerEpsilon": split.synthesizer_epsilon,
        "budget.synthesizerDelta": split.zcdp_delta,
        "rhoSpent": float(cdp_rho(split.synthesizer_epsilon, split.zcdp_delta)),
        "rows.synthetic": rows,
        "quality.reportEpsilon": split.report_epsilon,
        "quality.noiseMultiplier": split.report_noise_multiplier,
    }
    claim = claim_mechanisms(
        "mst",
        split.epsilon,
        split.delta,
        split.preprocessor_epsilon,
        discovery_epsilon=split.discovery_epsilon,
        discovery_delta=split.discovery_delta,
        report_epsilon=split.report_epsilon,
    )
    facts.update(leaves({"mechanisms": claim}))
    for i, column in enumerate(columns):
        at = f"columns[{i}]"
        facts[f"{at}.name"] = column["name"]
        facts[f"{at}.nullable"] = column.get("nullable", False)
        numeric = column["type"] == "numeric"
        facts[f"{at}.kind"] = "binned" if numeric else "categorical"
        paid = column.get("discover", False) or (numeric and "lower" not in column)
        facts[f"{at}.domain"] = "dp" if paid else "public"
        if numeric:
            facts[f"{at}.bins"] = column.get("bins", 10)
        if numeric and not paid:
            facts[f"{at}.bounds[0]"] = column["lower"]
            facts[f"{at}.bounds[1]"] = column["upper"]
        if not paid:
            size = column.get("bins", 10) if numeric else len(column["values"])
            facts[f"{at}.cardinality"] = size + int(column.get("nullable", False))
    return facts


# Leaves that come out of a paid mechanism (or are post-processing of its output), and
# leaves that are fixed text. Anything else must be a public fact of the spec.
PAID = (
    r"columns\[\d+\]\.cardinality",  # of a discovered column: the size of a DP key set
    r"columns\[\d+\]\.bounds\[[01]\]",  # of a column with private bounds
    r"output\.(sha256|bytes)",  # of the synthetic output
    r"quality\.sigma",
    r"quality\.oneWayTvd\..*",
    r"quality\.uniformOneWayTvd\.mean",
)
TEXT = (r"quality\.(kind|about)", r"notes\[\d+\]", r"versions\..*", r"output\.(uri|format)")


def test_every_number_in_the_report_is_public_or_paid(tmp_path: Path) -> None:
    columns = [
        {"name": "email", "type": "categorical", "discover": True, "nullable": True},
        {"name": "code", "type": "categorical", "values": [1, 2, 3, 4, 5]},
        {"name": "sex", "type": "categorical", "values": ["f", "m"]},
        {"name": "age", "type": "numeric"},
    ]
    flags = ["--preprocessor-epsilon", "0.1", "--discovery-epsilon", "0.1"]
    flags += ["--discovery-delta", "1e-7", "--report-epsilon", "0.1"]
    report, _, _ = run(people(), tmp_path, columns, *flags)
    facts = _spec_facts(BudgetSplit(1.0, 1e-6, 0.1, 0.1, 1e-7, 0.1), columns, 2000)
    unexplained = []
    for path, value in leaves(report):
        if path in facts:
            assert value == facts[path], path
        elif not any(re.fullmatch(p, path) for p in (*PAID, *TEXT)):
            unexplained.append(f"{path} = {value!r}")
    assert unexplained == []
    assert not any(path.startswith("rows.source") for path, _ in leaves(report))


def test_status_carries_only_public_facts_and_the_dp_estimate(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from veil.api.synthetic_dataset import SyntheticDatasetSpec
    from veil.controllers import synthetic_dataset as controller

    spec = SyntheticDatasetSpec.model_validate(
        {
            "source": {"uri": "file:///data/people.csv"},
            "synthesizer": {
                "method": "mst",
                "epsilon": 1,
                "rows": 2000,
                "reportEpsilon": 0.1,
                "columns": DECLARED,
            },
            "budgetRef": {"name": "people"},
            "output": {"uri": "file:///data/synthetic.csv"},
        }
    )
    # A report that (as before the fixes) also held exact, non-private figures.
    report = {
        "rows": {"source": 273, "synthetic": 2000},
        "quality": {"kind": "dpEstimate", "oneWayTvd": {"mean": 0.02}},
        "dcr": {"closerToTrainShare": 0.51},
        "seconds": {"fit": 12.5},
    }
    monkeypatch.setattr(controller, "read_bytes", lambda _: json.dumps(report).encode())
    result = controller._finished(spec, {"claimState": "Consumed", "jobName": "j"})
    assert result.status == {
        "claimState": "Consumed",
        "jobName": "j",
        "outputUri": "file:///data/synthetic.csv",
        "rows": 2000,  # the row count asked for
        "quality": report["quality"],
    }
    assert "273" not in result.outcome.message


def _owner(spec: Any, status: dict[str, Any]) -> dict[str, Any]:
    meta = {"name": "people-synthetic", "namespace": "team", "uid": "u-1", "generation": 1}
    return {
        "apiVersion": "veil.dev/v1alpha1",
        "kind": "SyntheticDataset",
        "metadata": meta,
        "spec": spec.to_wire(),
        "status": status,
    }


def test_a_deleted_job_is_never_run_again(monkeypatch: pytest.MonkeyPatch) -> None:
    from veil.api.synthetic_dataset import SyntheticDatasetSpec
    from veil.controllers import synthetic_dataset as controller
    from veil.kube import apply

    spec = SyntheticDatasetSpec.model_validate(
        {
            "source": {"uri": "file:///data/people.csv"},
            "synthesizer": {"method": "mst", "epsilon": 1, "rows": 10, "columns": DECLARED},
            "budgetRef": {"name": "people"},
            "output": {"uri": "file:///data/synthetic.csv"},
        }
    )
    reads: list[str] = []
    jobs: dict[str, dict[str, Any]] = {}

    def ensure(manifests: list[dict[str, Any]], *_: Any, **__: Any) -> None:
        job_manifest = manifests[-1]
        assert job_manifest["kind"] == "Job"
        jobs["live"] = job_manifest
        reads.append("Job suspended" if job_manifest["spec"]["suspend"] else "Job runs")

    monkeypatch.setattr(controller, "pay_before_reading", lambda *_: reads.append("claim"))
    monkeypatch.setattr(apply, "ensure", ensure)
    monkeypatch.setattr(
        apply, "patch_status", lambda *args, **__: reads.append(f"recorded {args[-1]}")
    )
    monkeypatch.setattr(apply, "get_object", lambda *_, **__: jobs.get("live"))

    def resume(*args: Any) -> bool:
        if "live" not in jobs:
            return False
        jobs["live"]["spec"].update(args[-1]["spec"])
        reads.append("Job runs")
        return True

    monkeypatch.setattr(apply, "patch_object", resume)
    job = "people-synthetic-synthesize"

    # The Job is gone: a finished dataset stays Ready, an unfinished one is JobLost.
    finished = {"claimState": "Consumed", "jobName": job, "outputUri": spec.output.uri}
    result = controller._converge(_owner(spec, finished), spec)
    assert (result.outcome.ready, result.outcome.reason) == ("True", "Synthesized")

    running = {"claimState": "Consumed", "jobName": job}
    result = controller._converge(_owner(spec, running), spec)
    assert (result.outcome.stalled, result.outcome.reason) == (True, "JobLost")
    assert "create a new SyntheticDataset" in result.outcome.message
    assert reads == [], "neither a new claim nor a new Job"

    # A dataset that never had a Job pays, creates it suspended (no pod can read yet),
    # records it, then lets it run: once recorded it is never created again.
    result = controller._converge(_owner(spec, {}), spec)
    recorded = "recorded " + str({"jobName": job, "claimState": "Consumed"})
    assert reads == ["claim", "Job suspended", recorded, "Job runs"]
    assert result.status["jobName"] == job

    # The operator stopped after the record, before the Job ran: the next pass resumes that
    # same Job, and pays and creates nothing.
    reads.clear()
    jobs["live"]["spec"]["suspend"] = True
    controller._converge(_owner(spec, running), spec)
    assert reads == ["Job runs"]
