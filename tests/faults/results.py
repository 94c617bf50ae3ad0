"""The fault tier's measurements, kept in bench/results/faults.json (one entry per scenario,
the latest run's), beside the benchmarks' results."""

from __future__ import annotations

import json
import platform
import time
from typing import Any

from tests.integration.conftest import REPO

RESULTS = REPO / "bench" / "results" / "faults.json"


def record(scenario: str, **measured: Any) -> None:
    """Keep `measured` as the scenario's latest result (other scenarios' entries stay)."""
    document: dict[str, Any] = {}
    if RESULTS.exists():
        document = json.loads(RESULTS.read_text())
    document.setdefault("scenarios", {})[scenario] = {
        **measured,
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n")
