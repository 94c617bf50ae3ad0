"""The served model's lifecycle: loading → ready (or failed) → draining on shutdown."""

from __future__ import annotations

from enum import StrEnum

from veil.runtime.model import OnnxModel


class ModelState(StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    DRAINING = "draining"


class ModelSlot:
    """Holds the one model a runtime serves; the server is ready only while a model is READY."""

    def __init__(self, name: str, version: str = "1") -> None:
        if not name or "/" in name:
            raise ValueError(f"model name {name!r} must be non-empty and contain no '/'")
        self.name = name
        self.version = version
        self.state = ModelState.LOADING
        self.failure: str | None = None
        self._model: OnnxModel | None = None

    @property
    def model(self) -> OnnxModel | None:
        """The model, only while READY."""
        return self._model if self.state is ModelState.READY else None

    def set_ready(self, model: OnnxModel) -> None:
        if self.state is ModelState.DRAINING:
            return
        self._model = model
        self.failure = None
        self.state = ModelState.READY

    def set_failed(self, reason: str) -> None:
        self._model = None
        self.failure = reason
        self.state = ModelState.FAILED

    def drain(self) -> None:
        """Stop reporting ready (shutdown has begun); in-flight requests still finish.

        A FAILED slot stays FAILED so that the reason survives into shutdown.
        """
        if self.state is not ModelState.FAILED:
            self.state = ModelState.DRAINING

    def release(self) -> None:
        """Drop the model (and with it the plaintext weights) once no request can use it."""
        self._model = None
