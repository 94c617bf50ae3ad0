"""`veil synthesize` end to end at ε = 1 on real data: MST on the RAND Health Insurance
Experiment, AIM on breast-cancer columns with privately inferred bounds and discovered
values, refusals before any row is read, and Blob I/O through Azurite.

A synthesizer passes only if its output beats, by a wide margin, a broken synthesizer that
samples uniformly over each column's domain. The exact figures are computed here, by the
test, on public data: the product itself publishes no exact figure.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from pydantic import TypeAdapter

from tests.unit.synthesis.conftest import RANDHIE_MST_COLUMNS, randhie_columns
from veil.api.synthetic_dataset import Column
from veil.synthesis import domain, quality, tables
from veil.synthesis.commands import register
from veil.synthesis.privacy import BudgetSplit, zcdp_rho


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, Any, str]:
    parser = argparse.ArgumentParser(prog="veil")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["synthesize", "--no-progress", *argv])
    code = args.func(args)
    out, err = capsys.readouterr()
    return code, json.loads(out) if code == 0 else None, err


def exact_figures(source: pd.DataFrame, synthetic: pd.DataFrame, wire: list[Any]) -> Any:
    """Exact TVDs of the output and of a uniform synthesizer (test-side, public data)."""
    plan = domain.build_plan(TypeAdapter(list[Column]).validate_python(wire))
    real = domain.encode(source, plan)
    rng = np.random.default_rng(11)
    return (
        quality.marginal_figures(real, domain.encode(synthetic, plan), plan),
        quality.marginal_figures(real, quality.uniform_codes(plan, len(real), rng), plan),
    )


def test_mst_at_epsilon_1_beats_a_uniform_synthesizer(
    randhie_csv: Path,
    randhie_frame: pd.DataFrame,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import snsynth.utils

    spent: list[float] = []
    real_cdp_rho = snsynth.utils.cdp_rho

    def recording_cdp_rho(epsilon: float, delta: float) -> float:
        rho = float(real_cdp_rho(epsilon, delta))
        spent.append(rho)
        return rho

    monkeypatch.setattr(snsynth.utils, "cdp_rho", recording_cdp_rho)
    output = tmp_path / "out" / "synthetic.csv"
    report_file = tmp_path / "report.json"
    wire = randhie_columns(RANDHIE_MST_COLUMNS)
    code, report, err = run(
        [
            *["--source", str(randhie_csv), "--output", str(output)],
            *["--columns", json.dumps(wire), "--report-epsilon", "0.1"],
            *["--method", "mst", "--epsilon", "1", "--delta", "1e-6", "--rows", "5000"],
            *["--seed", "5", "--report", str(report_file)],
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads(report_file.read_text()) == report

    # What was claimed bounds what MST spent: the synthesizer at ε 0.9, the report the rest.
    split = BudgetSplit(1.0, 1e-6, report_epsilon=0.1)
    assert report["mechanisms"] == [
        {"type": "zcdp", "rho": zcdp_rho(0.9, 1e-6), "count": 1},
        {"type": "gaussian", "noiseMultiplier": split.report_noise_multiplier, "count": 1},
    ]
    assert spent
    assert max(spent) <= report["mechanisms"][0]["rho"]
    assert report["rows"] == {"synthetic": 5000}
    assert "seconds" not in report

    source = randhie_frame[RANDHIE_MST_COLUMNS]
    synthetic = pd.read_csv(output)
    assert list(synthetic.columns) == RANDHIE_MST_COLUMNS
    assert len(synthetic) == 5000
    assert set(synthetic["lncoins"]) <= set(source["lncoins"])

    got, uniform = exact_figures(source, synthetic, wire)
    print("mst", json.dumps(got), "uniform", json.dumps(uniform))
    assert got["oneWayTvd"]["mean"] < 0.1 * uniform["oneWayTvd"]["mean"]
    assert got["twoWayTvd"]["mean"] < 0.2 * uniform["twoWayTvd"]["mean"]
    assert got["twoWayTvd"]["worst"] < 0.5 * uniform["twoWayTvd"]["mean"]
    # The DP estimate says the same, within its noise.
    estimate = report["quality"]
    assert estimate["kind"] == "dpEstimate"
    assert estimate["oneWayTvd"]["mean"] < 0.3 * estimate["uniformOneWayTvd"]["mean"]
    assert estimate["oneWayTvd"]["mean"] == pytest.approx(got["oneWayTvd"]["mean"], abs=0.05)


def test_aim_with_private_bounds_and_discovered_values(
    breast_cancer_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frame = pd.read_csv(breast_cancer_csv)[["mean_radius", "worst_concave_points", "target"]]
    frame["size"] = np.where(frame["mean_radius"] > 15, "large", "small")
    frame.loc[0, "size"] = "one-of-a-kind"  # one person's value: never discovered
    source = tmp_path / "narrow.csv"
    frame.to_csv(source, index=False)
    wire = [
        {"name": "mean_radius", "type": "numeric"},
        {"name": "worst_concave_points", "type": "numeric", "lower": 0, "upper": 0.3},
        {"name": "target", "type": "categorical", "values": [0, 1]},
        {"name": "size", "type": "categorical", "discover": True, "maxValues": 10},
    ]
    columns_file = tmp_path / "columns.yaml"
    columns_file.write_text(json.dumps({"columns": wire}))
    code, report, err = run(
        [
            *["--source", str(source), "--output", str(tmp_path / "synthetic.parquet")],
            *["--method", "aim", "--epsilon", "1", "--preprocessor-epsilon", "0.2"],
            *["--discovery-epsilon", "0.2", "--discovery-delta", "1e-7"],
            *["--rows", "1000", "--columns", str(columns_file), "--bins", "8", "--seed", "2"],
            *["--rounds", "6", "--max-model-size", "1"],
        ],
        capsys,
    )
    assert code == 0, err
    assert report["method"] == "aim"
    described = {c["name"]: c for c in report["columns"]}
    assert described["mean_radius"]["domain"] == "dp"
    assert described["size"]["domain"] == "dp"
    assert described["target"]["domain"] == "public"
    assert report["mechanisms"] == [
        {"type": "zcdp", "rho": zcdp_rho(0.6, 1e-6 - 1e-7), "count": 1},
        {"type": "epsilonDelta", "epsilon": 0.2, "delta": 0.0, "count": 1},
        {"type": "epsilonDelta", "epsilon": 0.2, "delta": 1e-7, "count": 1},
    ]
    assert report["rhoSpent"] <= report["mechanisms"][0]["rho"]
    assert report["quality"] is None  # no report budget: public facts only
    assert report["output"]["format"] == "parquet"
    synthetic = pd.read_parquet(tmp_path / "synthetic.parquet")
    assert len(synthetic) == 1000
    assert set(synthetic["size"]) <= {"large", "small"}
    assert set(synthetic["target"]) <= {0, 1}


def test_an_undeclared_column_is_refused_before_any_row_is_read(
    randhie_csv: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def no_rows(*_: Any) -> Any:
        raise AssertionError("rows were read")

    monkeypatch.setattr(tables, "read_rows", no_rows)
    declared = randhie_columns(["mdvis", "lncoins", "idp"])
    code, _, err = run(
        [
            *["--source", str(randhie_csv), "--output", str(tmp_path / "s.csv")],
            *["--method", "mst", "--epsilon", "1", "--rows", "10"],
            *["--columns", json.dumps(declared)],
        ],
        capsys,
    )
    assert code == 2, err
    assert "disea, lpi are not declared" in err
    assert "spec.synthesizer.columns" in err
    assert not (tmp_path / "s.csv").exists()


def test_a_column_without_a_domain_is_refused_before_anything_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The source does not even exist: these are refused on the arguments alone.
    base = ["--source", str(tmp_path / "missing.csv"), "--output", str(tmp_path / "s.csv")]
    base += ["--method", "mst", "--epsilon", "1", "--rows", "10"]
    refusals = {
        '[{"name": "email", "type": "categorical"}]': "needs its public values",
        '[{"name": "bmi", "type": "numeric"}]': "preprocessorEpsilon must be above 0",
        '[{"name": "city", "type": "categorical", "discover": true}]': "discoveryEpsilon",
    }
    for columns, message in refusals.items():
        code, _, err = run([*base, "--columns", columns], capsys)
        assert code == 2
        assert message in err
    # AIM's first step alone would spend more than its budget with fewer rounds than columns.
    two = json.dumps(
        [
            {"name": "a", "type": "categorical", "values": ["x"]},
            {"name": "b", "type": "numeric", "lower": 0, "upper": 1},
        ]
    )
    code, _, err = run([*base, "--columns", two, "--method", "aim", "--rounds", "1"], capsys)
    assert code == 2
    assert "at least one round per column" in err


def test_non_private_generators_are_gone(
    randhie_csv: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["--source", str(randhie_csv), "--output", str(tmp_path / "m.csv"), "--rows", "10"]
    for extra in (["--method", "marginals"], ["--method", "mst", "--allow-non-private"]):
        with pytest.raises(SystemExit) as bad:
            run([*base, *extra], capsys)
        assert bad.value.code == 2
    assert not (tmp_path / "m.csv").exists()


def test_messages_never_quote_the_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    source = tmp_path / "s.csv"
    source.write_text('a,b\nsecret-value-1,1\n"secret-value-2,2\n')  # an unclosed quote
    args = ["--source", str(source), "--output", str(tmp_path / "o.csv"), "--rows", "5"]
    args += ["--method", "mst", "--epsilon", "1"]
    args += [
        "--columns",
        '[{"name": "a", "type": "categorical", "values": ["x"]},'
        '{"name": "b", "type": "numeric", "lower": 0, "upper": 3}]',
    ]
    code, _, err = run(args, capsys)
    assert code == 1
    assert "secret" not in err
    assert "row" not in err
    assert "not a readable csv table (ParserError)" in err

    source.write_text("a,b\nsecret-value-1,1\n")

    def leaky(*_: Any, **__: Any) -> Any:
        raise KeyError("secret-value-1")

    monkeypatch.setattr(domain, "encode", leaky)
    code, _, err = run(args, capsys)
    assert code == 1
    assert "secret" not in err
    assert "KeyError" in err


def test_settings_come_from_a_spec_file(tmp_path: Path) -> None:
    from veil.synthesis.commands import config_from_args

    spec = tmp_path / "synthetic.yaml"
    spec.write_text(
        """
apiVersion: veil.dev/v1alpha1
kind: SyntheticDataset
metadata: {name: claims}
spec:
  source: {uri: "az://acct/data/claims.parquet", format: parquet}
  synthesizer:
    method: aim
    epsilon: 2
    delta: 1.0e-7
    rows: 500
    preprocessorEpsilon: 0.5
    reportEpsilon: 0.25
    columns:
      - {name: plan, type: categorical, values: [gold, silver]}
      - {name: cost, type: numeric}
  budgetRef: {name: claims-budget}
  output: {uri: "az://acct/synthetic/claims.csv"}
"""
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["synthesize", "--spec", str(spec), "--rows", "900"])
    config = config_from_args(args)
    assert (config.method, config.epsilon, config.delta, config.rows) == ("aim", 2, 1e-7, 900)
    assert config.source_format == "parquet"
    assert (config.preprocessor_epsilon, config.report_epsilon) == (0.5, 0.25)
    assert [c.name for c in config.columns] == ["plan", "cost"]

    spec.write_text(
        spec.read_text().replace("  budgetRef:", "  allowNonPrivate: true\n  budgetRef:")
    )
    with pytest.raises(ValueError, match="allowNonPrivate"):
        config_from_args(args)


def test_the_jobs_arguments_round_trip(tmp_path: Path) -> None:
    import yaml

    from veil.api.synthetic_dataset import SyntheticDataset
    from veil.resources.synthetic_dataset import synthesize_args
    from veil.synthesis.commands import config_from_args

    example = Path(__file__).resolve().parents[3] / "examples" / "synthetic-data"
    resource = SyntheticDataset.model_validate(
        yaml.safe_load((example / "synthetic.yaml").read_text())
    )
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    config = config_from_args(parser.parse_args(synthesize_args(resource.spec)))
    synth = resource.spec.synthesizer
    assert list(config.columns) == synth.columns
    assert config.split() == BudgetSplit(
        synth.epsilon,
        synth.delta,
        synth.preprocessor_epsilon,
        synth.discovery_epsilon,
        synth.discovery_delta,
        synth.report_epsilon,
    )
    assert (config.bins, config.rows) == (synth.bins, synth.rows)


def test_blob_source_and_output_through_azurite(
    azurite: Any,
    randhie_frame: pd.DataFrame,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from azure.storage.blob import BlobServiceClient

    from veil.artifacts import put, read_bytes

    BlobServiceClient.from_connection_string(azurite.connection_string).create_container("veil")
    source = "az://devstoreaccount1/veil/sources/randhie.csv"
    output = "az://devstoreaccount1/veil/synthetic/randhie.csv"
    report_uri = "az://devstoreaccount1/veil/reports/randhie.json"
    # Three categorical columns: the Blob path is the point here, and a narrow fit is quick.
    names = ["lncoins", "idp", "hlthg"]
    frame = randhie_frame[names].head(3000)
    put(source, io.BytesIO(frame.to_csv(index=False).encode()))

    code, report, err = run(
        [
            *[
                "--source",
                source,
                "--output",
                output,
                "--columns",
                json.dumps(randhie_columns(names)),
            ],
            *["--method", "mst", "--epsilon", "1", "--rows", "2000", "--report", report_uri],
        ],
        capsys,
    )
    assert code == 0, err
    written = read_bytes(output)
    assert report["output"]["sha256"] == hashlib.sha256(written).hexdigest()
    synthetic = pd.read_csv(io.BytesIO(written))
    assert len(synthetic) == 2000
    assert list(synthetic.columns) == names
    assert json.loads(read_bytes(report_uri)) == report
    got, uniform = exact_figures(frame, synthetic, randhie_columns(names))
    assert got["twoWayTvd"]["mean"] < 0.2 * uniform["twoWayTvd"]["mean"]
