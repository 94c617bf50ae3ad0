"""Tensors of the Open Inference Protocol (KServe v2): datatypes, signatures, decoding, encoding.

Tensors travel as JSON arrays or, with the binary tensor data extension, as raw little-endian
bytes in row-major order (BYTES: each element a 4-byte little-endian length, then its bytes).
Decoding is strict: a value that does not fit the declared datatype (a float for INT64, a
number for BOOL, an integer out of range, a byte other than 0 or 1 for BOOL) is refused rather
than silently converted.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

# Open Inference Protocol datatype → numpy dtype.
V2_TO_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
}

# onnxruntime NodeArg.type → Open Inference Protocol datatype.
ORT_TO_V2: dict[str, str] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

# numpy dtype → Open Inference Protocol datatype, for the dtypes that map one to one (not BYTES).
NUMPY_TO_V2 = {dtype: name for name, dtype in V2_TO_NUMPY.items()}

# The binary extension's byte order, whatever the host's.
_WIRE_DTYPES = {name: dtype.newbyteorder("<") for name, dtype in V2_TO_NUMPY.items()}

DYNAMIC = -1


class TensorError(ValueError):
    """Tensor data does not match what was declared or expected."""


_INT = frozenset([int])


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, v2 datatype, shape with -1 for dynamic dims."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    # The fixed dimensions, as an itemgetter and what it must return (see `fits`).
    _fixed: Callable[[Sequence[int]], Any] | None = field(init=False, repr=False, compare=False)
    _fixed_values: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        fixed = [index for index, dim in enumerate(self.shape) if dim != DYNAMIC]
        getter = operator.itemgetter(*fixed) if fixed else None
        object.__setattr__(self, "_fixed", getter)
        object.__setattr__(self, "_fixed_values", getter(self.shape) if getter else None)

    def fits(self, shape: Any) -> bool:
        """Whether a request's `shape` is a list of non-negative integers (not booleans) that
        this spec accepts; in C-level calls, as it runs for every input of every request."""
        return (
            type(shape) is list
            and len(shape) == len(self.shape)
            and (not shape or ({*map(type, shape)} <= _INT and min(shape) >= 0))
            and (self._fixed is None or self._fixed(shape) == self._fixed_values)
        )

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def accepts_shape(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.shape) and all(
            want in (DYNAMIC, got) for want, got in zip(self.shape, shape, strict=True)
        )


class Signature:
    """A model's inputs and outputs, indexed once so that checking a request is lookups."""

    def __init__(self, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]) -> None:
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.input_by_name = {spec.name: spec for spec in self.inputs}
        self.output_names = [spec.name for spec in self.outputs]
        self.input_list = ", ".join(spec.name for spec in self.inputs)
        self.output_list = ", ".join(self.output_names)


def describe_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def numpy_to_v2(dtype: np.dtype[Any]) -> str:
    """The v2 datatype of a numpy dtype (object/str arrays are BYTES)."""
    if dtype.kind in "OUS":
        return "BYTES"
    try:
        return NUMPY_TO_V2[dtype]
    except KeyError:
        raise TensorError(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


def read_past_64_bits(value: Any) -> bool:
    """Whether `value` is a float the JSON parser (orjson) made of an integer beyond 64 bits."""
    return type(value) is float and abs(value) >= 2.0**63


def _exact_integers(name: str, datatype: str, data: list[Any]) -> npt.NDArray[Any]:
    """Integers numpy could only hold as float64 (int64 and uint64 ones mixed), kept exact."""
    target = V2_TO_NUMPY[datatype]
    values = np.asarray(data, dtype=object).ravel()
    info = np.iinfo(target)
    if not all(type(value) is int for value in values):
        if all(type(v) is int or read_past_64_bits(v) for v in values):
            raise TensorError(
                f"input {name!r} has values outside the {datatype} range {info.min}..{info.max}"
            )
        raise TensorError(f"input {name!r} is {datatype} but its data holds non-integer values")
    if min(values) < info.min or max(values) > info.max:
        raise TensorError(
            f"input {name!r} has values outside the {datatype} range {info.min}..{info.max}"
        )
    return values.astype(target)


def _convert(name: str, datatype: str, raw: npt.NDArray[Any], data: list[Any]) -> npt.NDArray[Any]:
    target = V2_TO_NUMPY[datatype]
    kind = raw.dtype.kind
    if raw.size == 0:
        return raw.astype(target)
    if target.kind == "b":
        if kind != "b":
            raise TensorError(f"input {name!r} is BOOL but its data holds non-boolean values")
        return raw
    if target.kind in "iu":
        if kind == "f":
            return _exact_integers(name, datatype, data)
        if kind not in "iu":
            raise TensorError(f"input {name!r} is {datatype} but its data holds non-integer values")
        info = np.iinfo(target)
        if int(raw.min()) < info.min or int(raw.max()) > info.max:
            raise TensorError(
                f"input {name!r} has values outside the {datatype} range {info.min}..{info.max}"
            )
        return raw.astype(target)
    if kind not in "iuf":
        raise TensorError(f"input {name!r} is {datatype} but its data holds non-numeric values")
    return raw.astype(target, copy=False)


def _element_count(name: str, datatype: str, shape: Sequence[int], max_elements: int) -> int:
    if datatype not in V2_TO_NUMPY:
        raise TensorError(f"input {name!r}: datatype {datatype!r} is not supported here")
    # A zero elsewhere keeps the product small, but numpy cannot hold such a dimension.
    if max(shape, default=0) > max_elements:
        raise TensorError(
            f"input {name!r} has shape {describe_shape(shape)}, a dimension larger than the "
            f"limit of {max_elements} elements"
        )
    count = math.prod(shape)
    if count > max_elements:
        raise TensorError(
            f"input {name!r} has {count} elements, more than the limit of {max_elements}"
        )
    return count


def decode_tensor(
    name: str, datatype: str, shape: Sequence[int], data: Any, *, max_elements: int
) -> npt.NDArray[Any]:
    """Turn v2 JSON tensor data (flat row-major, or nested to the declared shape) into numpy."""
    count = _element_count(name, datatype, shape, max_elements)
    if type(data) is not list:
        raise TensorError(f"input {name!r}: 'data' must be a JSON array")
    try:
        raw = np.asarray(data)
    except (ValueError, OverflowError) as exc:
        raise TensorError(
            f"input {name!r}: 'data' is not a flat or evenly nested array of values"
        ) from exc
    kind = raw.dtype.kind
    if kind == "O":
        raise TensorError(
            f"input {name!r}: 'data' holds values that are not numbers or booleans "
            "(or integers too large for 64 bits)"
        )
    if raw.size != count:
        raise TensorError(
            f"input {name!r} has {raw.size} values but shape {describe_shape(shape)} needs {count}"
        )
    if raw.ndim != 1 and raw.shape != tuple(shape):
        raise TensorError(
            f"input {name!r}: nested 'data' has shape {describe_shape(raw.shape)}, "
            f"not the declared {describe_shape(shape)}"
        )
    target = V2_TO_NUMPY[datatype]
    if target.kind == "f" and kind in "fiu":  # the common case, without _convert's call
        return raw.astype(target, copy=False).reshape(shape)
    return _convert(name, datatype, raw, data).reshape(shape)


def decode_binary_tensor(
    name: str, datatype: str, shape: Sequence[int], data: memoryview, *, max_elements: int
) -> npt.NDArray[Any]:
    """Turn the raw bytes of one input (binary tensor data extension) into numpy, without a copy
    unless the bytes are misaligned for the datatype."""
    count = _element_count(name, datatype, shape, max_elements)
    dtype = _WIRE_DTYPES[datatype]
    needed = count * dtype.itemsize
    if len(data) != needed:
        raise TensorError(
            f"input {name!r} has {len(data)} bytes of binary data but {datatype} shape "
            f"{describe_shape(shape)} needs {needed}"
        )
    array: npt.NDArray[Any] = np.frombuffer(data, dtype=dtype)
    if dtype.kind == "b" and count and int(array.view(np.uint8).max()) > 1:
        raise TensorError(f"input {name!r} is BOOL but its binary data holds bytes other than 0, 1")
    if not array.flags.aligned:
        array = array.copy()
    return array.reshape(tuple(shape))


def encode_tensor(name: str, array: npt.NDArray[Any]) -> dict[str, Any]:
    """A v2 JSON output tensor: flat row-major data."""
    return {
        "name": name,
        "datatype": numpy_to_v2(array.dtype),
        "shape": list(array.shape),
        "data": array.ravel().tolist(),
    }


def encode_binary_tensor(array: npt.NDArray[Any]) -> bytes:
    """An output tensor's raw bytes for the binary tensor data extension."""
    if array.dtype.kind in "OUS":
        parts: list[bytes] = []
        for item in array.ravel().tolist():
            raw = item if isinstance(item, bytes) else str(item).encode("utf-8")
            parts += (len(raw).to_bytes(4, "little"), raw)
        return b"".join(parts)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.tobytes()  # C order, whatever the array's layout
