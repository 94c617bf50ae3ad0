"""Tensors of the Open Inference Protocol (KServe v2): datatypes, signatures, JSON decoding.

Decoding is strict: a value that does not fit the declared datatype (a float for INT64, a
number for BOOL, an integer out of range) is refused rather than silently converted.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
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

_NUMPY_TO_V2 = {dtype: name for name, dtype in V2_TO_NUMPY.items()}

DYNAMIC = -1


class TensorError(ValueError):
    """Tensor data does not match what was declared or expected."""


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, v2 datatype, shape with -1 for dynamic dims."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def metadata(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}

    def accepts_shape(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.shape) and all(
            want in (DYNAMIC, got) for want, got in zip(self.shape, shape, strict=True)
        )


def describe_shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def numpy_to_v2(dtype: np.dtype[Any]) -> str:
    """The v2 datatype of a numpy dtype (object/str arrays are BYTES)."""
    if dtype.kind in "OUS":
        return "BYTES"
    try:
        return _NUMPY_TO_V2[dtype]
    except KeyError:
        raise TensorError(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


def _convert(name: str, datatype: str, raw: npt.NDArray[Any]) -> npt.NDArray[Any]:
    target = V2_TO_NUMPY[datatype]
    kind = raw.dtype.kind
    if raw.size == 0:
        return raw.astype(target)
    if target.kind == "b":
        if kind != "b":
            raise TensorError(f"input {name!r} is BOOL but its data holds non-boolean values")
        return raw
    if target.kind in "iu":
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
    return raw.astype(target)


def decode_tensor(
    name: str, datatype: str, shape: Sequence[int], data: Any, *, max_elements: int
) -> npt.NDArray[Any]:
    """Turn v2 JSON tensor data (flat row-major, or nested to the declared shape) into numpy."""
    if datatype not in V2_TO_NUMPY:
        raise TensorError(f"input {name!r}: datatype {datatype!r} is not supported here")
    count = math.prod(shape)
    if count > max_elements:
        raise TensorError(
            f"input {name!r} has {count} elements, more than the limit of {max_elements}"
        )
    if not isinstance(data, list):
        raise TensorError(f"input {name!r}: 'data' must be a JSON array")
    try:
        raw = np.asarray(data)
    except (ValueError, OverflowError) as exc:
        raise TensorError(
            f"input {name!r}: 'data' is not a flat or evenly nested array of values"
        ) from exc
    if raw.dtype.kind == "O":
        raise TensorError(
            f"input {name!r}: 'data' holds values that are not numbers or booleans "
            "(or integers too large for 64 bits)"
        )
    if raw.size != count:
        raise TensorError(
            f"input {name!r} has {raw.size} values but shape {describe_shape(shape)} needs {count}"
        )
    if raw.ndim != 1 and tuple(raw.shape) != tuple(shape):
        raise TensorError(
            f"input {name!r}: nested 'data' has shape {describe_shape(raw.shape)}, "
            f"not the declared {describe_shape(shape)}"
        )
    return _convert(name, datatype, raw).reshape(tuple(shape))


def encode_tensor(name: str, array: npt.NDArray[Any]) -> dict[str, Any]:
    """A v2 JSON output tensor: flat row-major data."""
    return {
        "name": name,
        "datatype": numpy_to_v2(array.dtype),
        "shape": list(array.shape),
        "data": array.ravel().tolist(),
    }
