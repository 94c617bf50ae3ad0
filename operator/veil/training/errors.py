"""How a training run ends badly; no message may carry a value or count read from the rows."""

from __future__ import annotations


class TrainingError(Exception):
    """The run failed; nothing was written."""


class TrainingRefusedError(TrainingError):
    """The request is not allowed as given (no bounds, bad parameters, a spec/header mismatch)."""
