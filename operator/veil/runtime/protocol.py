"""Validation of Open Inference Protocol v2 infer requests against a model's signature.

Every refusal is a `RequestError` whose message names the input (or output) and the problem;
the server turns it into HTTP 400 `{"error": message}`. Inputs may carry their data as JSON
(`data`) or, with the binary tensor data extension, as `parameters.binary_data_size` bytes of
the binary section that follows the JSON header (in the order the inputs are listed); outputs
are returned as binary data when `parameters.binary_data` (per output) or
`parameters.binary_data_output` (for the whole request) is true.

This runs for every request, so the common path is one loop with plain checks; the helpers that
work out which message to give run only for requests that are refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from veil.runtime.tensors import (
    Signature,
    TensorError,
    TensorSpec,
    decode_binary_tensor,
    decode_tensor,
    describe_shape,
    read_past_64_bits,
)

_NONE: frozenset[str] = frozenset()


class RequestError(ValueError):
    """The request does not fit the protocol or the model's signature."""


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ costs a microsecond
class InferRequest:
    """A validated request: decoded inputs by name, the outputs to return in order, and which of
    those go back as binary data."""

    id: str | None
    inputs: dict[str, npt.NDArray[Any]]
    outputs: list[str]
    binary_outputs: frozenset[str] = frozenset()


def _parameters(holder: dict[str, Any], what: str) -> dict[str, Any]:
    parameters = holder.get("parameters")
    if parameters is None:
        return {}
    if not isinstance(parameters, dict):
        raise RequestError(f"{what}: 'parameters' must be a JSON object")
    return parameters


def _flag(parameters: dict[str, Any], key: str, what: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise RequestError(f"{what}: parameter {key!r} must be true or false")
    return value


def _shape_error(name: str, spec: TensorSpec, shape: Any) -> RequestError:
    if type(shape) is list and any(read_past_64_bits(d) for d in shape):
        return RequestError(f"input {name!r} has a 'shape' dimension larger than the limit")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        return RequestError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    return RequestError(
        f"input {name!r} has shape {describe_shape(shape)} but the model expects "
        f"{describe_shape(spec.shape)} (-1 means any size)"
    )


def _entry_error(entry: Any, signature: Signature) -> RequestError:
    """Why an entry of 'inputs' names no input of the model."""
    if not isinstance(entry, dict):
        return RequestError("each entry of 'inputs' must be a JSON object")
    name = entry.get("name")
    if not isinstance(name, str):
        return RequestError("an input has no 'name'")
    return RequestError(
        f"input {name!r} is not an input of this model (its inputs are: {signature.input_list})"
    )


class _BinarySection:
    """The bytes after the JSON header, handed out to inputs in order."""

    def __init__(self, data: memoryview | None) -> None:
        self.data = data
        self.offset = 0

    def take(self, name: str, size: Any) -> memoryview:
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise RequestError(
                f"input {name!r}: parameter 'binary_data_size' must be a non-negative integer"
            )
        if self.data is None:
            raise RequestError(
                f"input {name!r} declares binary data, but the request has no binary section "
                "(send the Inference-Header-Content-Length header with the JSON header's length)"
            )
        end = self.offset + size
        if end > len(self.data):
            left = len(self.data) - self.offset
            raise RequestError(
                f"input {name!r} declares {size} bytes of binary data but only {left} remain"
            )
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def check_consumed(self) -> None:
        if self.data is not None and self.offset != len(self.data):
            raise RequestError(
                f"the request carries {len(self.data)} bytes of binary data after its JSON "
                f"header but its inputs declare {self.offset}"
            )


_NO_BINARY = _BinarySection(None)  # shared: take() refuses before it changes anything


def _decode_with_parameters(
    name: str,
    entry: dict[str, Any],
    shape: list[int],
    max_elements: int,
    section: _BinarySection,
) -> npt.NDArray[Any]:
    """An input that has 'parameters' (binary data, or parameters to ignore) or lacks 'data'."""
    parameters = _parameters(entry, f"input {name!r}")
    datatype = entry["datatype"]
    if "binary_data_size" in parameters:
        if "data" in entry:
            raise RequestError(f"input {name!r} has both 'data' and binary data")
        raw = section.take(name, parameters["binary_data_size"])
        return decode_binary_tensor(name, datatype, shape, raw, max_elements=max_elements)
    if "data" not in entry:
        raise RequestError(f"input {name!r} has no 'data'")
    return decode_tensor(name, datatype, shape, entry["data"], max_elements=max_elements)


def _outputs(
    body: dict[str, Any], signature: Signature, binary_default: bool
) -> tuple[list[str], frozenset[str]]:
    requested = body.get("outputs")
    if requested is None:
        names = signature.output_names
        return names, frozenset(names) if binary_default else _NONE
    if not isinstance(requested, list) or not requested:
        raise RequestError("'outputs', when given, must be a non-empty JSON array")
    names = []
    binary: set[str] = set()
    for entry in requested:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise RequestError("each requested output must be an object with a 'name'")
        if name not in signature.output_names:
            raise RequestError(
                f"requested output {name!r} is not an output of this model "
                f"(its outputs are: {signature.output_list})"
            )
        if name in names:
            raise RequestError(f"output {name!r} is requested twice")
        parameters = _parameters(entry, f"output {name!r}")
        if parameters.get("classification"):
            raise RequestError(
                f"output {name!r}: the classification extension is not supported here"
            )
        if _flag(parameters, "binary_data", f"output {name!r}", binary_default):
            binary.add(name)
        names.append(name)
    return names, frozenset(binary)


def parse_infer_request(
    body: Any, signature: Signature, *, max_elements: int, binary: memoryview | None = None
) -> InferRequest:
    """Validate a decoded JSON body (the JSON header, with `binary` the bytes that followed it)
    and decode its tensors."""
    if type(body) is not dict:
        raise RequestError("the request body must be a JSON object")
    entries = body.get("inputs")
    if type(entries) is not list or not entries:
        raise RequestError("the request must carry a non-empty 'inputs' array")
    request_id = body.get("id")
    if request_id is not None and type(request_id) is not str:
        raise RequestError("'id', when given, must be a string")
    binary_default = "parameters" in body and _flag(
        _parameters(body, "the request"), "binary_data_output", "the request", False
    )
    section = _NO_BINARY if binary is None else _BinarySection(binary)
    by_name = signature.input_by_name
    decoded: dict[str, npt.NDArray[Any]] = {}
    try:
        for entry in entries:
            name = entry.get("name") if type(entry) is dict else None
            spec = by_name.get(name) if type(name) is str else None
            if spec is None:
                raise _entry_error(entry, signature)
            name = spec.name
            if name in decoded:
                raise RequestError(f"input {name!r} is given twice")
            datatype = entry.get("datatype")
            if datatype != spec.datatype:
                raise RequestError(
                    f"input {name!r} has datatype {datatype!r} but the model expects "
                    f"{spec.datatype}"
                )
            shape = entry.get("shape")
            if not spec.fits(shape):
                raise _shape_error(name, spec, shape)
            if "parameters" in entry or "data" not in entry:
                array = _decode_with_parameters(name, entry, shape, max_elements, section)
            else:
                array = decode_tensor(
                    name, datatype, shape, entry["data"], max_elements=max_elements
                )
            decoded[name] = array
    except TensorError as exc:
        raise RequestError(str(exc)) from exc
    section.check_consumed()
    if len(decoded) != len(by_name):
        missing = next(spec.name for spec in signature.inputs if spec.name not in decoded)
        raise RequestError(f"the model needs input {missing!r}, which the request lacks")
    names, binary_outputs = (
        (signature.output_names, _NONE)  # all outputs, as JSON: the common case, without a call
        if "outputs" not in body and not binary_default
        else _outputs(body, signature, binary_default)
    )
    return InferRequest(request_id, decoded, names, binary_outputs)
