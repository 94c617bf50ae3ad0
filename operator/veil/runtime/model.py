"""An ONNX model held in memory by onnxruntime, with its signature in Open Inference terms."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy.typing as npt
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_errors

from veil.runtime.tensors import DYNAMIC, ORT_TO_V2, Signature, TensorSpec


class ModelLoadError(Exception):
    """The model bytes are not an ONNX model this runtime can serve."""


class InferenceError(Exception):
    """onnxruntime refused or failed the run; `client_error` when it blamed the inputs."""

    def __init__(self, message: str, *, client_error: bool) -> None:
        super().__init__(message)
        self.client_error = client_error


def _spec(arg: Any, role: str) -> TensorSpec:
    datatype = ORT_TO_V2.get(arg.type)
    if datatype is None:
        hint = " (export classifiers with zipmap disabled)" if "map" in str(arg.type) else ""
        raise ModelLoadError(f"{role} {arg.name!r} has type {arg.type}, not a tensor{hint}")
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else DYNAMIC for dim in arg.shape)
    return TensorSpec(name=arg.name, datatype=datatype, shape=shape)


@dataclass(frozen=True)
class OnnxModel:
    """A loaded model: a thread-safe onnxruntime session plus its v2 signature."""

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    session: ort.InferenceSession

    @classmethod
    def from_bytes(
        cls,
        name: str,
        model: bytes,
        *,
        version: str = "1",
        intra_op_threads: int = 0,
    ) -> OnnxModel:
        """Load from in-memory bytes (no file: the plaintext model never touches disk)."""
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                model, sess_options=options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own pybind exception types
            raise ModelLoadError(f"onnxruntime cannot load model {name!r}: {exc}") from exc
        inputs = tuple(_spec(arg, "input") for arg in session.get_inputs())
        outputs = tuple(_spec(arg, "output") for arg in session.get_outputs())
        return cls(name=name, version=version, inputs=inputs, outputs=outputs, session=session)

    @cached_property
    def signature(self) -> Signature:
        """The inputs and outputs, indexed for request validation."""
        return Signature(self.inputs, self.outputs)

    def metadata(self) -> dict[str, Any]:
        """The v2 model metadata response."""
        return {
            "name": self.name,
            "versions": [self.version],
            "platform": "onnx",
            "inputs": [spec.metadata() for spec in self.inputs],
            "outputs": [spec.metadata() for spec in self.outputs],
        }

    def run(
        self, inputs: dict[str, npt.NDArray[Any]], outputs: list[str]
    ) -> list[npt.NDArray[Any]]:
        """Run the session (thread-safe; inline on the event loop only when it is quick)."""
        try:
            results: list[npt.NDArray[Any]] = self.session.run(outputs, inputs)
        except ort_errors.InvalidArgument as exc:
            raise InferenceError(str(exc), client_error=True) from exc
        except Exception as exc:
            raise InferenceError(str(exc), client_error=False) from exc
        return results  # numpy arrays: every output is a tensor (checked at load)
