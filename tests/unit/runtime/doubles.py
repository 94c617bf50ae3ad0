"""Test doubles and helpers for the runtime tests: real HTTP servers on 127.0.0.1, real keys.

The doubles stand in for services that cannot run here (the SKR sidecar, an MAA instance);
what they serve is exactly the wire format the production code reads.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import numpy as np
import numpy.typing as npt
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from veil.runtime.jwk import rsa_public_jwk

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


def self_signed_certificate(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "veil test attestation authority")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


@dataclass
class TestAuthority:
    """A local attestation authority: signs MAA-shaped tokens, serves OpenID config and JWKS.

    Kids starting with "x5c" are published as MAA does (an x5c certificate only), others as n/e.
    """

    __test__ = False

    signing_keys: dict[str, rsa.RSAPrivateKey]
    issuer: str = ""
    hits: dict[str, int] = field(default_factory=dict)

    def _count(self, path: str) -> None:
        self.hits[path] = self.hits.get(path, 0) + 1

    async def openid_configuration(self, request: web.Request) -> web.Response:
        self._count(request.path)
        return web.json_response({"issuer": self.issuer, "jwks_uri": f"{self.issuer}/certs"})

    async def certs(self, request: web.Request) -> web.Response:
        self._count(request.path)
        keys: list[dict[str, Any]] = []
        for kid, key in self.signing_keys.items():
            if kid.startswith("x5c"):
                der = self_signed_certificate(key)
                keys.append({"kty": "RSA", "kid": kid, "x5c": [base64.b64encode(der).decode()]})
            else:
                keys.append({**rsa_public_jwk(key.public_key()), "kid": kid, "use": "sig"})
        return web.json_response({"keys": keys})

    async def catch_all(self, request: web.Request) -> web.Response:
        self._count(request.path)
        return web.json_response({"keys": []})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.openid_configuration)
        app.router.add_get("/certs", self.certs)
        app.router.add_get("/{tail:.*}", self.catch_all)
        return app

    @property
    def total_hits(self) -> int:
        return sum(self.hits.values())

    def token(
        self,
        claims: dict[str, Any],
        *,
        kid: str = "x5c-key",
        signing_key: rsa.RSAPrivateKey | None = None,
        headers: dict[str, Any] | None = None,
        lifetime: float = 3600.0,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "iat": now,
            "nbf": now,
            "exp": now + int(lifetime),
        }
        payload.update(claims)
        return jwt.encode(
            payload,
            signing_key or self.signing_keys[kid],
            algorithm="RS256",
            headers={"kid": kid, "jku": f"{self.issuer}/certs", **(headers or {})},
        )


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
    tee: dict[str, Any] = {
        "x-ms-attestation-type": "sevsnpvm",
        "x-ms-compliance-status": "azure-compliant-cvm",
        "x-ms-sevsnpvm-is-debuggable": False,
    }
    tee.update(tee_overrides)
    claims: dict[str, Any] = {"x-ms-isolation-tee": tee}
    if nonce is not None:
        claims["x-ms-runtime"] = {"client-payload": {"nonce": nonce}}
    return claims
