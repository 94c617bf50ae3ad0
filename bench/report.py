"""What every benchmark does with its figures: print them, and keep them under bench/results/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def publish(result: dict[str, Any], output: Path | None) -> dict[str, Any]:
    """Print `result` as JSON; write it to `output` too unless that is None."""
    text = json.dumps(result, indent=2)
    print(text)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    return result
