"""Fixtures for the stand-ins' own tests: MAA and Key Vault stand-ins over HTTPS on 127.0.0.1,
under a throwaway CA, and the REAL azure-keyvault-keys client against the vault."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp import web
from azure.keyvault.keys import KeyClient
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.unit.azure.test_release_policy import spec
from veil.azure.credentials import AzureSettings
from veil.azure.keyvault import KeyState, ensure_release_key, key_client
from veil.azure.release_policy import release_policy
from veil_standins.jose import rsa_public_jwk
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.maa import MaaStandIn
from veil_standins.release_signer import ReleaseSigner
from veil_standins.server import ServerThread
from veil_standins.tls import TlsFiles, make_tls

TOKEN = "veil-standins-token"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def serve(app: web.Application, tls: TlsFiles | None) -> ServerThread:
    return ServerThread(app, tls.server_context() if tls else None).start()


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("standins-tls"))


def _served_maa(tls: TlsFiles) -> Iterator[MaaStandIn]:
    authority = MaaStandIn()
    server = serve(authority.app(), tls)
    authority.issuer = server.url
    try:
        yield authority
    finally:
        server.stop()


@pytest.fixture(scope="session")
def maa(tls: TlsFiles) -> Iterator[MaaStandIn]:
    """The authority the keys' release policies name."""
    yield from _served_maa(tls)


@pytest.fixture(scope="session")
def rogue_maa(tls: TlsFiles) -> Iterator[MaaStandIn]:
    """An attacker's authority: keys of its own, served under the same trusted CA."""
    yield from _served_maa(tls)


@pytest.fixture(scope="session")
def vault(tls: TlsFiles) -> Iterator[KeyVaultDouble]:
    assert tls.ca is not None
    stand_in = KeyVaultDouble(
        token=TOKEN,
        signer=ReleaseSigner.issued_by(tls.ca, ["127.0.0.1"]),
        authority_trust=tls.client_context(),
    )
    server = serve(stand_in.app(), tls)
    stand_in.url = server.url
    try:
        yield stand_in
    finally:
        server.stop()


@pytest.fixture(scope="session")
def settings(tls: TlsFiles) -> AzureSettings:
    """The operator's settings for the stand-ins: their CA trusted, no retries (a refusal is
    seen at once)."""
    base = AzureSettings.for_emulator(TOKEN, connection_verify=str(tls.ca_file))
    return dataclasses.replace(base, extra_client_kwargs={"retry_total": 0})


@pytest.fixture
def client(vault: KeyVaultDouble, settings: AzureSettings) -> KeyClient:
    return key_client(vault.url, settings)


@pytest.fixture
def key_name() -> str:
    return f"veil-{uuid.uuid4().hex[:12]}"


def release_key(
    client: KeyClient, name: str, authority: str, platform: str = "sevsnp", **tee: Any
) -> KeyState:
    """An exportable key whose policy (as Veil writes it) admits `platform` confidential VMs
    attested by `authority`."""
    policy = release_policy(spec("confidentialVM", platform, authority=authority, **tee))
    return ensure_release_key(client, name, policy.canonical)


def runtime_keys(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    """Runtime data naming `key` as the one to wrap a released key to, as the sidecar sends it."""
    return {"keys": [{**rsa_public_jwk(key.public_key()), "kid": "eph", "key_ops": ["encrypt"]}]}
