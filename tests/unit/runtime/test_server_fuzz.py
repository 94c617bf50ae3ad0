"""Property: whatever body and headers a client sends to the infer endpoints, the answer is never
a 5xx, refusals are JSON naming the problem, and the server's memory stays bounded."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.model import OnnxModel
from veil.runtime.server import ServeOptions, ServerLimits, build_app, runner_options
from veil.runtime.state import ModelSlot

from .threaded import serve_in_thread

MIB = 1024 * 1024
LIMITS = ServerLimits(max_body_bytes=64 * 1024, max_tensor_elements=4096, read_timeout=2)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=4)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=12,
)
shapes = st.lists(
    st.integers(min_value=-2, max_value=2**70) | st.sampled_from([1, 2, 4]), max_size=3
)
numbers = st.lists(st.floats(width=32) | st.integers(-3, 3) | st.booleans(), max_size=12)
tensor_parameters = st.fixed_dictionaries(
    {},
    optional={
        "binary_data_size": st.integers(min_value=-4, max_value=64) | json_values,
        "other": json_values,
    },
)
tensors = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["x", "y", ""]) | json_values,
        "datatype": st.sampled_from(["FP32", "FP64", "INT64", "BOOL", "BYTES", "BF16"])
        | json_values,
        "shape": shapes | json_values,
        "data": numbers | st.lists(numbers, max_size=3) | json_values,
        "parameters": tensor_parameters | json_values,
    },
)
outputs = st.lists(
    st.fixed_dictionaries(
        {"name": st.sampled_from(["y", "z"]) | json_values},
        optional={
            "parameters": st.fixed_dictionaries(
                {}, optional={"binary_data": json_values, "classification": json_values}
            )
            | json_values
        },
    ),
    max_size=3,
)
documents = st.fixed_dictionaries(
    {"inputs": st.lists(tensors, max_size=3) | json_values},
    optional={
        "id": json_values,
        "outputs": outputs | json_values,
        "parameters": st.fixed_dictionaries({}, optional={"binary_data_output": json_values})
        | json_values,
    },
)
# Printable ASCII without surrounding blanks: what a client can put in a header at all.
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8
).map(str.strip)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    path = draw(st.sampled_from(["/v2/models/mlp/infer", "/v2/models/mlp/versions/1/infer"]))
    document = json.dumps(draw(documents | json_values)).encode()
    tail = draw(st.binary(max_size=64))
    body = draw(st.sampled_from([document, document + tail, tail]))
    headers: dict[str, str] = {}
    if draw(st.booleans()):
        length = draw(st.sampled_from([len(document), 0, len(body) + 1]) | st.integers(-2, 300))
        headers["Inference-Header-Content-Length"] = draw(
            st.sampled_from([str(length)]) | header_text
        )
    if draw(st.integers(0, 5)) == 0:
        headers["Content-Encoding"] = draw(st.sampled_from(["gzip", "deflate", "br", "x"]))
    if draw(st.booleans()):
        headers["Content-Type"] = draw(
            st.sampled_from(["application/json", "application/octet-stream"]) | header_text
        )
    return path, body, headers


def _rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def client(mlp_model: bytes) -> Iterator[httpx.Client]:
    slot = ModelSlot("mlp")
    slot.set_ready(OnnxModel.from_bytes("mlp", mlp_model))
    app = build_app(slot, RuntimeMetrics(CollectorRegistry()), limits=LIMITS)
    with (
        serve_in_thread(app, **runner_options(ServeOptions(limits=LIMITS))) as url,
        httpx.Client(base_url=url, timeout=10) as http,
    ):
        yield http


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=requests())
def test_no_request_gets_a_5xx(
    client: httpx.Client, request: tuple[str, bytes, dict[str, str]]
) -> None:
    path, body, headers = request
    response = client.post(path, content=body, headers=headers)
    assert response.status_code < 500, (response.status_code, response.text, body, headers)
    if response.status_code >= 400 and response.headers.get("Content-Type", "").startswith(
        "application/json"
    ):
        error: Any = response.json()["error"]
        assert isinstance(error, str)
        assert error


def test_memory_stays_bounded_under_the_fuzz(client: httpx.Client) -> None:
    """A second, larger run in one process: resident memory does not keep growing."""
    before = _rss_bytes()

    @settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck))
    @given(request=requests())
    def hammer(request: tuple[str, bytes, dict[str, str]]) -> None:
        path, body, headers = request
        assert client.post(path, content=body, headers=headers).status_code < 500

    hammer()
    assert _rss_bytes() - before < 100 * MIB
