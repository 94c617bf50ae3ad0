"""The SKR sidecar client against a real local HTTP double, and the JWK conversion it relies on."""

from __future__ import annotations

import logging
import socket

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from prometheus_client import CollectorRegistry

from veil.runtime.jwk import (
    JwkError,
    rsa_private_jwk,
    rsa_private_key_from_jwk,
    rsa_public_jwk,
    rsa_thumbprint,
)
from veil.runtime.key_release import (
    KeyReleaseClient,
    KeyReleaseRefusedError,
    KeyReleaseResponseError,
    KeyReleaseUnavailableError,
    ReleaseTarget,
    RetryPolicy,
)
from veil.runtime.metrics import RuntimeMetrics

from .doubles import SidecarDouble, running

pytestmark = pytest.mark.anyio

TARGET = ReleaseTarget(
    maa_endpoint="sharedweu.weu.attest.azure.net",
    akv_endpoint="veil-models.vault.azure.net",
    kid="model-fraud",
)


class _Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def _released(metrics: RuntimeMetrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value("veil_key_release_total", {"outcome": outcome})
    return value or 0.0


async def test_release_returns_the_private_key(
    sidecar_double: SidecarDouble, model_key: rsa.RSAPrivateKey
) -> None:
    metrics = RuntimeMetrics(CollectorRegistry())
    async with running(sidecar_double.app()) as url:
        key = await KeyReleaseClient(url, metrics=metrics).release(TARGET)
    assert rsa_thumbprint(key.public_key()) == rsa_thumbprint(model_key.public_key())
    assert key.private_numbers() == model_key.private_numbers()
    assert sidecar_double.requests == [
        {
            "maa_endpoint": "sharedweu.weu.attest.azure.net",
            "akv_endpoint": "veil-models.vault.azure.net",
            "kid": "model-fraud",
        }
    ]
    assert _released(metrics, "released") == 1


async def test_release_accepts_the_jwk_as_an_object_and_sends_the_token(
    sidecar_double: SidecarDouble, model_key: rsa.RSAPrivateKey
) -> None:
    sidecar_double.jwk_as_string = False
    target = ReleaseTarget("maa", "akv", "kid", access_token="aad-token")
    assert "aad-token" not in repr(target)
    async with running(sidecar_double.app()) as url:
        key = await KeyReleaseClient(url + "/").release(target)
    assert key.private_numbers() == model_key.private_numbers()
    assert sidecar_double.requests[0]["access_token"] == "aad-token"


async def test_transient_failures_are_retried_with_backoff(
    sidecar_double: SidecarDouble, model_key: rsa.RSAPrivateKey
) -> None:
    sidecar_double.script = [(503, {"error": "starting"}), (500, {"error": "maa hiccup"})]
    sleeps = _Sleeps()
    metrics = RuntimeMetrics(CollectorRegistry())
    policy = RetryPolicy(attempts=4, initial_delay=0.2, max_delay=0.3)
    async with running(sidecar_double.app()) as url:
        key = await KeyReleaseClient(url, retry=policy, sleep=sleeps, metrics=metrics).release(
            TARGET
        )
    assert key.private_numbers() == model_key.private_numbers()
    assert len(sidecar_double.requests) == 3
    assert len(sleeps.delays) == 2
    assert all(0.1 <= d <= 0.3 for d in sleeps.delays)
    assert _released(metrics, "released") == 1
    assert _released(metrics, "error") == 0


async def test_refusal_is_final_logged_and_counted(
    sidecar_double: SidecarDouble, caplog: pytest.LogCaptureFixture
) -> None:
    reason = "SKR policy not satisfied: x-ms-sevsnpvm-is-debuggable"
    sidecar_double.script = [(403, {"error": reason})]
    metrics = RuntimeMetrics(CollectorRegistry())
    sleeps = _Sleeps()
    async with running(sidecar_double.app()) as url:
        client = KeyReleaseClient(url, metrics=metrics, sleep=sleeps)
        with caplog.at_level(logging.ERROR), pytest.raises(KeyReleaseRefusedError) as refused:
            await client.release(TARGET)
    assert refused.value.status == 403
    assert refused.value.reason == reason
    assert "model-fraud" in str(refused.value)
    assert len(sidecar_double.requests) == 1
    assert sleeps.delays == []
    assert any(
        "KEY RELEASE REFUSED" in record.getMessage() and reason in record.getMessage()
        for record in caplog.records
    )
    assert _released(metrics, "refused") == 1


async def test_bad_request_is_a_refusal_too(sidecar_double: SidecarDouble) -> None:
    sidecar_double.script = [(400, {"error": "missing kid"})]
    async with running(sidecar_double.app()) as url:
        with pytest.raises(KeyReleaseRefusedError, match=r"HTTP 400.*missing kid"):
            await KeyReleaseClient(url).release(TARGET)


async def test_unreachable_sidecar_gives_up_after_bounded_attempts() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    sleeps = _Sleeps()
    metrics = RuntimeMetrics(CollectorRegistry())
    policy = RetryPolicy(attempts=3, initial_delay=1.0, max_delay=1.5)
    client = KeyReleaseClient(
        f"http://127.0.0.1:{port}", retry=policy, sleep=sleeps, metrics=metrics
    )
    with pytest.raises(KeyReleaseUnavailableError, match=r"after 3 attempts.*cannot reach"):
        await client.release(TARGET)
    assert len(sleeps.delays) == 2
    assert max(sleeps.delays) <= 1.5
    assert _released(metrics, "error") == 1


async def test_a_public_key_is_not_a_released_key(
    sidecar_double: SidecarDouble, model_key: rsa.RSAPrivateKey
) -> None:
    sidecar_double.released_jwk = rsa_public_jwk(model_key.public_key())
    async with running(sidecar_double.app()) as url:
        with pytest.raises(KeyReleaseResponseError, match="public key"):
            await KeyReleaseClient(url).release(TARGET)


async def test_answer_without_key_is_refused(sidecar_double: SidecarDouble) -> None:
    sidecar_double.script = [(200, {"token": "not a key"})]
    async with running(sidecar_double.app()) as url:
        with pytest.raises(KeyReleaseResponseError, match="no 'key'"):
            await KeyReleaseClient(url).release(TARGET)


def test_retry_delays_grow_and_stay_bounded() -> None:
    import random

    delays = list(
        RetryPolicy(attempts=8, initial_delay=0.5, max_delay=4.0).delays(random.Random(1))
    )
    assert len(delays) == 7
    assert all(d <= 4.0 for d in delays)
    assert delays[-1] >= 2.0  # reached the cap's neighbourhood, grew from 0.25..0.5


def test_jwk_round_trip_and_recovery_of_primes(model_key: rsa.RSAPrivateKey) -> None:
    full = rsa_private_jwk(model_key)
    assert rsa_private_key_from_jwk(full).private_numbers() == model_key.private_numbers()
    minimal = {name: full[name] for name in ("kty", "n", "e", "d")}
    assert rsa_private_key_from_jwk(minimal).private_numbers() == model_key.private_numbers()
    assert rsa_private_key_from_jwk({**full, "kty": "RSA-HSM"}).key_size == 2048


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda jwk: {**jwk, "kty": "EC"}, "expected an RSA key"),
        (lambda jwk: {k: v for k, v in jwk.items() if k != "q"}, "some CRT members but not q"),
        (lambda jwk: {**jwk, "n": "!!"}, "'n' is not valid base64url"),
        (lambda jwk: {**jwk, "p": jwk["q"]}, "inconsistent"),
    ],
)
def test_broken_jwks_are_refused(
    model_key: rsa.RSAPrivateKey, mutate: object, message: str
) -> None:
    jwk = rsa_private_jwk(model_key)
    with pytest.raises(JwkError, match=message):
        rsa_private_key_from_jwk(mutate(jwk))  # type: ignore[operator]
