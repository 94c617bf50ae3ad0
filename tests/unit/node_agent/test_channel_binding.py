"""The runtime's channel key bound to a confidential VM's attestation through the node agent:
`POST /v1/attest` puts the pod's runtime data (and the pod and model the agent authorized) in
the guest attestation's client payload, the MAA stand-in checks the software TPM's evidence and
returns it as `x-ms-runtime.client-payload`, and Veil's client verifies it before it sends."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import numpy as np
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from tests.unit.runtime.doubles import running, train_breast_cancer_model
from veil.azure.keyvault import KeyState
from veil.client import AsyncClient, Expectations
from veil.node_agent.authz import PodAuthorizer
from veil.node_agent.guest_attestation import TokenCache
from veil.node_agent.release import KeyVaultReleaser
from veil.node_agent.server import NodeAgent
from veil.runtime.attestation import AttestationPolicy, AttestationVerifier, Placement
from veil.runtime.channel import ChannelPrivateKey
from veil.runtime.evidence import EvidenceService, NodeAgentAttester
from veil.runtime.jwks import IssuerKeys
from veil.runtime.key_release import RetryPolicy
from veil.runtime.metrics import RuntimeMetrics
from veil.runtime.model import OnnxModel
from veil.runtime.node_agent_client import NodeAgentClient, NodeAgentTarget
from veil.runtime.server import build_app
from veil.runtime.state import ModelSlot
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.maa import MaaStandIn
from veil_standins.tls import TlsFiles

from .conftest import MODEL, NAMESPACE, NODE, POD_TOKEN, FakeKube, add_model_pod

pytestmark = pytest.mark.anyio
CVM = Placement.CONFIDENTIAL_VM


@dataclass
class Agent:
    url: str
    body: dict[str, Any]
    target: NodeAgentTarget


@pytest.fixture
async def agent(
    tokens: TokenCache,
    releaser: KeyVaultReleaser,
    vault: KeyVaultDouble,
    maa: MaaStandIn,
    model_key: KeyState,
) -> AsyncIterator[Agent]:
    kube = FakeKube()
    name = model_key.kid.split("/keys/")[1].split("/")[0]
    add_model_pod(
        kube,
        namespace=NAMESPACE,
        model=MODEL,
        vault_url=vault.url,
        key_name=name,
        authority=maa.issuer,
        token=POD_TOKEN,
    )
    server = TestServer(
        NodeAgent(PodAuthorizer(kube, NODE), tokens, releaser).app(), host="127.0.0.1"
    )
    await server.start_server()
    body = {"vault_url": vault.url, "key_name": name, "maa_endpoint": maa.issuer}
    try:
        yield Agent(
            str(server.make_url("")).rstrip("/"),
            body,
            NodeAgentTarget(vault.url, name, "", maa.issuer),
        )
    finally:
        await server.close()


def _keys(tls: TlsFiles) -> IssuerKeys:
    context = tls.client_context()

    async def fetch(url: str) -> Any:
        async with aiohttp.ClientSession() as session, session.get(url, ssl=context) as answer:
            return await answer.json()

    return IssuerKeys(fetch)


async def _attest(agent: Agent, runtime_data: Any, token: str = POD_TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    body = {**agent.body, "runtime_data": runtime_data}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{agent.url}/v1/attest", json=body, headers=headers) as answer,
    ):
        return answer.status, await answer.json()


async def test_the_token_carries_the_runtime_data_and_who_the_agent_vouches_for(
    agent: Agent,
) -> None:
    key = ChannelPrivateKey().public.jwk()
    status, answer = await _attest(agent, {"veil-channel-key": key, "nonce": "nonce-0001"})
    assert status == 200, answer
    claims = jwt.decode(answer["token"], options={"verify_signature": False})
    assert claims["x-ms-runtime"]["client-payload"] == {
        "veil-channel-key": key,
        "nonce": "nonce-0001",
        "veil-pod": f"{NAMESPACE}/{MODEL}-5d8f-x1",
        "veil-model": f"{NAMESPACE}/{MODEL}",
    }
    assert claims["x-ms-isolation-tee"]["x-ms-compliance-status"] == "azure-compliant-cvm"


@pytest.mark.parametrize(
    ("runtime_data", "token", "status", "message"),
    [
        ({"veil-channel-key": {"kty": "RSA"}}, POD_TOKEN, 400, "not an X25519 OKP JWK"),
        ({"veil-pod": "other/pod"}, POD_TOKEN, 400, "holds only"),
        (None, POD_TOKEN, 400, "holds only"),
        ("KEY", "stolen", 401, "not authenticated"),
    ],
)
async def test_refusals(
    agent: Agent, runtime_data: Any, token: str, status: int, message: str
) -> None:
    if runtime_data == "KEY":
        runtime_data = {"veil-channel-key": ChannelPrivateKey().public.jwk()}
    got, answer = await _attest(agent, runtime_data, token)
    assert got == status
    assert message in answer["error"]


async def test_a_cvm_runtime_serves_evidence_the_client_verifies(
    agent: Agent, maa: MaaStandIn, tls: TlsFiles, tmp_path: Path
) -> None:
    token = tmp_path / "token"
    token.write_text(POD_TOKEN)
    client = NodeAgentClient(agent.url, token, retry=RetryPolicy(attempts=1))
    attester = NodeAgentAttester(client, agent.target)
    assert attester.issuer == maa.issuer
    channel = EvidenceService(
        ChannelPrivateKey(),
        model_name=MODEL,
        model_version="1",
        required=True,
        attester=attester,
        verifier=AttestationVerifier([maa.issuer], AttestationPolicy(CVM), keys=_keys(tls)),
    )
    await channel.refresh()
    trained = train_breast_cancer_model()
    slot = ModelSlot(MODEL)
    slot.set_ready(OnnxModel.from_bytes(MODEL, trained.onnx_bytes))
    expectations = Expectations(
        (maa.issuer,),
        AttestationPolicy(CVM),
        (("x-ms-runtime.client-payload.veil-model", f"{NAMESPACE}/{MODEL}"),),
    )
    app = build_app(slot, RuntimeMetrics(CollectorRegistry()), channel=channel)
    async with (
        running(app) as url,
        AsyncClient(url, MODEL, expectations, issuer_keys=_keys(tls)) as caller,
    ):
        verified = await caller.verify()
        answer = await caller.infer({"input": trained.samples[:3]})
        assert channel.current()["attestation"]["key_claim"] == (
            "x-ms-runtime.client-payload.veil-channel-key"
        )
    assert verified.attestation.nonce is not None  # a fresh guest attestation for this caller
    labels = next(o for o in answer["outputs"] if o["datatype"] == "INT64")["data"]
    np.testing.assert_array_equal(labels, trained.sklearn_predictions[:3])
