"""Smoke test of the inference benchmark: `--quick` runs end to end and writes sane JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from bench import inference

KEYS = (
    "server_rps",
    "minimal_server_rps",
    "inprocess_rps",
    "server_p50_ms",
    "server_p99_ms",
    "server_vs_minimal_ratio",
    "unseal_mb_s",
    "raw_aesgcm_mb_s",
    "unseal_vs_raw_ratio",
)
RATIOS = {
    "server_vs_minimal_ratio": ("server_rps", "minimal_server_rps"),
    "server_vs_inprocess_ratio": ("server_rps", "inprocess_rps"),
    "unseal_vs_raw_ratio": ("unseal_mb_s", "raw_aesgcm_mb_s"),
    "unseal_vs_dropped_ratio": ("unseal_mb_s", "raw_aesgcm_dropped_mb_s"),
}


@pytest.mark.timeout(120)
def test_quick_run_writes_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "inference.json"
    returned = inference.main(["--quick", "--output", str(output)])

    written = json.loads(output.read_text())
    assert written == returned == json.loads(capsys.readouterr().out)
    for key in KEYS:
        value = written[key]
        assert isinstance(value, int | float), key
        assert value > 0, key
    for ratio, (numerator, denominator) in RATIOS.items():
        expected = written[numerator] / written[denominator]
        assert written[ratio] == pytest.approx(expected, rel=1e-3, abs=1e-4), ratio
