"""Veil's CDH client against the CDH + KBS stand-in over real HTTP on 127.0.0.1: the model key
comes back only to a guest whose measurement is the reference value, and the sealed model opens
with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from veil.runtime.cdh import (
    CdhClient,
    CdhRefusedError,
    CdhResponseError,
    CdhUnavailableError,
    cdh_loader,
    resource_path,
)
from veil.runtime.jwk import rsa_private_jwk
from veil.runtime.key_release import RetryPolicy
from veil.runtime.keywrap import RsaPublicKeyWrapper
from veil.runtime.loader import SealedPin
from veil.runtime.sealing import SealedModelError, seal_bytes
from veil_standins.cdh import CdhStandIn, KbsStandIn

from .doubles import running

pytestmark = pytest.mark.anyio

POLICY_DIGEST = "ab" * 32
RESOURCE = "kbs:///veil/key/model"


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cdh(key: rsa.RSAPrivateKey, measurement: str = POLICY_DIGEST) -> CdhStandIn:
    kbs = KbsStandIn(
        POLICY_DIGEST,
        {
            "veil/key/model": _pem(key),
            "veil/key/jwk": json.dumps(rsa_private_jwk(key)).encode(),
            "veil/key/not-a-key": b"hello",
        },
    )
    return CdhStandIn(kbs, measurement)


class _Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def _client(url: str, attempts: int = 3, sleeps: _Sleeps | None = None) -> CdhClient:
    return CdhClient(url, retry=RetryPolicy(attempts=attempts), sleep=sleeps or _Sleeps())


def _numbers(key: rsa.RSAPrivateKey) -> int:
    return key.private_numbers().d


async def test_the_attested_guest_gets_the_key_as_pem_or_jwk(model_key: rsa.RSAPrivateKey) -> None:
    async with running(_cdh(model_key).app()) as url:
        client = _client(url)
        pem_key = await client.private_key(RESOURCE)
        jwk_key = await client.private_key("veil/key/jwk")
    assert _numbers(pem_key) == _numbers(model_key)
    assert _numbers(jwk_key) == _numbers(model_key)


async def test_a_guest_with_another_policy_gets_nothing(model_key: rsa.RSAPrivateKey) -> None:
    sleeps = _Sleeps()
    async with running(_cdh(model_key, measurement="cd" * 32).app()) as url:
        with pytest.raises(CdhUnavailableError, match="policy denied") as caught:
            await _client(url, attempts=3, sleeps=sleeps).private_key(RESOURCE)
    # The CDH's 500 is retried, boundedly, then the KBS's reason is what the pod logs.
    assert len(sleeps.delays) == 2
    assert "BEGIN" not in str(caught.value)


async def test_an_unknown_resource_names_the_kbs_404(model_key: rsa.RSAPrivateKey) -> None:
    async with running(_cdh(model_key).app()) as url:
        with pytest.raises(CdhUnavailableError, match="404"):
            await _client(url, attempts=1).private_key("veil/key/missing")


async def test_a_resource_that_is_no_rsa_key_is_refused(model_key: rsa.RSAPrivateKey) -> None:
    ec_key = ec.generate_private_key(ec.SECP256R1())
    kbs = KbsStandIn(
        POLICY_DIGEST,
        {
            "veil/key/ec": ec_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        },
    )
    async with running(_cdh(model_key).app()) as url:
        with pytest.raises(CdhResponseError):
            await _client(url).private_key("veil/key/not-a-key")
    async with running(CdhStandIn(kbs, POLICY_DIGEST).app()) as url:
        with pytest.raises(CdhResponseError, match="not RSA"):
            await _client(url).private_key("veil/key/ec")


async def test_a_wrong_api_path_is_final_not_retried(model_key: rsa.RSAPrivateKey) -> None:
    sleeps = _Sleeps()
    async with running(_cdh(model_key).app()) as url:
        with pytest.raises(CdhRefusedError) as caught:
            await _client(url + "/not-cdh", sleeps=sleeps).private_key(RESOURCE)
    assert caught.value.status == 404
    assert sleeps.delays == []


async def test_a_cdh_that_starts_late_is_waited_for(model_key: rsa.RSAPrivateKey) -> None:
    answers = [503, 200]

    async def flaky(request: web.Request) -> web.Response:
        if answers.pop(0) == 503:
            return web.Response(status=503, text="attestation agent not ready")
        return web.Response(body=_pem(model_key))

    app = web.Application()
    app.router.add_get("/cdh/resource/veil/key/model", flaky)
    sleeps = _Sleeps()
    async with running(app) as url:
        key = await _client(url, sleeps=sleeps).private_key(RESOURCE)
    assert _numbers(key) == _numbers(model_key)
    assert len(sleeps.delays) == 1


async def test_nothing_listening_is_unavailable_after_bounded_attempts() -> None:
    sleeps = _Sleeps()
    with pytest.raises(CdhUnavailableError, match="cannot reach"):
        await _client("http://127.0.0.1:1", attempts=4, sleeps=sleeps).resource(RESOURCE)
    assert len(sleeps.delays) == 3


@pytest.mark.parametrize(
    ("given", "path"),
    [("kbs:///veil/key/model", "veil/key/model"), ("veil/key/model", "veil/key/model")],
)
def test_resource_names(given: str, path: str) -> None:
    assert resource_path(given) == path


@pytest.mark.parametrize(
    "bad", ["kbs://kbs.example/veil/key/model", "veil/key", "veil/../model", "a/b/c/d", "a/b/c?x"]
)
def test_bad_resource_names_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="resource"):
        resource_path(bad)


async def test_the_loader_opens_the_sealed_model_with_the_released_key(
    model_key: rsa.RSAPrivateKey, mlp_model: bytes, tmp_path: Path
) -> None:
    sealed = tmp_path / "model.onnx.sealed"
    sealed.write_bytes(seal_bytes(mlp_model, RsaPublicKeyWrapper(model_key.public_key())))
    async with running(_cdh(model_key).app()) as url:
        model = await cdh_loader(sealed, _client(url), RESOURCE, name="mlp")()
    assert model.name == "mlp"
    assert [spec.name for spec in model.inputs] == ["x"]


async def test_the_loader_asks_for_no_key_for_a_substituted_file(
    model_key: rsa.RSAPrivateKey, mlp_model: bytes, tmp_path: Path
) -> None:
    sealed = tmp_path / "model.onnx.sealed"
    sealed.write_bytes(seal_bytes(mlp_model, RsaPublicKeyWrapper(model_key.public_key())))
    requests: list[str] = []

    async def record(request: web.Request) -> web.Response:
        requests.append(request.path)
        return web.Response(body=_pem(model_key))

    app = web.Application()
    app.router.add_get("/cdh/resource/{tail:.*}", record)
    async with running(app) as url:
        loader = cdh_loader(sealed, _client(url), RESOURCE, name="m", pin=SealedPin("0" * 64))
        with pytest.raises(SealedModelError, match="pinned"):
            await loader()
    assert requests == []


def test_a_bad_resource_name_fails_when_the_loader_is_built(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not <repo>/<type>/<tag>"):
        cdh_loader(tmp_path / "m", _client("http://127.0.0.1:8006"), "nope", name="m")
