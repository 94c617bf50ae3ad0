"""Smoke test of the inference benchmark: `--quick` runs end to end and writes sane JSON."""

from __future__ import annotations

import json
import shutil
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
    "server_cpu_us_per_request",
    "minimal_server_cpu_us_per_request",
    "server_binary_rps",
    "minimal_server_binary_rps",
    "batch64_rps",
    "minimal_server_batch64_rps",
    "batch64_binary_rps",
    "inprocess_batch64_rps",
    "unseal_mb_s",
    "raw_aesgcm_mb_s",
    "unseal_vs_raw_ratio",
    "encrypted_rps",
    "encrypted_p50_ms",
    "encrypted_p99_ms",
    "encrypted_cpu_us_per_request",
    "encrypted_vs_plaintext_ratio",
    "hpke_per_request_rps",
    "hpke_per_request_cpu_us_per_request",
    "hpke_per_request_vs_plaintext_ratio",
)
RATIOS = {
    "server_vs_minimal_ratio": ("server_rps", "minimal_server_rps"),
    "server_vs_inprocess_ratio": ("server_rps", "inprocess_rps"),
    "server_binary_vs_minimal_ratio": ("server_binary_rps", "minimal_server_binary_rps"),
    "batch64_vs_minimal_ratio": ("batch64_rps", "minimal_server_batch64_rps"),
    "unseal_vs_raw_ratio": ("unseal_mb_s", "raw_aesgcm_mb_s"),
    "unseal_vs_dropped_ratio": ("unseal_mb_s", "raw_aesgcm_dropped_mb_s"),
    "encrypted_vs_plaintext_ratio": ("encrypted_rps", "server_rps"),
    "hpke_per_request_vs_plaintext_ratio": ("hpke_per_request_rps", "server_rps"),
}


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed (hack/setup.sh)")
@pytest.mark.timeout(120)
def test_quick_run_writes_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "inference.json"
    returned = inference.main(["--quick", "--output", str(output)])

    written = json.loads(output.read_text())
    assert written == returned == json.loads(capsys.readouterr().out)
    assert written["load_generator"] == "wrk"
    for key in KEYS:
        value = written[key]
        assert isinstance(value, int | float), key
        assert value > 0, key
    for ratio, (numerator, denominator) in RATIOS.items():
        expected = written[numerator] / written[denominator]
        assert written[ratio] == pytest.approx(expected, rel=1e-3, abs=1e-4), ratio
