"""Validation of Open Inference Protocol v2 infer requests against a model's signature.

Every refusal is a `RequestError` whose message names the input (or output) and the problem;
the server turns it into HTTP 400 `{"error": message}`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy.typing as npt

from veil.runtime.tensors import TensorError, TensorSpec, decode_tensor, describe_shape


class RequestError(ValueError):
    """The request does not fit the protocol or the model's signature."""


@dataclass(frozen=True)
class InferRequest:
    """A validated request: decoded inputs by name and the outputs to return, in order."""

    id: str | None
    inputs: dict[str, npt.NDArray[Any]]
    outputs: list[str]


def _names(specs: Sequence[TensorSpec]) -> str:
    return ", ".join(spec.name for spec in specs)


def _shape(name: str, spec: TensorSpec, shape: Any) -> list[int]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise RequestError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    if not spec.accepts_shape(shape):
        raise RequestError(
            f"input {name!r} has shape {describe_shape(shape)} but the model expects "
            f"{describe_shape(spec.shape)} (-1 means any size)"
        )
    return shape


def _input(
    entry: Any, specs: dict[str, TensorSpec], all_specs: Sequence[TensorSpec], max_elements: int
) -> tuple[str, npt.NDArray[Any]]:
    if not isinstance(entry, dict):
        raise RequestError("each entry of 'inputs' must be a JSON object")
    name = entry.get("name")
    if not isinstance(name, str):
        raise RequestError("an input has no 'name'")
    spec = specs.get(name)
    if spec is None:
        raise RequestError(
            f"input {name!r} is not an input of this model (its inputs are: {_names(all_specs)})"
        )
    datatype = entry.get("datatype")
    if datatype != spec.datatype:
        raise RequestError(
            f"input {name!r} has datatype {datatype!r} but the model expects {spec.datatype}"
        )
    shape = _shape(name, spec, entry.get("shape"))
    parameters = entry.get("parameters")
    if isinstance(parameters, dict) and "binary_data_size" in parameters:
        raise RequestError(f"input {name!r}: binary tensor data is not supported; send JSON data")
    if "data" not in entry:
        raise RequestError(f"input {name!r} has no 'data'")
    try:
        return name, decode_tensor(name, datatype, shape, entry["data"], max_elements=max_elements)
    except TensorError as exc:
        raise RequestError(str(exc)) from exc


def _outputs(body: dict[str, Any], outputs: Sequence[TensorSpec]) -> list[str]:
    requested = body.get("outputs")
    if requested is None:
        return [spec.name for spec in outputs]
    if not isinstance(requested, list) or not requested:
        raise RequestError("'outputs', when given, must be a non-empty JSON array")
    known = {spec.name for spec in outputs}
    names: list[str] = []
    for entry in requested:
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise RequestError("each requested output must be an object with a 'name'")
        if name not in known:
            raise RequestError(
                f"requested output {name!r} is not an output of this model "
                f"(its outputs are: {_names(outputs)})"
            )
        if name in names:
            raise RequestError(f"output {name!r} is requested twice")
        names.append(name)
    return names


def parse_infer_request(
    body: Any,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    *,
    max_elements: int,
) -> InferRequest:
    """Validate a decoded JSON body and decode its tensors."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    entries = body.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise RequestError("the request must carry a non-empty 'inputs' array")
    request_id = body.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError("'id', when given, must be a string")
    specs = {spec.name: spec for spec in inputs}
    decoded: dict[str, npt.NDArray[Any]] = {}
    for entry in entries:
        if isinstance(entry, dict) and entry.get("name") in decoded:
            raise RequestError(f"input {entry['name']!r} is given twice")
        name, array = _input(entry, specs, inputs, max_elements)
        decoded[name] = array
    missing = [spec.name for spec in inputs if spec.name not in decoded]
    if missing:
        raise RequestError(f"the model needs input {missing[0]!r}, which the request lacks")
    return InferRequest(id=request_id, inputs=decoded, outputs=_outputs(body, outputs))
