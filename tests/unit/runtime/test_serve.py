"""`serve()` as `veil serve` runs it: the protocol on one port, metrics on their own, an access
line per request, a clean stop on SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket

import httpx
import pytest

from veil.runtime.access_log import LOGGER_NAME
from veil.runtime.model import OnnxModel
from veil.runtime.server import ServeOptions, run, serve
from veil.runtime.state import ModelSlot

pytestmark = pytest.mark.anyio


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_serve_splits_protocol_and_metrics_ports_and_logs_access(
    mlp_model: bytes, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    port, metrics_port = _free_port(), _free_port()

    async def loader() -> OnnxModel:
        return OnnxModel.from_bytes("mlp", mlp_model)

    options = ServeOptions(host="127.0.0.1", port=port, metrics_port=metrics_port)
    serving = asyncio.create_task(serve(ModelSlot("mlp"), loader, options))
    async with httpx.AsyncClient() as client:
        for _ in range(300):
            try:
                if (await client.get(f"http://127.0.0.1:{port}/v2/health/ready")).is_success:
                    break
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.02)
        body = {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]}
        answer = await client.post(f"http://127.0.0.1:{port}/v2/models/mlp/infer", json=body)
        on_protocol_port = await client.get(f"http://127.0.0.1:{port}/metrics")
        metrics = await client.get(f"http://127.0.0.1:{metrics_port}/metrics")
    os.kill(os.getpid(), signal.SIGTERM)  # serve() handles it: stop, drain, exit code 0
    assert await asyncio.wait_for(serving, 30) == 0
    assert answer.status_code == 200
    assert on_protocol_port.status_code == 404
    assert 'veil_inference_requests_total{model="mlp",outcome="success"} 1.0' in metrics.text
    access = [line for line in capsys.readouterr().err.splitlines() if LOGGER_NAME in line]
    assert any('"POST /v2/models/mlp/infer HTTP/1.1" 200' in line for line in access)
    assert any('"GET /metrics HTTP/1.1" 404' in line for line in access)
    assert not any('"GET /metrics HTTP/1.1" 200' in line for line in access)  # scrapes: no lines


def test_run_returns_the_exit_code() -> None:
    async def main() -> int:
        await asyncio.sleep(0)
        return 3

    assert run(main()) == 3
