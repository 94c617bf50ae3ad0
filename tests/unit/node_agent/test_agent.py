"""The node agent end to end: a pod's request, authorized against a fake Kubernetes API, the node
attested with the software TPM to MAA's stand-in, the key released by Key Vault's stand-in to the
TPM, and handed to the pod wrapped to the pod's own in-memory key."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.keywrap import aes_key_unwrap_with_padding
from onnx import TensorProto, helper

from veil.azure.keyvault import KeyState
from veil.node_agent.authz import PodAuthorizer
from veil.node_agent.guest_attestation import GuestAttestor, TokenCache
from veil.node_agent.release import KeyVaultReleaser
from veil.node_agent.server import NodeAgent
from veil.runtime.jwk import b64url_decode, b64url_encode, rsa_public_jwk
from veil.runtime.key_release import KeyReleaseRefusedError, RetryPolicy
from veil.runtime.keywrap import RsaPublicKeyWrapper
from veil.runtime.loader import SealedPin
from veil.runtime.node_agent_client import NodeAgentClient, NodeAgentTarget, node_agent_loader
from veil.runtime.sealing import seal_bytes
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.maa import MaaStandIn
from veil_standins.maa_guest import GuestTrust
from veil_standins.vtpm import AkCa, SoftwareCvm

from .conftest import MODEL, NAMESPACE, NODE, POD_TOKEN, FakeKube, add_model_pod

pytestmark = pytest.mark.anyio
WRAPPING = rsa.generate_private_key(public_exponent=65537, key_size=3072)


@dataclass
class Running:
    url: str
    kube: FakeKube
    body: dict[str, Any]
    attests: list[str]


@pytest.fixture
async def agent(
    tokens: TokenCache,
    releaser: KeyVaultReleaser,
    attestor: GuestAttestor,
    *,
    vault: KeyVaultDouble,
    maa: MaaStandIn,
    model_key: KeyState,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Running]:
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
    attests: list[str] = []
    original = attestor.attest

    async def counted(endpoint: str, *payload: Any) -> Any:
        attests.append(endpoint)
        return await original(endpoint, *payload)

    monkeypatch.setattr(attestor, "attest", counted)
    server = TestServer(
        NodeAgent(PodAuthorizer(kube, NODE), tokens, releaser).app(), host="127.0.0.1"
    )
    await server.start_server()
    body = {
        "vault_url": vault.url,
        "key_name": name,
        "key_version": model_key.version,
        "maa_endpoint": maa.issuer,
        "wrapping_key": rsa_public_jwk(WRAPPING.public_key()),
    }
    try:
        yield Running(str(server.make_url("")).rstrip("/"), kube, body, attests)
    finally:
        await server.close()


async def _post(agent: Running, body: Any, token: str | None = POD_TOKEN) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        ClientSession() as session,
        session.post(f"{agent.url}/v1/release", json=body, headers=headers) as response,
    ):
        return response.status, await response.json()


def _open(envelope: dict[str, Any]) -> bytes:
    ciphertext = b64url_decode(envelope["ciphertext"])
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    transfer = WRAPPING.decrypt(ciphertext[:384], oaep)
    return aes_key_unwrap_with_padding(transfer, ciphertext[384:])


async def test_the_pod_gets_the_vault_key_wrapped_to_its_own_key_only(
    agent: Running, vault: KeyVaultDouble, model_key: KeyState, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    status, envelope = await _post(agent, agent.body)

    assert status == 200, envelope
    expected = vault.private_key(agent.body["key_name"], model_key.version)
    pkcs8 = expected.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    secret_d = b64url_encode(
        expected.private_numbers().d.to_bytes((expected.key_size + 7) // 8, "big")
    )
    raw = json.dumps(envelope)
    for leak in (pkcs8.hex(), b64url_encode(pkcs8), secret_d):
        assert leak not in raw
        assert leak not in caplog.text
    assert envelope["kid"] == model_key.kid
    assert _open(envelope) == pkcs8


async def test_the_node_attests_once_while_its_token_is_fresh(agent: Running) -> None:
    for _ in range(2):
        status, envelope = await _post(agent, agent.body)
        assert status == 200, envelope
    assert len(agent.attests) == 1


@pytest.mark.parametrize(
    ("token", "why"),
    [(None, "bearer ServiceAccount token is required"), ("stolen", "not authenticated")],
)
async def test_no_or_unknown_token_is_401(agent: Running, token: str | None, why: str) -> None:
    status, answer = await _post(agent, agent.body, token)
    assert status == 401
    assert why in answer["error"]
    assert agent.attests == []


async def test_a_token_for_another_audience_is_401(agent: Running) -> None:
    agent.kube.reviews[POD_TOKEN]["audiences"] = ["https://kubernetes.default.svc"]
    status, answer = await _post(agent, agent.body)
    assert status == 401, answer


async def test_a_pod_on_another_node_is_403(
    agent: Running, vault: KeyVaultDouble, maa: MaaStandIn
) -> None:
    add_model_pod(
        agent.kube, namespace=NAMESPACE, model=MODEL, vault_url=vault.url,
        key_name=agent.body["key_name"], authority=maa.issuer, token="elsewhere", node="other-node",
    )  # fmt: skip
    status, answer = await _post(agent, agent.body, "elsewhere")
    assert status == 403
    assert "runs on another node" in answer["error"]


async def test_a_pod_of_another_model_in_another_namespace_is_403(
    agent: Running, vault: KeyVaultDouble, maa: MaaStandIn
) -> None:
    add_model_pod(
        agent.kube, namespace="tenant-b", model="chatbot", vault_url=vault.url,
        key_name="chatbot-key", authority=maa.issuer, token="tenant-b-token",
    )  # fmt: skip
    status, answer = await _post(agent, agent.body, "tenant-b-token")
    assert status == 403
    assert answer["error"] == "model tenant-b/chatbot does not use this key"
    assert agent.attests == []


async def test_a_weak_wrapping_key_is_400(agent: Running) -> None:
    weak = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    status, answer = await _post(
        agent, {**agent.body, "wrapping_key": rsa_public_jwk(weak.public_key())}
    )
    assert status == 400
    assert "3072" in answer["error"]


async def test_a_key_vault_outage_is_503(agent: Running, vault: KeyVaultDouble) -> None:
    vault.fail(500, "InternalError", "try later", path_contains="/release", times=1)
    try:
        status, answer = await _post(agent, agent.body)
    finally:
        vault.clear_failures()
    assert status == 503
    assert "HTTP 500" in answer["error"]


async def test_an_api_server_outage_is_503(agent: Running) -> None:
    agent.kube.down = True
    status, _ = await _post(agent, agent.body)
    assert status == 503


async def test_a_key_vault_refusal_is_502(agent: Running, vault: KeyVaultDouble) -> None:
    """A key version the vault does not have: Key Vault says no, and retrying will not help."""
    status, answer = await _post(agent, {**agent.body, "key_version": "0" * 32})
    assert status == 502
    assert "Key Vault refused" in answer["error"]


def _tiny_model() -> bytes:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


async def test_the_loader_unseals_a_model_with_the_released_key(
    agent: Running, vault: KeyVaultDouble, model_key: KeyState, tmp_path: Path
) -> None:
    public = vault.private_key(agent.body["key_name"], model_key.version).public_key()
    sealed = tmp_path / "model.onnx.sealed"
    # Sealed as `veil seal --vault-url` does: the header names the key version.
    sealed.write_bytes(seal_bytes(_tiny_model(), RsaPublicKeyWrapper(public, model_key.kid)))
    token = tmp_path / "token"
    token.write_text(POD_TOKEN)
    client = NodeAgentClient(agent.url, token, retry=RetryPolicy(attempts=1))
    target = NodeAgentTarget(
        agent.body["vault_url"],
        agent.body["key_name"],
        "",  # the header decides
        agent.body["maa_endpoint"],
    )
    pin = SealedPin(hashlib.sha256(sealed.read_bytes()).hexdigest())

    model = await node_agent_loader(sealed, client, target, name="tiny", pin=pin)()

    assert [spec.name for spec in model.inputs] == ["x"]
    outputs = model.session.run(None, {"x": np.array([[-1.0, 2.0]], dtype=np.float32)})
    assert outputs[0].tolist() == [[0.0, 2.0]]


async def test_the_pod_client_raises_a_refusal(agent: Running, tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("stolen")
    client = NodeAgentClient(agent.url, token, retry=RetryPolicy(attempts=1))
    target = NodeAgentTarget(
        agent.body["vault_url"],
        agent.body["key_name"],
        agent.body["key_version"],
        agent.body["maa_endpoint"],
    )
    with pytest.raises(KeyReleaseRefusedError) as refused:
        await client.release(target)
    assert refused.value.status == 401


async def test_a_node_maa_does_not_trust_gets_no_key(
    agent: Running, maa: MaaStandIn, cvm: SoftwareCvm
) -> None:
    trusted = maa.guest_trust
    maa.guest_trust = GuestTrust(
        AkCa.create("another vTPM CA").certificate, cvm.trust().hardware_key
    )
    try:
        status, answer = await _post(agent, agent.body)
    finally:
        maa.guest_trust = trusted
    assert status == 502
    assert "not issued by the vTPM CA" in answer["error"]
    assert "ciphertext" not in answer
