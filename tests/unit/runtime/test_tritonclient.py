"""The reference Open Inference Protocol client, tritonclient[http], against the Veil server:
binary tensor data (its default) and plain JSON, metadata, readiness and the repository index."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
import tritonclient.http.aio as triton_aio
from aiohttp import web
from prometheus_client import CollectorRegistry
from tritonclient.utils import InferenceServerException

from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.model import OnnxModel
from veil.runtime.server import build_app
from veil.runtime.state import ModelSlot

from .doubles import TrainedModel, running
from .threaded import serve_in_thread

BATCH = np.array([[0.5, -1.0, 2.0, 0.25], [1.0, 1.0, -0.5, 3.0], [0, 0, 0, 0]], np.float32)


def _app(name: str, model: bytes) -> web.Application:
    slot = ModelSlot(name)
    slot.set_ready(OnnxModel.from_bytes(name, model))
    return build_app(slot, RuntimeMetrics(CollectorRegistry()))


@pytest.fixture
def mlp_client(mlp_model: bytes) -> Iterator[triton.InferenceServerClient]:
    app = _app("mlp", mlp_model)
    with serve_in_thread(app) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        try:
            yield client
        finally:
            client.close()


def _expected(mlp_model: bytes, batch: np.ndarray) -> np.ndarray:
    result: np.ndarray = ort.InferenceSession(mlp_model).run(None, {"x": batch})[0]
    return result


def _input(batch: np.ndarray, *, binary: bool) -> triton.InferInput:
    tensor = triton.InferInput("x", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    return tensor


@pytest.mark.parametrize("binary_in", [True, False], ids=["binary-in", "json-in"])
@pytest.mark.parametrize(
    "binary_out", [True, False, None], ids=["binary-out", "json-out", "default"]
)
def test_infer_matches_onnxruntime(
    mlp_client: triton.InferenceServerClient,
    mlp_model: bytes,
    binary_in: bool,
    binary_out: bool | None,
) -> None:
    outputs = None if binary_out is None else [triton.InferRequestedOutput("y", binary_out)]
    result = mlp_client.infer(
        "mlp", [_input(BATCH, binary=binary_in)], outputs=outputs, request_id="r-7"
    )
    response = result.get_response()
    assert response["id"] == "r-7"
    [output] = response["outputs"]
    # None: no outputs named, so the client asks for all of them in binary
    assert ("binary_data_size" in output.get("parameters", {})) is (binary_out is not False)
    np.testing.assert_allclose(result.as_numpy("y"), _expected(mlp_model, BATCH), rtol=1e-6)


def test_infer_compressed_and_by_version(
    mlp_client: triton.InferenceServerClient, mlp_model: bytes
) -> None:
    for algorithm in ("gzip", "deflate"):
        result = mlp_client.infer(
            "mlp",
            [_input(BATCH, binary=True)],
            model_version="1",
            request_compression_algorithm=algorithm,
        )
        np.testing.assert_allclose(result.as_numpy("y"), _expected(mlp_model, BATCH), rtol=1e-6)


def test_metadata_readiness_and_index(mlp_client: triton.InferenceServerClient) -> None:
    assert mlp_client.is_server_live()
    assert mlp_client.is_server_ready()
    assert mlp_client.is_model_ready("mlp")
    assert mlp_client.is_model_ready("mlp", "1")
    assert not mlp_client.is_model_ready("mlp", "2")
    assert "binary_tensor_data" in mlp_client.get_server_metadata()["extensions"]
    metadata = mlp_client.get_model_metadata("mlp", "1")
    assert metadata["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]
    assert mlp_client.get_model_repository_index() == [
        {"name": "mlp", "version": "1", "state": "READY"}
    ]


def test_refusals_reach_the_client_with_their_message(
    mlp_client: triton.InferenceServerClient,
) -> None:
    wrong = triton.InferInput("x", [2, 5], "FP32")
    wrong.set_data_from_numpy(np.zeros((2, 5), np.float32))
    with pytest.raises(InferenceServerException, match=r"has shape \[2, 5\] but the model"):
        mlp_client.infer("mlp", [wrong])
    with pytest.raises(InferenceServerException, match="'resnet' is not served here"):
        mlp_client.infer("resnet", [_input(BATCH, binary=True)])


def test_a_classifier_with_integer_labels(breast_cancer_model: TrainedModel) -> None:
    samples = breast_cancer_model.samples[:40]
    app = _app("cancer", breast_cancer_model.onnx_bytes)
    with serve_in_thread(app) as url:
        client = triton.InferenceServerClient(url.removeprefix("http://"))
        tensor = triton.InferInput("input", list(samples.shape), "FP32")
        tensor.set_data_from_numpy(samples)
        result = client.infer("cancer", [tensor])
        client.close()
    labels = result.as_numpy("label")
    assert labels is not None
    assert labels.dtype == np.int64
    np.testing.assert_array_equal(labels, breast_cancer_model.sklearn_predictions[:40])
    probabilities = result.as_numpy("probabilities")
    assert probabilities is not None
    assert probabilities.shape == (40, 2)


@pytest.mark.anyio
async def test_the_asyncio_client(mlp_model: bytes) -> None:
    app = _app("mlp", mlp_model)
    async with running(app) as url:
        client = triton_aio.InferenceServerClient(url.removeprefix("http://"))
        try:
            assert await client.is_model_ready("mlp")
            result = await client.infer("mlp", [_input(BATCH, binary=True)])
        finally:
            await client.close()
    np.testing.assert_allclose(result.as_numpy("y"), _expected(mlp_model, BATCH), rtol=1e-6)
