"""Test doubles and helpers for the runtime tests: real HTTP servers on 127.0.0.1, real keys.

The doubles stand in for services that cannot run here (a scripted SKR sidecar; an MAA instance,
the one of veil_standins.maa); what they serve is exactly the wire format the production code
reads.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from veil.runtime.attestation import Placement
from veil.runtime.jwk import rsa_public_jwk
from veil_standins.maa import MaaStandIn, simulated_cvm_tee

HOSTDATA = "a3f1" * 16


def write_pem(path: Path, key: rsa.RSAPrivateKey, *, public: bool = False) -> Path:
    if public:
        data = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    else:
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    path.write_bytes(data)
    return path


@dataclass(frozen=True)
class TrainedModel:
    onnx_bytes: bytes
    samples: npt.NDArray[np.float32]
    sklearn_predictions: npt.NDArray[np.int64]


def train_breast_cancer_model() -> TrainedModel:
    """A real classifier: scikit-learn's bundled breast-cancer data, converted with skl2onnx."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels = load_breast_cancer(return_X_y=True)
    pipeline = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    pipeline.fit(features[:400], labels[:400])
    converted = convert_sklearn(
        pipeline,
        initial_types=[("input", FloatTensorType([None, 30]))],
        options={"zipmap": False},
    )
    samples = features[400:].astype(np.float32)
    return TrainedModel(
        onnx_bytes=converted.SerializeToString(),
        samples=samples,
        sklearn_predictions=pipeline.predict(samples),
    )


@asynccontextmanager
async def running(app: web.Application, *, shutdown_timeout: float = 5.0) -> AsyncIterator[str]:
    """Run `app` on 127.0.0.1 on a free port; yields its base URL."""
    runner = web.AppRunner(app, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@dataclass
class SidecarDouble:
    """A local stand-in for the SKR sidecar's `POST /key/release`."""

    released_jwk: dict[str, str]
    script: list[tuple[int, Any]] = field(default_factory=list)
    requests: list[dict[str, Any]] = field(default_factory=list)
    jwk_as_string: bool = True

    async def release(self, request: web.Request) -> web.Response:
        self.requests.append(await request.json())
        if self.script:
            status, body = self.script.pop(0)
            return web.json_response(body, status=status)
        key: Any = json.dumps(self.released_jwk) if self.jwk_as_string else self.released_jwk
        return web.json_response({"key": key})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/key/release", self.release)
        return app


@dataclass
class TestAuthority(MaaStandIn):
    """The MAA stand-in as the runtime tests use it: over plain HTTP on loopback, counting the
    requests it gets, answering unknown paths with an empty JWKS.

    Kids starting with "x5c" are published as MAA does (an x5c certificate only), others as n/e.
    """

    __test__ = False

    hits: dict[str, int] = field(default_factory=dict)

    def published_key(self, kid: str, key: rsa.RSAPrivateKey) -> dict[str, Any]:
        if kid.startswith("x5c"):
            return super().published_key(kid, key)
        return {**rsa_public_jwk(key.public_key()), "kid": kid, "use": "sig"}

    @web.middleware
    async def _count(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.hits[request.path] = self.hits.get(request.path, 0) + 1
        response: web.StreamResponse = await handler(request)
        return response

    async def catch_all(self, request: web.Request) -> web.Response:
        return web.json_response({"keys": []})

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        self.add_routes(app)
        app.router.add_get("/{tail:.*}", self.catch_all)
        return app

    @property
    def total_hits(self) -> int:
        return sum(self.hits.values())


def aci_claims(nonce: str | None = None, /, **overrides: Any) -> dict[str, Any]:
    """Claims of a Confidential ACI (container) token, at the top level."""
    claims: dict[str, Any] = {
        "x-ms-attestation-type": "sevsnpvm",
        "x-ms-compliance-status": "azure-compliant-uvm",
        "x-ms-sevsnpvm-is-debuggable": False,
        "x-ms-sevsnpvm-hostdata": HOSTDATA,
        "x-ms-ver": "1.0",
    }
    if nonce is not None:
        claims["x-ms-runtime"] = {"nonce": nonce}
    claims.update(overrides)
    return claims


def cvm_claims(nonce: str | None = None, /, **tee_overrides: Any) -> dict[str, Any]:
    """Claims of a confidential VM token: TEE claims under x-ms-isolation-tee."""
    tee = simulated_cvm_tee()
    tee.update(tee_overrides)
    claims: dict[str, Any] = {"x-ms-isolation-tee": tee}
    if nonce is not None:
        claims["x-ms-runtime"] = {"client-payload": {"nonce": nonce}}
    return claims


@dataclass
class AuthorityAttester:
    """The SKR sidecar's `/attest/maa` collapsed into a call: the test authority mints the token
    MAA gives a Confidential ACI group, its runtime data as `x-ms-runtime` (the SKR stand-in's
    own HTTP path is tested in tests/unit/standins/test_skr_attest.py)."""

    authority: TestAuthority
    lifetime: float = 8 * 3600
    tamper: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    calls: int = 0
    placement: Placement = Placement.CONFIDENTIAL_ACI

    @property
    def issuer(self) -> str:
        return self.authority.issuer

    async def attest(self, data: Mapping[str, Any]) -> str:
        self.calls += 1
        runtime = dict(data) if self.tamper is None else self.tamper(dict(data))
        claims = self.authority.simulated_container_claims(runtime)
        return self.authority.token(claims, lifetime=self.lifetime)
