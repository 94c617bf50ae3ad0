"""The SKR sidecar stand-in between Veil's real SKR client and the MAA and Key Vault stand-ins:
a model sealed with `veil seal` to a Key Vault key opens with the key the sidecar releases, and
every refusal reaches Veil as the real sidecar's would."""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
from azure.keyvault.keys import KeyClient

from tests.unit.standins.conftest import TOKEN, release_key, serve
from veil.azure.credentials import AzureSettings
from veil.azure.keyvault import key_client
from veil.cli import main as veil
from veil.runtime.key_release import (
    KeyReleaseClient,
    KeyReleaseRefusedError,
    ReleaseTarget,
    RetryPolicy,
)
from veil.runtime.sealing import unseal_file
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.maa import MaaStandIn
from veil_standins.skr import SkrError, SkrStandIn, release_url, sidecar_information
from veil_standins.tls import TlsFiles
from veil_standins.trust import Trust

pytestmark = pytest.mark.anyio


def _sidecar_url(tls: TlsFiles, **options: str) -> Iterator[str]:
    sidecar = SkrStandIn(trust=Trust.from_files([tls.ca_file]), static_token=TOKEN, **options)
    server = serve(sidecar.app(), None)
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def sidecar(tls: TlsFiles) -> Iterator[str]:
    """The sidecar, trusting the stand-ins' CA, with the vault's token in its environment."""
    yield from _sidecar_url(tls)


def _target(maa: MaaStandIn, vault_url: str, kid: str) -> ReleaseTarget:
    # What Veil's runtime sends: bare hosts, and name/version of the key (from its full id).
    name_and_version = urlsplit(kid).path.removeprefix("/keys/")
    return ReleaseTarget(urlsplit(maa.issuer).netloc, urlsplit(vault_url).netloc, name_and_version)


def _client(url: str) -> KeyReleaseClient:
    return KeyReleaseClient(url, retry=RetryPolicy(attempts=1))


async def test_the_released_key_opens_the_model_veil_sealed(
    client: KeyClient,
    vault: KeyVaultDouble,
    maa: MaaStandIn,
    *,
    tls: TlsFiles,
    sidecar: str,
    key_name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    state = release_key(client, key_name, maa.issuer)
    model = tmp_path / "model.onnx"
    model.write_bytes(os.urandom(300_000))
    monkeypatch.setenv("VEIL_AZURE_STATIC_TOKEN", TOKEN)
    monkeypatch.setenv("VEIL_AZURE_CA_BUNDLE", str(tls.ca_file))
    sealed = tmp_path / "model.onnx.sealed"
    assert (
        veil(["seal", str(model), str(sealed), "--vault-url", vault.url, "--key-name", key_name])
        == 0
    )

    key = await _client(sidecar).release(_target(maa, vault.url, state.kid))

    assert unseal_file(sealed, key, verify_digest=True) == model.read_bytes()
    assert key.private_numbers() == vault.private_key(key_name).private_numbers()


async def test_a_policy_the_vm_does_not_satisfy_is_refused_through_the_sidecar(
    client: KeyClient, vault: KeyVaultDouble, maa: MaaStandIn, sidecar: str, key_name: str
) -> None:
    state = release_key(client, key_name, maa.issuer, "tdx")  # the simulated VM is SEV-SNP

    with pytest.raises(KeyReleaseRefusedError) as refused:
        await _client(sidecar).release(_target(maa, vault.url, state.kid))

    assert refused.value.status == 403
    assert "Key Vault answered HTTP 403" in refused.value.reason
    assert "release policy is not satisfied" in refused.value.reason


async def test_key_vaults_credentials_come_from_the_request_first(
    client: KeyClient, vault: KeyVaultDouble, maa: MaaStandIn, sidecar: str, key_name: str
) -> None:
    state = release_key(client, key_name, maa.issuer)
    target = _target(maa, vault.url, state.kid)
    wrong = ReleaseTarget(target.maa_endpoint, target.akv_endpoint, target.kid, "not-the-token")

    with pytest.raises(KeyReleaseRefusedError, match="Key Vault answered HTTP 401"):
        await _client(sidecar).release(wrong)


async def test_an_answer_not_signed_for_the_vault_is_not_believed(
    settings: AzureSettings, maa: MaaStandIn, tls: TlsFiles, sidecar: str, key_name: str
) -> None:
    """A vault that signs its release answers under a CA the sidecar does not trust."""
    impostor = KeyVaultDouble(token=TOKEN, authority_trust=tls.client_context())
    server = serve(impostor.app(), tls)
    impostor.url = server.url
    try:
        state = release_key(key_client(impostor.url, settings), key_name, maa.issuer)
        with pytest.raises(KeyReleaseRefusedError, match="not from the vault"):
            await _client(sidecar).release(_target(maa, impostor.url, state.kid))
    finally:
        server.stop()


async def test_an_unreachable_authority_is_refused_as_the_real_sidecar_does(
    client: KeyClient, vault: KeyVaultDouble, maa: MaaStandIn, sidecar: str, key_name: str
) -> None:
    state = release_key(client, key_name, maa.issuer)
    target = _target(maa, vault.url, state.kid)
    nowhere = ReleaseTarget("127.0.0.1:9", target.akv_endpoint, target.kid)

    # The real sidecar answers every failed release with 403, transient or not.
    with pytest.raises(KeyReleaseRefusedError, match=r"HTTP 403\): cannot reach MAA"):
        await _client(sidecar).release(nowhere)


async def _post(url: str, body: object) -> tuple[int, dict[str, str]]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/key/release", json=body) as response,
    ):
        return response.status, await response.json()


async def test_every_request_names_its_key_and_endpoints_as_the_sidecar_requires(
    client: KeyClient, vault: KeyVaultDouble, maa: MaaStandIn, sidecar: str, key_name: str
) -> None:
    state = release_key(client, key_name, maa.issuer)
    target = _target(maa, vault.url, state.kid)
    status, answer = await _post(sidecar, target.body())
    assert status == 200
    assert json.loads(answer["key"])["kty"] == "RSA"
    status, answer = await _post(sidecar, {"kid": target.kid})
    assert status == 400
    assert answer == {"error": "invalid request format: maa_endpoint, akv_endpoint required"}
    # How Veil once wired it: a full key id and a vault URL. The sidecar formats
    # https://{akv_endpoint}/keys/{kid}/release, which then names no key.
    for wrong in (
        {**target.body(), "kid": state.kid},
        {**target.body(), "akv_endpoint": vault.url},
        {**target.body(), "maa_endpoint": maa.issuer},
    ):
        status, answer = await _post(sidecar, wrong)
        assert status == 403
        assert "bare host" in answer["error"]


async def test_status_and_bad_requests_answer_in_one_line(sidecar: str) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{sidecar}/status") as response,
    ):
        assert (response.status, await response.json()) == (200, {"message": "Status OK"})
    status, answer = await _post(sidecar, ["not", "an", "object"])
    assert status == 400
    assert set(answer) == {"error"}
    assert "\n" not in answer["error"]
    with pytest.raises(ValueError, match="not base64 JSON"):
        sidecar_information({"SkrSideCarArgs": "%%%"})
    certcache = base64.b64encode(json.dumps({"certcache": {"endpoint": "x"}}).encode()).decode()
    assert sidecar_information({"SkrSideCarArgs": certcache}) == {"certcache": {"endpoint": "x"}}


@pytest.mark.parametrize("kid", ["model", "model/0123abcd"])
def test_a_key_name_or_name_and_version_makes_the_release_url(kid: str) -> None:
    url = release_url("vault.local:8443", kid)
    assert url == f"https://vault.local:8443/keys/{kid}/release?api-version=7.3-preview"


@pytest.mark.parametrize(
    ("endpoint", "kid"),
    [
        ("vault.local:8443", "https://vault.local:8443/keys/model/0123abcd"),
        ("https://vault.local:8443", "model"),
        ("vault.local:8443", "model/../../secrets"),
        ("vault.local:8443", ""),
        ("vault.local:8443/x", "model"),
    ],
)
def test_a_url_that_names_no_key_is_refused(endpoint: str, kid: str) -> None:
    with pytest.raises(SkrError) as refused:
        release_url(endpoint, kid)
    assert refused.value.status == 403
