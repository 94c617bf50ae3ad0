"""The server's parts on their own: the body budget, the inline-or-thread cost model, the batched
access log and the lock-free inference metrics."""

from __future__ import annotations

import asyncio
import io
import re

import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client import CollectorRegistry

from veil.runtime.access_log import AccessLog
from veil.runtime.admission import BodyBudget
from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.offload import CostModel

pytestmark = pytest.mark.anyio


async def test_budget_reserves_at_once_while_there_is_room() -> None:
    budget = BodyBudget(100)
    assert budget.try_reserve(60)
    assert budget.try_reserve(40)
    assert not budget.try_reserve(1)
    budget.release(60)
    assert budget.used == 40
    assert budget.peak == 100


async def test_budget_waiters_are_served_in_order_as_bytes_come_back() -> None:
    budget = BodyBudget(100)
    assert budget.try_reserve(100)
    first = asyncio.create_task(budget.reserve(70, timeout=5))
    second = asyncio.create_task(budget.reserve(30, timeout=5))
    await asyncio.sleep(0.01)
    assert not budget.try_reserve(1)  # nobody jumps the queue
    budget.release(50)  # 50 free: not enough for the first in line, so nobody yet
    await asyncio.sleep(0.01)
    assert not first.done()
    assert not second.done()
    budget.release(50)
    assert await first
    assert await second
    assert budget.used == 100
    assert budget.peak == 100


async def test_budget_wait_times_out_and_never_takes_more_than_capacity() -> None:
    budget = BodyBudget(100)
    assert budget.try_reserve(80)
    assert not await budget.reserve(30, timeout=0.05)
    assert not await budget.reserve(101, timeout=5)  # could never fit: refused at once
    assert budget.used == 80
    budget.release(80)
    assert await budget.reserve(100, timeout=0.05)


async def test_a_cancelled_waiter_gives_its_place_up() -> None:
    budget = BodyBudget(100)
    assert budget.try_reserve(100)
    blocked = asyncio.create_task(budget.reserve(90, timeout=5))
    behind = asyncio.create_task(budget.reserve(10, timeout=5))
    await asyncio.sleep(0.01)
    blocked.cancel()
    budget.release(20)
    assert await behind
    assert budget.used == 90


def test_cost_model_runs_inline_only_what_was_measured_fast() -> None:
    costs = CostModel(inline_seconds=0.001)
    assert not costs.inline(700)  # never seen: to a thread first
    for _ in range(6):
        costs.record(700, 0.00005)
    assert costs.inline(700)
    assert costs.inline(1000)  # same size class (bit length 10)
    assert not costs.inline(5000)
    costs.record(700, 3.0)  # one stall (preemption, GC) does not move the class
    assert costs.inline(700)
    for _ in range(10):
        costs.record(700, 0.004)  # the model really got slow
    assert not costs.inline(700)
    for _ in range(6):
        costs.record(2**21, 0.00001)
    assert not costs.inline(2**21)  # huge bodies never run inline


async def test_access_log_lines_are_batched_and_look_like_the_log() -> None:
    stream = io.StringIO()
    log = AccessLog(stream)
    request = make_mocked_request("POST", "/v2/models/m/infer?x=1")
    log.add(request, web.Response(status=200, body=b"12345"), 0.000412)
    log.add(request, web.Response(status=400, body=b"no"), 0.0015)
    assert stream.getvalue() == ""  # buffered
    await asyncio.sleep(0.4)  # written out by the timer
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    pattern = (
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO veil\.runtime\.access: "
        r'\S+ "POST /v2/models/m/infer\?x=1 HTTP/1\.1" (\d+) (\d+) ([\d.]+)ms'
    )
    parsed = [re.fullmatch(pattern, line) for line in lines]
    assert [m.groups() if m else None for m in parsed] == [
        ("200", "5", "0.412"),
        ("400", "2", "1.500"),
    ]
    log.add(request, web.Response(status=204), 0.0)
    log.flush()  # as at shutdown
    assert stream.getvalue().count("\n") == 3


def test_inference_metrics_export_as_prometheus_families() -> None:
    registry = CollectorRegistry()
    stats = RuntimeMetrics(registry).inference.for_model("m")
    stats.record("success", 0.0004)
    stats.record("success", 0.003)
    stats.record("bad_request", 20.0)

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"model": "m", **labels})

    assert sample("veil_inference_requests_total", outcome="success") == 2
    assert sample("veil_inference_requests_total", outcome="bad_request") == 1
    assert sample("veil_inference_requests_total", outcome="error") is None  # not touched
    buckets = "veil_inference_request_duration_seconds_bucket"
    assert sample(buckets, le="0.001") == 1
    assert sample(buckets, le="0.005") == 2
    assert sample(buckets, le="10.0") == 2
    assert sample(buckets, le="+Inf") == 3
    assert sample("veil_inference_request_duration_seconds_count") == 3
    assert sample("veil_inference_request_duration_seconds_sum") == pytest.approx(20.0034)
