"""The binary tensor data extension over raw HTTP: every datatype both ways, JSON and binary
inputs mixed, per-output and whole-request binary outputs, and the refusals, which are the
same 400s as for JSON."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper
from prometheus_client import CollectorRegistry

from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.model import OnnxModel
from veil.runtime.server import build_app
from veil.runtime.state import ModelSlot
from veil.runtime.tensors import encode_binary_tensor

from .doubles import running

pytestmark = pytest.mark.anyio

HEADER = "Inference-Header-Content-Length"
# name -> (v2 datatype, ONNX type, numpy dtype)
TYPES = {
    "b": ("BOOL", TensorProto.BOOL, np.bool_),
    "h": ("FP16", TensorProto.FLOAT16, np.float16),
    "f": ("FP32", TensorProto.FLOAT, np.float32),
    "d": ("FP64", TensorProto.DOUBLE, np.float64),
    "i8": ("INT8", TensorProto.INT8, np.int8),
    "i64": ("INT64", TensorProto.INT64, np.int64),
    "u16": ("UINT16", TensorProto.UINT16, np.uint16),
    "u64": ("UINT64", TensorProto.UINT64, np.uint64),
}
VALUES: dict[str, npt.NDArray[Any]] = {
    "b": np.array([True, False, True], np.bool_),
    "h": np.array([0.5, -2.0, 65504.0], np.float16),
    "f": np.array([1.5, float("nan"), -0.0], np.float32),
    "d": np.array([1e300, -1e-300, 3.25], np.float64),
    "i8": np.array([-128, 0, 127], np.int8),
    "i64": np.array([-(2**63), 0, 2**63 - 1], np.int64),
    "u16": np.array([0, 1, 65535], np.uint16),
    "u64": np.array([0, 2**63, 2**64 - 1], np.uint64),
}


def _identity_model() -> bytes:
    """Every input comes back unchanged as `<name>_out` (shape [-1])."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [name], [f"{name}_out"]) for name in TYPES],
        "identity",
        [helper.make_tensor_value_info(name, t[1], ["n"]) for name, t in TYPES.items()],
        [helper.make_tensor_value_info(f"{name}_out", t[1], ["n"]) for name, t in TYPES.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


@pytest.fixture
async def identity() -> AsyncIterator[httpx.AsyncClient]:
    slot = ModelSlot("id")
    slot.set_ready(OnnxModel.from_bytes("id", _identity_model()))
    app = build_app(slot, RuntimeMetrics(CollectorRegistry()))
    async with running(app) as url, httpx.AsyncClient(base_url=url) as client:
        yield client


def _request(
    document: dict[str, Any], chunks: list[bytes], header_length: int | None = None
) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(document).encode()
    length = len(header) if header_length is None else header_length
    return header + b"".join(chunks), {HEADER: str(length)}


def _binary_input(name: str, array: npt.NDArray[Any]) -> tuple[dict[str, Any], bytes]:
    raw = array.astype(array.dtype.newbyteorder("<")).tobytes()
    entry = {"name": name, "datatype": TYPES[name][0], "shape": list(array.shape)}
    return {**entry, "parameters": {"binary_data_size": len(raw)}}, raw


def _json_input(name: str, array: npt.NDArray[Any]) -> dict[str, Any]:
    return {"name": name, "datatype": TYPES[name][0], "shape": [3], "data": array.tolist()}


def _split(response: httpx.Response) -> tuple[dict[str, Any], dict[str, npt.NDArray[Any]]]:
    """The JSON header and the binary outputs, decoded by their declared sizes."""
    length = int(response.headers[HEADER])
    header = json.loads(response.content[:length])
    offset, arrays = length, {}
    for output in header["outputs"]:
        size = output.get("parameters", {}).get("binary_data_size")
        if size is not None:
            name = output["name"].removesuffix("_out")
            chunk = response.content[offset : offset + size]
            arrays[output["name"]] = np.frombuffer(
                chunk, np.dtype(TYPES[name][2]).newbyteorder("<")
            )
            offset += size
    assert offset == len(response.content)
    return header, arrays


async def test_every_datatype_round_trips_in_binary(identity: httpx.AsyncClient) -> None:
    entries, chunks = zip(*(_binary_input(name, VALUES[name]) for name in TYPES), strict=True)
    body, headers = _request(
        {"inputs": list(entries), "parameters": {"binary_data_output": True}}, list(chunks)
    )
    response = await identity.post("/v2/models/id/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/octet-stream"
    header, arrays = _split(response)
    assert [o["datatype"] for o in header["outputs"]] == [t[0] for t in TYPES.values()]
    for name, expected in VALUES.items():
        np.testing.assert_array_equal(arrays[f"{name}_out"], expected)


async def test_json_and_binary_inputs_mix_and_outputs_choose(identity: httpx.AsyncClient) -> None:
    # Odd-length JSON before the binary section: the FP64 bytes land misaligned.
    binary_names = ["d", "u64", "h"]
    binary = [_binary_input(name, VALUES[name]) for name in binary_names]
    inputs = [e for e, _ in binary] + [
        _json_input(n, VALUES[n]) for n in TYPES if n not in binary_names
    ]
    outputs = [
        {"name": "d_out", "parameters": {"binary_data": True}},
        {"name": "i64_out"},
        {"name": "f_out", "parameters": {"binary_data": False}},
    ]
    document = {"id": "x" * 7, "inputs": inputs, "outputs": outputs}
    body, headers = _request(document, [raw for _, raw in binary])
    response = await identity.post("/v2/models/id/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    header, arrays = _split(response)
    assert header["id"] == "xxxxxxx"
    assert [o["name"] for o in header["outputs"]] == ["d_out", "i64_out", "f_out"]
    np.testing.assert_array_equal(arrays["d_out"], VALUES["d"])
    assert header["outputs"][1]["data"] == VALUES["i64"].tolist()
    assert header["outputs"][2]["data"][0] == 1.5
    assert set(arrays) == {"d_out"}


async def test_json_edges_keep_their_values(identity: httpx.AsyncClient) -> None:
    """What the fast JSON path does not read or write itself (NaN, infinities, a lone surrogate
    in the id, integers at both ends of 64 bits) comes back as it went in."""
    special = np.array([float("nan"), float("inf"), -float("inf")], np.float64)
    document = {
        "id": "caf\ud800",
        "inputs": [_json_input(name, VALUES[name]) for name in TYPES if name != "d"]
        + [_json_input("d", special)],
    }
    body = json.dumps(document).encode()  # writes NaN and Infinity, as Python clients do
    assert b"NaN" in body
    assert b"Infinity" in body
    response = await identity.post("/v2/models/id/infer", content=body)
    assert response.status_code == 200, response.text
    header = json.loads(response.content)
    assert header["id"] == "caf\ud800"
    data = {output["name"]: output["data"] for output in header["outputs"]}
    np.testing.assert_array_equal(np.array(data["d_out"]), special)
    assert data["i64_out"] == VALUES["i64"].tolist()
    assert data["u64_out"] == VALUES["u64"].tolist()


async def test_an_integer_beyond_64_bits_is_refused_for_an_integer_input(
    identity: httpx.AsyncClient,
) -> None:
    finite = {name: values for name, values in VALUES.items() if name not in ("f", "i64")}
    document = {
        "inputs": [_json_input(name, values) for name, values in finite.items()]
        + [{"name": "f", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0, 3.0]}]
        + [{"name": "i64", "datatype": "INT64", "shape": [3], "data": [2**70, 0, 1]}]
    }
    response = await identity.post("/v2/models/id/infer", content=json.dumps(document))
    assert response.status_code == 400, response.text
    assert "input 'i64' has values outside the INT64 range" in response.json()["error"]


async def test_binary_outputs_for_a_json_request(identity: httpx.AsyncClient) -> None:
    document = {
        "inputs": [_json_input(name, VALUES[name]) for name in TYPES if name != "f"]
        + [{"name": "f", "datatype": "FP32", "shape": [3], "data": [1.0, 2.0, 3.0]}],
        "outputs": [{"name": "u64_out", "parameters": {"binary_data": True}}],
    }
    response = await identity.post("/v2/models/id/infer", json=document)
    assert response.status_code == 200, response.text
    _, arrays = _split(response)
    np.testing.assert_array_equal(arrays["u64_out"], VALUES["u64"])


def _valid_document(overrides: dict[str, Any]) -> tuple[dict[str, Any], list[bytes]]:
    entries, chunks = [], []
    for name in TYPES:
        entry, raw = _binary_input(name, VALUES[name])
        entry.update(overrides.get(name, {}))
        entries.append(entry)
        chunks.append(raw)
    return {"inputs": entries}, chunks


@pytest.mark.parametrize(
    ("overrides", "extra", "expected"),
    [
        ({"b": {"parameters": {"binary_data_size": 3}}}, b"", "bytes other than 0, 1"),
        ({"f": {"parameters": {"binary_data_size": 8}}}, b"", "needs 12"),
        ({"u64": {"parameters": {"binary_data_size": 30}}}, b"", "only 24 remain"),
        ({"d": {"parameters": {"binary_data_size": -1}}}, b"", "non-negative integer"),
        ({"d": {"parameters": {"binary_data_size": True}}}, b"", "non-negative integer"),
        ({"d": {"data": [1.0, 2.0, 3.0]}}, b"", "both 'data' and binary data"),
        ({}, b"\x00" * 5, "but its inputs declare"),
        ({"h": {"shape": [2]}}, b"", "needs 4"),
    ],
    ids=["bool", "short", "overrun", "negative", "boolean size", "both", "leftover", "shape"],
)
async def test_binary_refusals_are_400s(
    identity: httpx.AsyncClient, overrides: dict[str, Any], extra: bytes, expected: str
) -> None:
    document, chunks = _valid_document(overrides)
    if "b" in overrides:
        chunks[0] = b"\x01\x02\x00"  # a byte that is no BOOL
    body, headers = _request(document, [*chunks, extra])
    response = await identity.post("/v2/models/id/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        ({"binary_data_output": "yes"}, "'binary_data_output' must be true or false"),
        ({"binary_data_output": 1}, "'binary_data_output' must be true or false"),
    ],
)
async def test_request_parameters_are_checked(
    identity: httpx.AsyncClient, parameters: dict[str, Any], expected: str
) -> None:
    document, chunks = _valid_document({})
    body, headers = _request({**document, "parameters": parameters}, chunks)
    response = await identity.post("/v2/models/id/infer", content=body, headers=headers)
    assert response.status_code == 400
    assert expected in response.json()["error"]


async def test_output_parameters_are_checked(identity: httpx.AsyncClient) -> None:
    document, chunks = _valid_document({})
    for output, expected in [
        ({"name": "f_out", "parameters": {"binary_data": "no"}}, "'binary_data' must be true"),
        ({"name": "f_out", "parameters": {"classification": 2}}, "classification extension"),
    ]:
        body, headers = _request({**document, "outputs": [output]}, chunks)
        response = await identity.post("/v2/models/id/infer", content=body, headers=headers)
        assert response.status_code == 400
        assert expected in response.json()["error"]


def test_bytes_outputs_are_length_prefixed() -> None:
    encoded = encode_binary_tensor(np.array(["ab", "", "é"], dtype=object))
    assert encoded == b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x02\x00\x00\x00\xc3\xa9"
    big_endian = np.array([1, 2], dtype=">i4")
    assert encode_binary_tensor(big_endian) == b"\x01\x00\x00\x00\x02\x00\x00\x00"
