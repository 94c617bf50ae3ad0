"""End to end inside one process: seal → key release via a local SKR sidecar → serve → infer.

Everything is real but the sidecar (which would attest SEV-SNP hardware to Azure): real RSA-OAEP
and AES-GCM, real aiohttp servers and an httpx client over 127.0.0.1, real onnxruntime.
"""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry

from veil.runtime.jwk import rsa_private_jwk
from veil.runtime.key_release import KeyReleaseClient, ReleaseTarget, RetryPolicy
from veil.runtime.keywrap import RsaPublicKeyWrapper
from veil.runtime.loader import key_release_loader
from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.sealing import seal_stream
from veil.runtime.server import build_app
from veil.runtime.state import ModelSlot, ModelState

from .doubles import SidecarDouble, TrainedModel, running

pytestmark = pytest.mark.anyio

TARGET = ReleaseTarget(
    maa_endpoint="sharedweu.weu.attest.azure.net",
    akv_endpoint="veil-models.vault.azure.net",
    kid="model-cancer",
)


def _seal_to(path: Path, plaintext: bytes, key: rsa.RSAPrivateKey, chunk_size: int) -> Path:
    """Seal straight from memory to `path`: no plaintext file is ever written."""
    with path.open("wb") as sink:
        seal_stream(
            io.BytesIO(plaintext),
            sink,
            RsaPublicKeyWrapper(key.public_key()),
            chunk_size=chunk_size,
        )
    return path


async def _wait_for(slot: ModelSlot, *states: ModelState) -> None:
    for _ in range(500):
        if slot.state in states:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"model stayed {slot.state}")


async def test_sealed_classifier_served_after_key_release_matches_onnxruntime(
    tmp_path: Path,
    breast_cancer_model: TrainedModel,
    model_key: rsa.RSAPrivateKey,
    sidecar_double: SidecarDouble,
) -> None:
    sealed = _seal_to(tmp_path / "cancer.sealed", breast_cancer_model.onnx_bytes, model_key, 256)
    metrics = RuntimeMetrics(CollectorRegistry())
    slot = ModelSlot("cancer")
    samples = breast_cancer_model.samples
    async with running(sidecar_double.app()) as sidecar_url:
        loader = key_release_loader(
            sealed, KeyReleaseClient(sidecar_url, metrics=metrics), TARGET, name="cancer"
        )
        app = build_app(slot, metrics, loader=loader)
        async with running(app) as url, httpx.AsyncClient(base_url=url) as client:
            await _wait_for(slot, ModelState.READY, ModelState.FAILED)
            assert (await client.get("/v2/health/ready")).status_code == 200
            response = await client.post(
                "/v2/models/cancer/infer",
                json={
                    "inputs": [
                        {
                            "name": "input",
                            "shape": list(samples.shape),
                            "datatype": "FP32",
                            "data": samples.tolist(),
                        }
                    ]
                },
            )
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    plain = ort.InferenceSession(breast_cancer_model.onnx_bytes)
    labels, probabilities = plain.run(["label", "probabilities"], {"input": samples})
    assert outputs["label"]["data"] == labels.tolist()
    assert outputs["label"]["data"] == breast_cancer_model.sklearn_predictions.tolist()
    served = np.array(outputs["probabilities"]["data"], dtype=np.float32).reshape(
        outputs["probabilities"]["shape"]
    )
    np.testing.assert_array_equal(served, probabilities)
    assert sidecar_double.requests == [
        {
            "maa_endpoint": TARGET.maa_endpoint,
            "akv_endpoint": TARGET.akv_endpoint,
            "kid": TARGET.kid,
        }
    ]
    released = metrics.registry.get_sample_value("veil_key_release_total", {"outcome": "released"})
    assert released == 1
    # the plaintext model was never written anywhere near the sealed one
    assert [p.name for p in tmp_path.iterdir()] == ["cancer.sealed"]


async def test_sealed_mlp_round_trip(
    tmp_path: Path, mlp_model: bytes, model_key: rsa.RSAPrivateKey, sidecar_double: SidecarDouble
) -> None:
    sealed = _seal_to(tmp_path / "mlp.sealed", mlp_model, model_key, 64)
    slot = ModelSlot("mlp")
    metrics = RuntimeMetrics(CollectorRegistry())
    batch = np.random.default_rng(3).normal(size=(16, 4)).astype(np.float32)
    async with running(sidecar_double.app()) as sidecar_url:
        loader = key_release_loader(sealed, KeyReleaseClient(sidecar_url), TARGET, name="mlp")
        async with (
            running(build_app(slot, metrics, loader=loader)) as url,
            httpx.AsyncClient(base_url=url) as client,
        ):
            await _wait_for(slot, ModelState.READY, ModelState.FAILED)
            response = await client.post(
                "/v2/models/mlp/infer",
                json={
                    "inputs": [
                        {
                            "name": "x",
                            "shape": [16, 4],
                            "datatype": "FP32",
                            "data": batch.ravel().tolist(),
                        }
                    ]
                },
            )
    [output] = response.json()["outputs"]
    expected = ort.InferenceSession(mlp_model).run(None, {"x": batch})[0]
    np.testing.assert_array_equal(np.array(output["data"], np.float32).reshape(16, 3), expected)


async def test_refused_release_leaves_the_server_unready(
    tmp_path: Path, mlp_model: bytes, model_key: rsa.RSAPrivateKey, sidecar_double: SidecarDouble
) -> None:
    sealed = _seal_to(tmp_path / "mlp.sealed", mlp_model, model_key, 64)
    sidecar_double.script = [(403, {"error": "attestation: x-ms-compliance-status mismatch"})]
    slot = ModelSlot("mlp")
    metrics = RuntimeMetrics(CollectorRegistry())
    failures: list[BaseException] = []
    async with running(sidecar_double.app()) as sidecar_url:
        client = KeyReleaseClient(sidecar_url, metrics=metrics, retry=RetryPolicy(attempts=2))
        loader = key_release_loader(sealed, client, TARGET, name="mlp")
        app = build_app(slot, metrics, loader=loader, on_load_failure=failures.append)
        async with running(app) as url, httpx.AsyncClient(base_url=url) as http:
            await _wait_for(slot, ModelState.READY, ModelState.FAILED)
            ready = await http.get("/v2/health/ready")
            infer = await http.post("/v2/models/mlp/infer", json={"inputs": []})
    assert slot.state is ModelState.FAILED
    assert "compliance-status mismatch" in (slot.failure or "")
    assert ready.status_code == 503
    assert infer.status_code == 503
    assert len(failures) == 1
    refused = metrics.registry.get_sample_value("veil_key_release_total", {"outcome": "refused"})
    assert refused == 1


async def test_release_of_the_wrong_key_is_caught_before_loading(
    tmp_path: Path,
    mlp_model: bytes,
    model_key: rsa.RSAPrivateKey,
    other_key: rsa.RSAPrivateKey,
    sidecar_double: SidecarDouble,
) -> None:
    sealed = _seal_to(tmp_path / "mlp.sealed", mlp_model, model_key, 64)
    sidecar_double.released_jwk = rsa_private_jwk(other_key)
    slot = ModelSlot("mlp")
    async with running(sidecar_double.app()) as sidecar_url:
        loader = key_release_loader(sealed, KeyReleaseClient(sidecar_url), TARGET, name="mlp")
        async with running(build_app(slot, RuntimeMetrics(CollectorRegistry()), loader=loader)):
            await _wait_for(slot, ModelState.READY, ModelState.FAILED)
    assert slot.state is ModelState.FAILED
    assert "WrongKeyError" in (slot.failure or "")
