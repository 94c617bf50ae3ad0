"""The Open Inference Protocol v2 server over real HTTP (httpx) with real onnxruntime models."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.model import OnnxModel
from veil.runtime.server import ServerLimits, build_app, build_metrics_app
from veil.runtime.state import ModelSlot, ModelState

from .doubles import TrainedModel, running

pytestmark = pytest.mark.anyio

MLP_INPUT = [[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, -0.5, 3.0]]


@dataclass
class Served:
    url: str
    client: httpx.AsyncClient
    metrics: RuntimeMetrics
    slot: ModelSlot

    def count(self, outcome: str, model: str = "mlp") -> float:
        value = self.metrics.registry.get_sample_value(
            "veil_inference_requests_total", {"model": model, "outcome": outcome}
        )
        return value or 0.0


@pytest.fixture
async def mlp_server(mlp_model: bytes) -> AsyncIterator[Served]:
    slot = ModelSlot("mlp")
    slot.set_ready(OnnxModel.from_bytes("mlp", mlp_model))
    metrics = RuntimeMetrics(CollectorRegistry())
    limits = ServerLimits(max_body_bytes=64 * 1024, max_tensor_elements=1000)
    async with (
        running(build_app(slot, metrics, limits=limits)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        yield Served(url, client, metrics, slot)


def _infer_body(data: Any = MLP_INPUT, **overrides: Any) -> dict[str, Any]:
    tensor = {"name": "x", "shape": [2, 4], "datatype": "FP32", "data": data}
    tensor.update(overrides)
    return {"inputs": [tensor]}


async def _error(served: Served, body: Any, status: int = 400) -> str:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = await served.client.post("/v2/models/mlp/infer", content=content)
    assert response.status_code == status, response.text
    message = response.json()["error"]
    assert isinstance(message, str)
    return message


async def test_health_and_server_metadata(mlp_server: Served) -> None:
    client = mlp_server.client
    assert (await client.get("/v2/health/live")).json() == {"live": True}
    assert (await client.get("/v2/health/ready")).status_code == 200
    assert (await client.get("/v2/models/mlp/ready")).json() == {"name": "mlp", "ready": True}
    assert (await client.get("/v2")).json()["name"] == "veil"


async def test_model_metadata_describes_the_signature(mlp_server: Served) -> None:
    response = await mlp_server.client.get("/v2/models/mlp")
    assert response.json() == {
        "name": "mlp",
        "versions": ["1"],
        "platform": "onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 3]}],
    }
    assert (await mlp_server.client.get("/v2/models/mlp/versions/1")).status_code == 200


async def test_infer_matches_plain_onnxruntime(mlp_server: Served, mlp_model: bytes) -> None:
    response = await mlp_server.client.post(
        "/v2/models/mlp/infer", json={**_infer_body(np.ravel(MLP_INPUT).tolist()), "id": "r-1"}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected = ort.InferenceSession(mlp_model).run(None, {"x": np.array(MLP_INPUT, np.float32)})[0]
    assert body["model_name"] == "mlp"
    assert body["id"] == "r-1"
    [output] = body["outputs"]
    assert output["name"] == "y"
    assert output["datatype"] == "FP32"
    assert output["shape"] == [2, 3]
    np.testing.assert_array_equal(np.array(output["data"], np.float32).reshape(2, 3), expected)
    # nested data in the declared shape is accepted too and gives the same answer
    nested = await mlp_server.client.post("/v2/models/mlp/infer", json=_infer_body())
    assert nested.json()["outputs"][0]["data"] == output["data"]
    assert mlp_server.count("success") == 2


async def test_breast_cancer_classifier_over_http(breast_cancer_model: TrainedModel) -> None:
    slot = ModelSlot("cancer", version="3")
    slot.set_ready(OnnxModel.from_bytes("cancer", breast_cancer_model.onnx_bytes, version="3"))
    samples = breast_cancer_model.samples[:50]
    body = {
        "inputs": [
            {
                "name": "input",
                "shape": list(samples.shape),
                "datatype": "FP32",
                "data": samples.ravel().tolist(),
            }
        ],
        "outputs": [{"name": "label"}],
    }
    app = build_app(slot, RuntimeMetrics(CollectorRegistry()))
    async with running(app) as url, httpx.AsyncClient(base_url=url) as client:
        response = await client.post("/v2/models/cancer/versions/3/infer", json=body)
        wrong_version = await client.post("/v2/models/cancer/versions/2/infer", json=body)
    assert response.status_code == 200, response.text
    [label] = response.json()["outputs"]
    assert label["name"] == "label"
    assert label["datatype"] == "INT64"
    assert label["data"] == breast_cancer_model.sklearn_predictions[:50].tolist()
    assert wrong_version.status_code == 404


async def test_malformed_json_is_a_400(mlp_server: Served) -> None:
    assert "not valid JSON" in await _error(mlp_server, b'{"inputs": [')
    assert "not valid JSON" in await _error(mlp_server, b"\xff\xfe")
    assert "JSON object" in await _error(mlp_server, [1, 2])
    assert "non-empty 'inputs'" in await _error(mlp_server, {"inputs": []})
    assert mlp_server.count("bad_request") == 4


async def test_wrong_datatype_is_a_400(mlp_server: Served) -> None:
    message = await _error(mlp_server, _infer_body([[1, 2, 3, 4], [5, 6, 7, 8]], datatype="INT64"))
    assert message == "input 'x' has datatype 'INT64' but the model expects FP32"
    message = await _error(mlp_server, _infer_body([["a", "b", "c", "d"]] * 2))
    assert "input 'x'" in message
    assert "non-numeric" in message


async def test_wrong_shape_is_a_400(mlp_server: Served) -> None:
    message = await _error(mlp_server, _infer_body([[1.0] * 5] * 2, shape=[2, 5]))
    assert message.startswith("input 'x' has shape [2, 5] but the model expects [-1, 4]")
    message = await _error(mlp_server, _infer_body([1.0] * 8, shape=[8]))
    assert "shape [8]" in message
    # the dynamic batch dimension takes any size
    ok = await mlp_server.client.post(
        "/v2/models/mlp/infer", json=_infer_body([[0.0] * 4] * 5, shape=[5, 4])
    )
    assert ok.status_code == 200
    assert ok.json()["outputs"][0]["shape"] == [5, 3]


async def test_element_count_must_match_the_shape(mlp_server: Served) -> None:
    message = await _error(mlp_server, _infer_body([1.0] * 7))
    assert message == "input 'x' has 7 values but shape [2, 4] needs 8"
    message = await _error(mlp_server, _infer_body([[1.0, 2.0], [3.0]]))
    assert "input 'x'" in message


async def test_unknown_and_missing_inputs_are_a_400(mlp_server: Served) -> None:
    body = _infer_body(name="features")
    message = await _error(mlp_server, body)
    assert message == "input 'features' is not an input of this model (its inputs are: x)"
    body = {"inputs": [_infer_body()["inputs"][0]] * 2}
    assert "given twice" in await _error(mlp_server, body)
    body = {**_infer_body(), "outputs": [{"name": "logits"}]}
    assert "requested output 'logits' is not an output" in await _error(mlp_server, body)


async def test_tensor_size_limit_is_a_400(mlp_server: Served) -> None:
    body = _infer_body([0.0] * 1004, shape=[251, 4])
    message = await _error(mlp_server, body)
    assert message == "input 'x' has 1004 elements, more than the limit of 1000"


async def test_oversized_body_is_a_413(mlp_server: Served) -> None:
    huge = json.dumps(_infer_body([0.5] * 40_000, shape=[10_000, 4])).encode()
    assert len(huge) > 64 * 1024
    message = await _error(mlp_server, huge, status=413)
    assert "larger than the limit of 65536 bytes" in message
    assert mlp_server.count("too_large") == 1


async def test_unknown_model_is_a_404(mlp_server: Served) -> None:
    client = mlp_server.client
    for response in (
        await client.get("/v2/models/resnet"),
        await client.get("/v2/models/resnet/ready"),
        await client.post("/v2/models/resnet/infer", json=_infer_body()),
    ):
        assert response.status_code == 404
        assert "'resnet' is not served here" in response.json()["error"]
    wrong_method = await client.get("/v2/models/mlp/infer")
    assert wrong_method.status_code == 405
    assert "error" in wrong_method.json()


async def test_not_ready_until_the_loader_finishes(mlp_model: bytes) -> None:
    gate = asyncio.Event()

    async def loader() -> OnnxModel:
        await gate.wait()
        return OnnxModel.from_bytes("mlp", mlp_model)

    slot = ModelSlot("mlp")
    metrics = RuntimeMetrics(CollectorRegistry())
    app = build_app(slot, metrics, loader=loader)
    async with running(app) as url, httpx.AsyncClient(base_url=url) as client:
        assert (await client.get("/v2/health/live")).status_code == 200
        ready = await client.get("/v2/health/ready")
        assert ready.status_code == 503
        assert ready.json() == {"ready": False, "state": "loading"}
        assert (await client.get("/v2/models/mlp/ready")).status_code == 503
        assert (await client.get("/v2/models/mlp")).status_code == 503
        refused = await client.post("/v2/models/mlp/infer", json=_infer_body())
        assert refused.status_code == 503
        assert "not ready (loading)" in refused.json()["error"]
        gate.set()
        for _ in range(200):
            if (await client.get("/v2/health/ready")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert slot.state is ModelState.READY
        assert (await client.post("/v2/models/mlp/infer", json=_infer_body())).status_code == 200
    counted = metrics.registry.get_sample_value(
        "veil_inference_requests_total", {"model": "mlp", "outcome": "not_ready"}
    )
    assert counted == 1


async def test_failed_load_stays_unready_and_reports(mlp_model: bytes) -> None:
    failures: list[BaseException] = []

    async def loader() -> OnnxModel:
        return OnnxModel.from_bytes("mlp", b"this is not onnx")

    slot = ModelSlot("mlp")
    app = build_app(
        slot, RuntimeMetrics(CollectorRegistry()), loader=loader, on_load_failure=failures.append
    )
    async with running(app) as url, httpx.AsyncClient(base_url=url) as client:
        for _ in range(200):
            if slot.state is ModelState.FAILED:
                break
            await asyncio.sleep(0.01)
        ready = await client.get("/v2/health/ready")
    assert ready.status_code == 503
    assert ready.json()["state"] == "failed"
    assert len(failures) == 1
    assert "cannot load model 'mlp'" in str(failures[0])


async def test_metrics_are_exposed_and_count_on_their_own_port(mlp_server: Served) -> None:
    client = mlp_server.client
    await client.post("/v2/models/mlp/infer", json=_infer_body())
    await client.post("/v2/models/mlp/infer", json=_infer_body())
    await client.post("/v2/models/mlp/infer", content=b"nope")
    # the inference port serves only the protocol
    assert (await client.get("/metrics")).status_code == 404
    async with (
        running(build_metrics_app(mlp_server.metrics.registry)) as metrics_url,
        httpx.AsyncClient(base_url=metrics_url) as metrics_client,
    ):
        response = await metrics_client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    requests = {
        (s.labels["model"], s.labels["outcome"]): s.value
        for s in families["veil_inference_requests"].samples
        if s.name == "veil_inference_requests_total"
    }
    assert requests == {("mlp", "success"): 2.0, ("mlp", "bad_request"): 1.0}
    durations = {
        s.name.rsplit("_", 1)[1]: s.value
        for s in families["veil_inference_request_duration_seconds"].samples
        if not s.name.endswith("_bucket") or s.labels["le"] == "+Inf"
    }
    assert durations["count"] == 3.0
    assert durations["bucket"] == 3.0
    assert 0 < durations["sum"] < 3.0
    assert "veil_key_release" in families
    assert "veil_attestation_failures" in families


class _SlowModel(OnnxModel):
    """The real MLP, made to take a moment so a request is still in flight at shutdown."""

    entered = threading.Event()

    def run(self, inputs: Any, outputs: Any) -> Any:
        self.entered.set()
        time.sleep(0.4)
        return super().run(inputs, outputs)


async def test_in_flight_request_finishes_during_graceful_shutdown(mlp_model: bytes) -> None:
    from aiohttp import web

    loaded = OnnxModel.from_bytes("mlp", mlp_model)
    slot = ModelSlot("mlp")
    slot.set_ready(
        _SlowModel(loaded.name, loaded.version, loaded.inputs, loaded.outputs, loaded.session)
    )
    runner = web.AppRunner(build_app(slot, RuntimeMetrics(CollectorRegistry())), shutdown_timeout=5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    async with httpx.AsyncClient() as client:
        _SlowModel.entered.clear()
        request = asyncio.create_task(client.post(f"{url}/v2/models/mlp/infer", json=_infer_body()))
        deadline = time.monotonic() + 30
        while not _SlowModel.entered.is_set():  # until the request is inside the model
            assert time.monotonic() < deadline, "the request never reached the model"
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        await runner.cleanup()  # stops listening, drains, waits for the in-flight request
        waited = time.perf_counter() - started
        response = await request
        with pytest.raises(httpx.ConnectError):
            await client.get(f"{url}/v2/health/live")
    assert response.status_code == 200
    assert response.json()["outputs"][0]["shape"] == [2, 3]
    assert 0.1 < waited < 5
    assert slot.state is ModelState.DRAINING
    assert slot.model is None


async def test_server_metadata_lists_the_binary_extension(mlp_server: Served) -> None:
    metadata = (await mlp_server.client.get("/v2")).json()
    assert metadata["name"] == "veil"
    assert "binary_tensor_data" in metadata["extensions"]


async def test_model_repository_routes_under_versions(mlp_server: Served) -> None:
    client = mlp_server.client
    index = await client.post("/v2/repository/index")
    assert index.json() == [{"name": "mlp", "version": "1", "state": "READY"}]
    assert (await client.get("/v2/models/mlp/versions/1")).json()["versions"] == ["1"]
    assert (await client.get("/v2/models/mlp/versions/1/ready")).json()["ready"] is True
    answer = await client.post("/v2/models/mlp/versions/1/infer", json=_infer_body())
    assert answer.status_code == 200
    assert answer.json()["model_version"] == "1"
    for path in ("/v2/models/mlp/versions/2", "/v2/models/mlp/versions/2/ready"):
        assert (await client.get(path)).status_code == 404
    wrong_version = await client.post("/v2/models/mlp/versions/2/infer", json=_infer_body())
    assert wrong_version.status_code == 404
    assert "'mlp' is not served here" in wrong_version.json()["error"]


async def test_repository_index_reports_a_failed_load(mlp_model: bytes) -> None:
    slot = ModelSlot("mlp")
    slot.set_failed("ModelLoadError: bad bytes")
    async with (
        running(build_app(slot, RuntimeMetrics(CollectorRegistry()))) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        index = (await client.post("/v2/repository/index")).json()
    reason = "ModelLoadError: bad bytes"
    assert index == [{"name": "mlp", "version": "1", "state": "UNAVAILABLE", "reason": reason}]


async def test_unknown_paths_and_methods_are_json(mlp_server: Served) -> None:
    client = mlp_server.client
    missing = await client.get("/v2/nothing/here")
    assert missing.status_code == 404
    assert missing.json() == {"error": "not found"}
    wrong = await client.delete("/v2/models/mlp/versions/1/infer")
    assert wrong.status_code == 405
    assert wrong.headers["Allow"] == "POST"
    assert "DELETE is not allowed" in wrong.json()["error"]
    head = await client.head("/v2/health/live")
    assert head.status_code == 200
