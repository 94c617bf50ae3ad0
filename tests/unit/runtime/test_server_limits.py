"""The inference server under malformed, slow and concurrent requests: 4xx naming the problem,
never 5xx; bodies that trickle are cut off; bodies in flight stay within their byte budget."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.model import OnnxModel
from veil.runtime.server import BODY_BUDGET, ServeOptions, ServerLimits, build_app, runner_options
from veil.runtime.state import ModelSlot

pytestmark = pytest.mark.anyio

INFER = "/v2/models/mlp/infer"


def _tensor(**fields: Any) -> dict[str, Any]:
    tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1.0, 2.0, 3.0, 4.0]}
    tensor.update(fields)
    return {"inputs": [tensor]}


@asynccontextmanager
async def _serving(
    mlp_model: bytes, limits: ServerLimits
) -> AsyncIterator[tuple[str, int, web.Application, RuntimeMetrics]]:
    """The server with `veil serve`'s runner settings (timeouts, lingering)."""
    slot = ModelSlot("mlp")
    slot.set_ready(OnnxModel.from_bytes("mlp", mlp_model))
    metrics = RuntimeMetrics(CollectorRegistry())
    app = build_app(slot, metrics, limits=limits)
    runner = web.AppRunner(app, **runner_options(ServeOptions(limits=limits)))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", port, app, metrics
    finally:
        await runner.cleanup()


def _outcomes(metrics: RuntimeMetrics) -> dict[str, int]:
    return {k: v for k, v in metrics.inference.for_model("mlp").outcomes.items() if v}


BINARY_WITHOUT_SECTION = {
    "inputs": [
        {"name": "x", "shape": [1, 4], "datatype": "FP32", "parameters": {"binary_data_size": 16}}
    ]
}
MALFORMED: list[tuple[str, bytes, dict[str, str], str]] = [
    ("huge dimension", json.dumps(_tensor(shape=[2**70, 4])).encode(), {}, "larger than the limit"),
    ("zero and huge", json.dumps(_tensor(shape=[0, 2**70])).encode(), {}, "larger than the limit"),
    ("float dimension", json.dumps(_tensor(shape=[1.0, 4])).encode(), {}, "non-negative integers"),
    ("bool dimension", json.dumps(_tensor(shape=[True, 4])).encode(), {}, "non-negative integers"),
    ("negative dimension", json.dumps(_tensor(shape=[-1, 4])).encode(), {}, "non-negative"),
    ("deep JSON", b"[" * 200_000 + b"]" * 200_000, {}, "nested too deeply"),
    ("deep data", json.dumps(_tensor(data=json.loads("[" * 500 + "]" * 500))).encode(), {}, "'x'"),
    ("strings", json.dumps(_tensor(data=["a", "b", "c", "d"])).encode(), {}, "non-numeric"),
    ("ragged", json.dumps(_tensor(shape=[2, 4], data=[[1, 2, 3, 4], [1]])).encode(), {}, "'x'"),
    ("id not a string", json.dumps({**_tensor(), "id": 7}).encode(), {}, "'id'"),
    ("parameters", json.dumps(_tensor(parameters=[1])).encode(), {}, "'parameters'"),
    (
        "output params",
        json.dumps({**_tensor(), "outputs": [{"name": "y", "parameters": 3}]}).encode(),
        {},
        "'parameters'",
    ),
    ("not UTF-8", b'{"inputs": "\xff"}', {}, "not valid JSON"),
    ("header length text", b"{}", {"Inference-Header-Content-Length": "abc"}, "non-negative"),
    ("header length -1", b"{}", {"Inference-Header-Content-Length": "-1"}, "non-negative"),
    ("header length long", b"{}", {"Inference-Header-Content-Length": "99"}, "only 2 bytes"),
    (
        "binary without section",
        json.dumps(BINARY_WITHOUT_SECTION).encode(),
        {},
        "no binary section",
    ),
]


@pytest.mark.parametrize(
    ("body", "headers", "expected"),
    [case[1:] for case in MALFORMED],
    ids=[case[0] for case in MALFORMED],
)
async def test_malformed_requests_are_a_400_naming_the_problem(
    mlp_model: bytes, body: bytes, headers: dict[str, str], expected: str
) -> None:
    limits = ServerLimits(max_body_bytes=2 * 1024 * 1024, max_tensor_elements=1000)
    async with _serving(mlp_model, limits) as (url, _, _, metrics), httpx.AsyncClient() as client:
        response = await client.post(url + INFER, content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]
    assert _outcomes(metrics) == {"bad_request": 1}


async def test_an_empty_batch_is_not_a_server_error(mlp_model: bytes) -> None:
    async with _serving(mlp_model, ServerLimits()) as (url, _, _, _), httpx.AsyncClient() as client:
        response = await client.post(url + INFER, json=_tensor(shape=[0, 4], data=[]))
    assert response.status_code < 500, response.text


async def test_a_corrupt_compressed_body_is_a_4xx(mlp_model: bytes) -> None:
    good = gzip.compress(json.dumps(_tensor()).encode())
    async with _serving(mlp_model, ServerLimits()) as (url, _, _, _), httpx.AsyncClient() as client:
        ok = await client.post(url + INFER, content=good, headers={"Content-Encoding": "gzip"})
        corrupt = await client.post(
            url + INFER, content=good[:-9] + b"garbage!!", headers={"Content-Encoding": "gzip"}
        )
    assert ok.status_code == 200, ok.text
    assert 400 <= corrupt.status_code < 500


async def _open_slow_body(port: int, length: int, sent: bytes) -> asyncio.StreamWriter:
    """A request whose headers promise `length` bytes of body but which sends only `sent`."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        f"POST {INFER} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n".encode()
        + sent
    )
    await writer.drain()
    return writer


async def test_a_trickling_body_is_cut_off_after_the_read_timeout(mlp_model: bytes) -> None:
    limits = ServerLimits(read_timeout=0.3)
    async with _serving(mlp_model, limits) as (_, port, _, metrics):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(
            f"POST {INFER} HTTP/1.1\r\nHost: test\r\nContent-Length: 100\r\n\r\n{{".encode()
        )
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        answered = time.monotonic() - started
        rest = await asyncio.wait_for(reader.read(), 10)  # the server closes the connection
        closed = time.monotonic() - started
        writer.close()
    assert status.startswith(b"HTTP/1.1 408"), status
    assert b"did not arrive within 0.3 s" in rest
    assert 0.25 < answered < 2
    assert closed < 4  # the read timeout, then at most the lingering time
    assert _outcomes(metrics) == {"timeout": 1}


async def test_bodies_in_flight_stay_within_the_budget(mlp_model: bytes) -> None:
    limits = ServerLimits(max_body_bytes=1000, max_body_bytes_in_flight=2000, read_timeout=10)
    async with _serving(mlp_model, limits) as (url, port, app, _), httpx.AsyncClient() as client:
        budget = app[BODY_BUDGET]
        slow = [await _open_slow_body(port, 1000, b"{" * 10) for _ in range(2)]
        for _ in range(200):
            if budget.used == 2000:
                break
            await asyncio.sleep(0.01)
        assert budget.used == 2000
        body = json.dumps(_tensor()).encode().ljust(1000)
        waiting = asyncio.create_task(client.post(url + INFER, content=body))
        await asyncio.sleep(0.3)
        assert not waiting.done()  # its body is not read while the budget is spent
        assert budget.used == 2000
        slow[0].write(b" " * 990)  # the first slow request completes (and is refused: bad JSON)
        await slow[0].drain()
        answer = await asyncio.wait_for(waiting, 5)
        for writer in slow:
            writer.close()
    assert answer.status_code == 200, answer.text
    assert budget.peak == 2000


async def test_a_request_that_cannot_get_budget_in_time_is_a_503(mlp_model: bytes) -> None:
    limits = ServerLimits(max_body_bytes=1000, read_timeout=0.2)
    async with _serving(mlp_model, limits) as (url, _, app, metrics), httpx.AsyncClient() as client:
        budget = app[BODY_BUDGET]
        assert budget.try_reserve(budget.capacity)  # as if other bodies were arriving
        busy = await client.post(url + INFER, json=_tensor())
        budget.release(budget.capacity)
        ok = await client.post(url + INFER, json=_tensor())
    assert busy.status_code == 503
    assert busy.headers["Retry-After"] == "1"
    assert "busy" in busy.json()["error"]
    assert ok.status_code == 200
    assert _outcomes(metrics) == {"busy": 1, "success": 1}


async def test_a_body_without_length_reserves_the_limit(mlp_model: bytes) -> None:
    limits = ServerLimits(max_body_bytes=1000, max_body_bytes_in_flight=1500, read_timeout=0.2)
    async with _serving(mlp_model, limits) as (url, _, app, _), httpx.AsyncClient() as client:
        budget = app[BODY_BUDGET]
        assert budget.try_reserve(600)

        async def chunked() -> AsyncIterator[bytes]:
            yield json.dumps(_tensor()).encode()

        # 600 + 1000 (the limit, as the length is unknown) > 1500: no room
        refused = await client.post(url + INFER, content=chunked())
        budget.release(600)
        accepted = await client.post(url + INFER, content=chunked())
    assert refused.status_code == 503
    assert accepted.status_code == 200, accepted.text


async def test_trickling_headers_are_cut_off_by_the_keepalive_timeout(mlp_model: bytes) -> None:
    slot = ModelSlot("mlp")
    slot.set_ready(OnnxModel.from_bytes("mlp", mlp_model))
    app = build_app(slot, RuntimeMetrics(CollectorRegistry()))
    runner = web.AppRunner(app, **runner_options(ServeOptions(keepalive_timeout=0.5)))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        started = time.monotonic()
        writer.write(f"POST {INFER} HTTP/1.1\r\nHost: test\r\n".encode())
        for _ in range(40):  # a header byte every 0.1 s: never a whole request
            if reader.at_eof():
                break
            writer.write(b"X")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(reader.read(1), 0.1)
        closed = time.monotonic() - started
        writer.close()
    finally:
        await runner.cleanup()
    assert reader.at_eof()
    assert closed < 2.5
