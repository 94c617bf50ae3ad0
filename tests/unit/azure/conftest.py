"""Fixtures for the Azure tests: the real Azure SDKs against local services on 127.0.0.1.

Key Vault backend (`key_vault`), once per session:
  1. Lowkey Vault, fetched by hack/lowkey-vault.sh into $VEIL_CACHE and started on a free port,
     then probed for what Secure Key Release needs (RSA-HSM, exportable, release policy);
  2. if it cannot be fetched, started or lacks those, the Key Vault stand-in
     (veil_standins.keyvault) instead. That fallback is LOUD: a warning and a line in the
     terminal summary; VEIL_REQUIRE_LOWKEY_VAULT=1 turns the fallback into an error (for CI once
     the jar is available); VEIL_KEY_VAULT_BACKEND=double skips the Lowkey Vault attempt.
The stand-in is also used directly (`kv_double`) for what no emulator does: injected 403s and
Secure Key Release, with tokens from the MAA stand-in (`maa`) verified and the policy evaluated.

AKS: the ARM agentPools stand-in (veil_standins.arm), always.
"""

from __future__ import annotations

import os
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from azure.keyvault.keys import KeyReleasePolicy, KeyType

from tests.unit.azure import lowkey
from veil.azure.credentials import AzureSettings
from veil.azure.keyvault import key_client
from veil_standins.arm import ArmDouble
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.maa import MaaStandIn
from veil_standins.release_signer import ReleaseSigner
from veil_standins.server import ServerThread
from veil_standins.tls import TlsFiles, make_tls

TOKEN = "veil-test-token"
_STATUS: list[str] = []


class LowkeyVaultUnavailableWarning(UserWarning):
    """Lowkey Vault could not be used; Key Vault tests ran against the Key Vault stand-in."""


@dataclass(frozen=True)
class KeyVaultBackend:
    kind: str  # "lowkey" or "double"
    url: str
    settings: AzureSettings
    unavailable_reason: str | None = None


@pytest.fixture(scope="session")
def azure_tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return make_tls(tmp_path_factory.mktemp("azure-tls"))


def serve_maa(maa: MaaStandIn, tls: TlsFiles) -> ServerThread:
    """Start `maa` over HTTPS on 127.0.0.1, its issuer the URL it is served at."""
    server = ServerThread(maa.app(), tls.server_context()).start()
    maa.issuer = server.url
    return server


@pytest.fixture(scope="session")
def maa(azure_tls: TlsFiles) -> Iterator[MaaStandIn]:
    """The attestation authority that release policies in these tests name."""
    authority = MaaStandIn()
    server = serve_maa(authority, azure_tls)
    try:
        yield authority
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kv_double(azure_tls: TlsFiles) -> Iterator[KeyVaultDouble]:
    assert azure_tls.ca is not None
    double = KeyVaultDouble(
        token=TOKEN,
        signer=ReleaseSigner.issued_by(azure_tls.ca, ["127.0.0.1"]),
        authority_trust=azure_tls.client_context(),
    )
    server = ServerThread(double.app(), azure_tls.server_context()).start()
    double.url = server.url
    try:
        yield double
    finally:
        server.stop()


@pytest.fixture(scope="session")
def kv_double_settings(azure_tls: TlsFiles) -> AzureSettings:
    """Emulator settings that verify the stand-in's certificate against the test CA."""
    return AzureSettings.for_emulator(TOKEN, connection_verify=str(azure_tls.ca_file))


def _probe(url: str, settings: AzureSettings) -> None:
    """Fail unless the vault can make what Secure Key Release needs."""
    client = key_client(url, settings)
    policy = (
        b'{"version":"1.0.0","anyOf":[{"authority":"https://probe.veil-test.invalid",'
        b'"allOf":[{"claim":"x-ms-attestation-type","equals":"sevsnpvm"}]}]}'
    )
    try:
        key = client.create_rsa_key(
            f"veil-probe-{uuid.uuid4().hex[:8]}",
            hardware_protected=True,
            exportable=True,
            release_policy=KeyReleasePolicy(policy, immutable=True),
        )
    except Exception as exc:
        raise lowkey.LowkeyUnavailableError(
            f"Lowkey Vault refused an exportable RSA-HSM key with a release policy: {exc}"
        ) from exc
    missing = []
    if key.key_type != KeyType.rsa_hsm:
        missing.append(f"RSA-HSM (got {key.key_type})")
    if not key.properties.exportable:
        missing.append("exportable keys")
    if key.properties.release_policy is None:
        missing.append("release policies")
    if missing:
        raise lowkey.LowkeyUnavailableError(f"Lowkey Vault lacks {', '.join(missing)}")


@pytest.fixture(scope="session")
def key_vault(
    kv_double: KeyVaultDouble,
    kv_double_settings: AzureSettings,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[KeyVaultBackend]:
    reason: str
    if os.environ.get("VEIL_KEY_VAULT_BACKEND", "") == "double":
        reason = "VEIL_KEY_VAULT_BACKEND=double"
    else:
        vault: lowkey.LowkeyVault | None = None
        try:
            jar = lowkey.fetch_jar()
            vault = lowkey.start(jar, tmp_path_factory.mktemp("lowkey-vault"))
            settings = AzureSettings.for_emulator(TOKEN, connection_verify=False)
            _probe(vault.url, settings)
        except lowkey.LowkeyUnavailableError as exc:
            if vault is not None:
                vault.stop()
            reason = str(exc)
        else:
            _STATUS.append(f"Key Vault tests ran against Lowkey Vault at {vault.url} ({jar.name})")
            try:
                yield KeyVaultBackend("lowkey", vault.url, settings)
            finally:
                vault.stop()
            return
        if os.environ.get("VEIL_REQUIRE_LOWKEY_VAULT", "") == "1":
            pytest.fail(f"VEIL_REQUIRE_LOWKEY_VAULT=1 but Lowkey Vault is unavailable: {reason}")
    message = (
        f"LOWKEY VAULT UNAVAILABLE — Key Vault tests ran against the Key Vault stand-in "
        f"instead: {reason}"
    )
    warnings.warn(LowkeyVaultUnavailableWarning(message), stacklevel=1)
    _STATUS.append(message)
    yield KeyVaultBackend("double", kv_double.url, kv_double_settings, reason)


@pytest.fixture(scope="session")
def arm_double(azure_tls: TlsFiles) -> Iterator[ArmDouble]:
    double = ArmDouble(token=TOKEN)
    server = ServerThread(double.app(), azure_tls.server_context()).start()
    double.url = server.url
    try:
        yield double
    finally:
        server.stop()


@pytest.fixture
def arm_settings(arm_double: ArmDouble, azure_tls: TlsFiles) -> AzureSettings:
    return AzureSettings.for_emulator(
        TOKEN, connection_verify=str(azure_tls.ca_file), arm_endpoint=arm_double.url
    )


@pytest.fixture
def key_name() -> str:
    return f"veil-{uuid.uuid4().hex[:12]}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for line in _STATUS:
        terminalreporter.write_line(f"azure: {line}", yellow="UNAVAILABLE" in line, bold=True)


def repo_root() -> Path:
    return lowkey.REPO
