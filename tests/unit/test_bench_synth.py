"""Smoke test of the synthesis benchmark: `--quick` runs end to end and writes sane JSON.

No timing thresholds: seconds (and samples per second) only have to be positive. The
private-domains entry states what discovery and the DP report cost (their ε, carved out of the
same total) and the TVD before and after.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench import synth

TOP_KEYS = (
    "dataset",
    "rows",
    "columns",
    "synth",
    "private_domains_and_report",
    "nonprivate_baseline",
    "nonprivate_mean_2way_tvd",
    "training",
)
SYNTH_KEYS = (
    "method",
    "epsilon",
    "seconds",
    "mean_2way_tvd",
    "direct_seconds",
    "direct_mean_2way_tvd",
)
TRAINING_KEYS = ("model", "epsilon", "accuracy", "nonprivate_accuracy")


@pytest.mark.timeout(300)  # two shared cores: the quick run takes 1.5-3 minutes
def test_quick_run_writes_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "synth.json"
    returned = synth.main(["--quick", "--output", str(output)])

    written = json.loads(output.read_text())
    assert written == returned == json.loads(capsys.readouterr().out)
    for key in TOP_KEYS:
        assert key in written, key
    assert "randhie" in written["dataset"]
    assert written["rows"] == 2000
    assert written["columns"] == len(synth.QUICK_COLUMNS)
    assert isinstance(written["nonprivate_baseline"], str)
    assert 0 <= written["nonprivate_mean_2way_tvd"] <= 1

    assert [(e["method"], e["epsilon"]) for e in written["synth"]] == [("mst", 1.0)]
    for entry in written["synth"]:
        for key in SYNTH_KEYS:
            assert key in entry, key
        assert entry["seconds"] > 0
        assert entry["direct_seconds"] > 0
        assert 0 <= entry["mean_2way_tvd"] <= 1
        assert 0 <= entry["direct_mean_2way_tvd"] <= 1
        # A working synthesizer beats one that draws every column uniformly.
        assert entry["mean_2way_tvd"] < written["uniform_mean_2way_tvd"]

    (private,) = written["private_domains_and_report"]
    assert (private["method"], private["epsilon"]) == ("mst", 1.0)
    assert 0 <= private["mean_2way_tvd_declared"] <= 1
    report = private["declared+report"]
    assert report["report_epsilon"] == pytest.approx(0.1)
    assert report["discovery_epsilon"] == 0
    assert report["synthesizer_epsilon"] == pytest.approx(0.9)
    assert 0 <= report["dp_report_mean_1way_tvd"] <= 1
    found = private["private_domains+report"]
    assert found["discovery_epsilon"] == pytest.approx(0.1)
    assert found["preprocessor_epsilon"] == pytest.approx(0.05)
    assert found["synthesizer_epsilon"] == pytest.approx(0.75)
    assert set(found["values_discovered"]) == {"lncoins", "idp"}
    assert found["mean_2way_tvd"] < written["uniform_mean_2way_tvd"]

    assert [(e["model"], e["epsilon"]) for e in written["training"]] == [
        ("logisticRegression", 1.0),
        ("mlp", 1.0),
    ]
    for entry in written["training"]:
        for key in TRAINING_KEYS:
            assert key in entry, key
        assert 0 <= entry["accuracy"] <= 1
        assert 0 <= entry["nonprivate_accuracy"] <= 1
    # DP-SGD: the MLP's row says its noise; the speed table compares private and not.
    assert written["training"][1]["noise_multiplier"] > 0
    speed = written["dpsgd_speed"]
    (shape,) = speed["shapes"].values()
    assert set(shape["samples_per_second"]) == {
        "veil_hooks",
        "veil_ghost",
        "veil_nonprivate",
        "opacus_hooks",
        "torch_nonprivate",
    }
    assert all(v > 0 for v in shape["samples_per_second"].values())
    assert shape["dpsgd_vs_nonprivate_ratio"] > 0
    assert shape["veil_vs_opacus_ratio"] > 0
    assert written["dpsgd_vs_nonprivate_ratio"] == speed["dpsgd_vs_nonprivate_ratio"]
