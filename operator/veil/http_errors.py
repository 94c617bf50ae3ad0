"""The reason in an HTTP error answer, for messages: Veil's services (and the SKR sidecar, the
node agent, the runtime) answer `{"error": "..."}`; anything else is shown as text, cut short."""

from __future__ import annotations

import json


def error_reason(body: bytes, limit: int = 300) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
        return str(parsed["error"])
    return body.decode("utf-8", errors="replace").strip()[:limit] or "no reason given"
