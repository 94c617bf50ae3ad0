"""The SKR stand-in's `POST /attest/maa` as the real sidecar's (cmd/skr: `maa_endpoint`, standard
base64 `runtime_data`; MAA gets it as JSON runtime data and returns it as `x-ms-runtime`), and
the whole confidential-inference chain over it: runtime → sidecar → MAA stand-in (HTTPS) for
the token binding the channel key, then Veil's client verifying it and sending encrypted."""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tests.unit.runtime.doubles import running, train_breast_cancer_model
from tests.unit.standins.conftest import TOKEN, serve
from veil.client import AsyncClient, Expectations
from veil.runtime.attestation import AttestationPolicy, AttestationVerifier, Placement
from veil.runtime.channel import ChannelPrivateKey
from veil.runtime.evidence import EvidenceService, SkrAttester
from veil.runtime.jwks import IssuerKeys
from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.model import OnnxModel
from veil.runtime.server import build_app
from veil.runtime.state import ModelSlot
from veil_standins.maa import SIMULATED_CONTAINER_ATTEST_PATH, STANDIN_CCE_POLICY, MaaStandIn
from veil_standins.skr import SkrStandIn
from veil_standins.tls import TlsFiles
from veil_standins.trust import Trust

pytestmark = pytest.mark.anyio


@pytest.fixture
def aci_sidecar(tls: TlsFiles) -> Iterator[str]:
    sidecar = SkrStandIn(
        trust=Trust.from_files([tls.ca_file]),
        static_token=TOKEN,
        attest_path=SIMULATED_CONTAINER_ATTEST_PATH,
    )
    server = serve(sidecar.app(), None)
    try:
        yield server.url
    finally:
        server.stop()


def _keys(tls: TlsFiles) -> IssuerKeys:
    context = tls.client_context()

    async def fetch(url: str) -> Any:
        async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as answer:
            return await answer.json()

    return IssuerKeys(fetch)


async def _post(url: str, body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as answer:
        return answer.status, await answer.json()


async def test_attest_maa_returns_a_token_carrying_the_runtime_data(
    aci_sidecar: str, maa: MaaStandIn
) -> None:
    data = {"veil-channel-key": {"kty": "OKP", "crv": "X25519", "x": "abc"}, "nonce": "n-1"}
    encoded = base64.b64encode(json.dumps(data).encode()).decode()
    host = urlsplit(maa.issuer).netloc
    status, answer = await _post(
        aci_sidecar + "/attest/maa", {"maa_endpoint": host, "runtime_data": encoded}
    )
    assert status == 200, answer
    claims = jwt.decode(answer["token"], options={"verify_signature": False})
    assert claims["iss"] == maa.issuer
    assert claims["x-ms-runtime"] == data
    assert claims["x-ms-compliance-status"] == "azure-compliant-uvm"
    assert claims["x-ms-sevsnpvm-hostdata"] == hashlib.sha256(STANDIN_CCE_POLICY).hexdigest()
    assert claims["x-veil-simulated"] is True


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"runtime_data": "e30="}, 400, "invalid request format: maa_endpoint required"),
        ({"maa_endpoint": "MAA"}, 400, "invalid request format: runtime_data required"),
        ({"maa_endpoint": "MAA", "runtime_data": "not base64!"}, 400, "decoding base64"),
        ({"maa_endpoint": "MAA", "runtime_data": "bm90IGpzb24="}, 403, "MAA answered HTTP 400"),
    ],
)
async def test_attest_maa_refuses_as_the_sidecar_does(
    aci_sidecar: str, maa: MaaStandIn, body: dict[str, str], status: int, message: str
) -> None:
    host = urlsplit(maa.issuer).netloc
    body = {k: host if v == "MAA" else v for k, v in body.items()}
    got, answer = await _post(aci_sidecar + "/attest/maa", body)
    assert got == status
    assert message in answer["error"]


async def test_the_whole_chain_verifies_then_infers_encrypted(
    aci_sidecar: str, maa: MaaStandIn, tls: TlsFiles
) -> None:
    host = urlsplit(maa.issuer).netloc
    attester = SkrAttester(aci_sidecar, host)
    assert attester.issuer == maa.issuer
    verifier = AttestationVerifier(
        [attester.issuer], AttestationPolicy(Placement.CONFIDENTIAL_ACI), keys=_keys(tls)
    )
    channel = EvidenceService(
        ChannelPrivateKey(),
        model_name="cancer",
        model_version="1",
        required=True,
        attester=attester,
        verifier=verifier,
    )
    trained = train_breast_cancer_model()
    slot = ModelSlot("cancer")
    slot.set_ready(OnnxModel.from_bytes("cancer", trained.onnx_bytes))
    expectations = Expectations(
        (maa.issuer,),
        AttestationPolicy(
            Placement.CONFIDENTIAL_ACI, hostdata=hashlib.sha256(STANDIN_CCE_POLICY).hexdigest()
        ),
    )
    app = build_app(slot, RuntimeMetrics(CollectorRegistry()), channel=channel)
    async with (
        running(app) as url,
        AsyncClient(url, "cancer", expectations, issuer_keys=_keys(tls)) as client,
    ):
        verified = await client.verify()
        answer = await client.infer({"input": trained.samples[:3]})
    assert verified.attestation.claims["x-veil-simulated"] is True
    labels = next(o for o in answer["outputs"] if o["datatype"] == "INT64")["data"]
    np.testing.assert_array_equal(labels, trained.sklearn_predictions[:3])
