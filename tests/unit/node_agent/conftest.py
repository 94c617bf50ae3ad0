"""Fixtures for the node agent: a software TPM provisioned as an Azure CVM's vTPM, MAA and Key
Vault stand-ins over HTTPS under a throwaway CA, and a fake Kubernetes API for authorization."""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from azure.keyvault.keys import KeyClient
from cryptography.hazmat.primitives import serialization

from tests.unit.standins.conftest import release_key
from veil.azure.credentials import AzureSettings
from veil.azure.keyvault import KeyState, key_client
from veil.node_agent.authz import POD_NAME_EXTRA, POD_UID_EXTRA, KubeUnavailableError
from veil.node_agent.guest_attestation import GuestAttestor, TokenCache
from veil.node_agent.release import KeyVaultReleaser, load_roots
from veil.node_agent.tpm import Tpm
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.maa import MaaStandIn
from veil_standins.release_signer import ReleaseSigner
from veil_standins.server import ServerThread
from veil_standins.tls import TlsFiles, make_tls
from veil_standins.vtpm import SoftwareCvm

TOKEN = "veil-node-agent-vault-token"
NODE = "aks-cvm-000000"
NAMESPACE = "models"
MODEL = "fraud"
POD_TOKEN = "pod-token-of-fraud"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def cvm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SoftwareCvm]:
    machine = SoftwareCvm.start(tmp_path_factory.mktemp("swtpm"))
    try:
        yield machine
    finally:
        machine.stop()


@pytest.fixture(scope="session")
def tpm(cvm: SoftwareCvm) -> Iterator[Tpm]:
    device = Tpm(cvm.tcti)
    try:
        yield device
    finally:
        device.close()


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("node-agent-tls"))


@pytest.fixture(scope="session")
def maa(tls: TlsFiles, cvm: SoftwareCvm) -> Iterator[MaaStandIn]:
    authority = MaaStandIn(guest_trust=cvm.trust())
    server = ServerThread(authority.app(), tls.server_context()).start()
    authority.issuer = server.url
    try:
        yield authority
    finally:
        server.stop()


@pytest.fixture(scope="session")
def vault(tls: TlsFiles) -> Iterator[KeyVaultDouble]:
    assert tls.ca is not None
    stand_in = KeyVaultDouble(
        token=TOKEN,
        signer=ReleaseSigner.issued_by(tls.ca, ["127.0.0.1"]),
        authority_trust=tls.client_context(),
    )
    server = ServerThread(stand_in.app(), tls.server_context()).start()
    stand_in.url = server.url
    try:
        yield stand_in
    finally:
        server.stop()


@pytest.fixture(scope="session")
def settings(tls: TlsFiles) -> AzureSettings:
    base = AzureSettings.for_emulator(TOKEN, connection_verify=str(tls.ca_file))
    return dataclasses.replace(base, extra_client_kwargs={"retry_total": 0})


@pytest.fixture(scope="session")
def vault_client(vault: KeyVaultDouble, settings: AzureSettings) -> KeyClient:
    return key_client(vault.url, settings)


@pytest.fixture(scope="session")
def model_key(vault_client: KeyClient, maa: MaaStandIn) -> KeyState:
    """The model's exportable key, releasable to SEV-SNP confidential VMs attested by `maa`."""
    return release_key(vault_client, f"veil-{uuid.uuid4().hex[:12]}", maa.issuer)


def vcek_source(cvm: SoftwareCvm) -> Callable[[], Awaitable[bytes]]:
    """The host's "VCEK chain" as IMDS would serve it: the stand-in hardware's public key."""
    pem = cvm.hardware_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    async def fetch() -> bytes:
        return pem

    return fetch


@pytest.fixture
def attestor(tpm: Tpm, cvm: SoftwareCvm, tls: TlsFiles, tmp_path: Path) -> GuestAttestor:
    log = tmp_path / "tcg.log"
    log.write_bytes(b"\x00" * 32)
    return GuestAttestor(tpm, vcek_source(cvm), tcg_log=log, ssl_context=tls.client_context())


@pytest.fixture
def releaser(tpm: Tpm, tls: TlsFiles, settings: AzureSettings) -> KeyVaultReleaser:
    return KeyVaultReleaser(
        tpm,
        settings.credential,
        load_roots([tls.ca_file]),
        settings.client_kwargs(),
        settings.verify_challenge_resource,
    )


@pytest.fixture
def tokens(attestor: GuestAttestor) -> TokenCache:
    return TokenCache(attestor)


# -- a fake Kubernetes API --------------------------------------------------------------------


@dataclasses.dataclass
class FakeKube:
    """TokenReview answers by token, and objects by (kind, namespace, name)."""

    reviews: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    objects: dict[tuple[str, str, str], dict[str, Any]] = dataclasses.field(default_factory=dict)
    down: bool = False

    def review_token(self, token: str, audiences: list[str]) -> Mapping[str, Any]:
        if self.down:
            raise KubeUnavailableError("the API server is down")
        review = self.reviews.get(token)
        if review is None or not set(audiences) & set(review["audiences"]):
            return {"authenticated": False, "error": "token not valid for these audiences"}
        return {**review, "audiences": sorted(set(audiences) & set(review["audiences"]))}

    def get(
        self, api_version: str, kind: str, namespace: str, name: str
    ) -> Mapping[str, Any] | None:
        found = self.objects.get((kind, namespace, name))
        if found is None or found.get("apiVersion") != api_version:
            return None
        return copy.deepcopy(found)

    def add(self, obj: dict[str, Any]) -> dict[str, Any]:
        meta = obj["metadata"]
        meta.setdefault("uid", str(uuid.uuid4()))
        self.objects[(obj["kind"], meta["namespace"], meta["name"])] = obj
        return obj


def _controlled_by(owner: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": owner["apiVersion"],
            "kind": owner["kind"],
            "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"],
            "controller": True,
        }
    ]


def add_model_pod(
    kube: FakeKube,
    *,
    namespace: str,
    model: str,
    vault_url: str,
    key_name: str,
    authority: str,
    token: str,
    node: str = NODE,
    pod_ip: str = "127.0.0.1",
) -> dict[str, Any]:
    """A ConfidentialModel and its Deployment, ReplicaSet and pod, as the operator makes them,
    and the TokenReview answer for the pod's projected token."""
    owner = kube.add(
        {
            "apiVersion": "veil.dev/v1alpha1",
            "kind": "ConfidentialModel",
            "metadata": {"name": model, "namespace": namespace},
            "spec": {
                "keyRelease": {
                    "vaultUrl": vault_url,
                    "keyName": key_name,
                    "attestationAuthority": authority,
                }
            },
        }
    )
    deployment = kube.add(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": model,
                "namespace": namespace,
                "ownerReferences": _controlled_by(owner),
            },
        }
    )
    replica_set = kube.add(
        {
            "apiVersion": "apps/v1",
            "kind": "ReplicaSet",
            "metadata": {
                "name": f"{model}-5d8f",
                "namespace": namespace,
                "ownerReferences": _controlled_by(deployment),
            },
        }
    )
    pod = kube.add(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{model}-5d8f-x1",
                "namespace": namespace,
                "ownerReferences": _controlled_by(replica_set),
            },
            "spec": {"nodeName": node, "serviceAccountName": model},
            "status": {"phase": "Running", "podIP": pod_ip},
        }
    )
    kube.reviews[token] = {
        "authenticated": True,
        "audiences": ["veil-node-agent"],
        "user": {
            "username": f"system:serviceaccount:{namespace}:{model}",
            "extra": {
                POD_NAME_EXTRA: [pod["metadata"]["name"]],
                POD_UID_EXTRA: [pod["metadata"]["uid"]],
            },
        },
    }
    return pod
