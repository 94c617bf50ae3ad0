"""The MAA stand-in: MAA's discovery documents, and tokens for a simulated confidential VM that
Veil's own relying-party verifier accepts as a confidential VM's."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.unit.standins.conftest import runtime_keys
from veil.runtime.attestation import AttestationPolicy, AttestationVerifier, Placement
from veil.runtime.jwks import IssuerKeys
from veil_standins.jose import b64url, rsa_public_key_from_x5c
from veil_standins.maa import SIMULATED_ATTEST_PATH, MaaStandIn
from veil_standins.tls import TlsFiles

pytestmark = pytest.mark.anyio

EPHEMERAL = rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def _get(tls: TlsFiles, url: str) -> Any:
    async with (
        aiohttp.ClientSession() as session,
        session.get(url, ssl=tls.client_context()) as response,
    ):
        assert response.status == 200, url
        return await response.json()


async def _attest(tls: TlsFiles, maa: MaaStandIn, body: Any, query: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{maa.issuer}{SIMULATED_ATTEST_PATH}{query}", json=body, ssl=tls.client_context()
        ) as response,
    ):
        return response.status, await response.json()


def _request(runtime: Any) -> dict[str, Any]:
    data = b64url(json.dumps(runtime).encode())
    return {"runtimeData": {"data": data, "dataType": "JSON"}}


async def test_discovery_is_maas(tls: TlsFiles, maa: MaaStandIn) -> None:
    config = await _get(tls, f"{maa.issuer}/.well-known/openid-configuration")
    assert config["issuer"] == maa.issuer
    assert config["jwks_uri"] == f"{maa.issuer}/certs"
    jwks = await _get(tls, config["jwks_uri"])
    (published,) = jwks["keys"]
    assert set(published) == {"kty", "kid", "x5c"}  # MAA publishes certificates, not n/e
    (kid, signer), *_ = maa.signing_keys.items()
    assert published["kid"] == kid
    key = rsa_public_key_from_x5c(published["x5c"])
    assert key.public_numbers() == signer.public_key().public_numbers()


async def test_a_simulated_vm_gets_a_token_naming_its_runtime_key(
    tls: TlsFiles, maa: MaaStandIn
) -> None:
    status, answer = await _attest(tls, maa, _request(runtime_keys(EPHEMERAL)), "?api-version=1")
    assert status == 200
    token = answer["token"]
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256"
    assert header["jku"] == f"{maa.issuer}/certs"
    assert header["kid"] in maa.signing_keys
    claims = jwt.decode(token, maa.signing_keys[header["kid"]].public_key(), algorithms=["RS256"])
    assert claims["iss"] == maa.issuer
    assert claims["x-ms-runtime"] == runtime_keys(EPHEMERAL)
    assert claims["x-veil-simulated"] is True
    assert claims["x-ms-isolation-tee"]["x-ms-compliance-status"] == "azure-compliant-cvm"

    # Veil's relying-party code takes it for a confidential VM: the format is MAA's.
    async def fetch(url: str) -> Any:
        return await _get(tls, url)

    verifier = AttestationVerifier(
        [maa.issuer], AttestationPolicy(Placement.CONFIDENTIAL_VM), keys=IssuerKeys(fetch)
    )
    verified = await verifier.verify(token)
    assert verified.issuer == maa.issuer


@pytest.mark.parametrize(
    ("body", "query", "match"),
    [
        pytest.param(_request({"keys": []}), "", "api-version", id="no-api-version"),
        pytest.param({}, "?api-version=1", "runtimeData.data", id="no-runtime-data"),
        pytest.param(
            {"runtimeData": {"data": b64url(b"{}"), "dataType": "Binary"}},
            "?api-version=1",
            "dataType JSON",
            id="binary",
        ),
        pytest.param(
            _request({"keys": [{"kty": "EC", "crv": "P-256"}]}),
            "?api-version=1",
            "not an RSA JWK",
            id="not-rsa",
        ),
    ],
)
async def test_unusable_attest_requests_are_refused(
    tls: TlsFiles, maa: MaaStandIn, body: Any, query: str, match: str
) -> None:
    status, answer = await _attest(tls, maa, body, query)
    assert status == 400
    assert match in answer["error"]["message"]
