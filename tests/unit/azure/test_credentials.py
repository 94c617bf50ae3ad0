"""AzureSettings from the environment, and the test-only static-token credential."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from azure.identity import DefaultAzureCredential

from tests.unit.azure.conftest import TOKEN
from tests.unit.azure.test_release_policy import spec
from veil.api.confidential_model import NodePool
from veil.azure.credentials import (
    DEFAULT_TIMEOUT_SECONDS,
    AzureSettings,
    StaticTokenCredential,
)
from veil.azure.keyvault import ensure_release_key, key_client
from veil.azure.node_pools import container_service_client, ensure_confidential_pool
from veil.azure.release_policy import release_policy
from veil_standins.arm import ArmDouble
from veil_standins.keyvault import KeyVaultDouble
from veil_standins.tls import TlsFiles


def test_production_uses_default_azure_credential_and_verifies_tls() -> None:
    settings = AzureSettings.from_env({})
    assert isinstance(settings.credential, DefaultAzureCredential)
    assert settings.connection_verify is True
    assert settings.verify_challenge_resource is True
    assert settings.arm_endpoint is None
    assert not settings.emulator


def test_a_ca_bundle_is_trusted(tmp_path: Path) -> None:
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    settings = AzureSettings.from_env({"VEIL_AZURE_CA_BUNDLE": str(bundle)})
    assert settings.connection_verify == str(bundle)
    assert settings.client_kwargs() == {
        "connection_verify": str(bundle),
        "connection_timeout": 30.0,
        "read_timeout": 30.0,
    }


def test_azure_requests_time_out_after_30_s_unless_told() -> None:
    """A hung Azure service holds a reconcile worker for 30 s, not azure-core's 300 s."""
    for settings in (
        AzureSettings.from_env({}),
        AzureSettings.from_env({"VEIL_AZURE_STATIC_TOKEN": "t", "VEIL_AZURE_TIMEOUT_SECONDS": ""}),
        AzureSettings.for_emulator(),
    ):
        assert settings.timeout_seconds == DEFAULT_TIMEOUT_SECONDS == 30.0
        kwargs = settings.client_kwargs()
        assert (kwargs["connection_timeout"], kwargs["read_timeout"]) == (30.0, 30.0)
    told = AzureSettings.from_env({"VEIL_AZURE_TIMEOUT_SECONDS": "2.5"})
    assert (told.client_kwargs()["connection_timeout"], told.client_kwargs()["read_timeout"]) == (
        2.5,
        2.5,
    )
    for bad in ("0", "-1", "nan", "soon"):
        with pytest.raises(ValueError, match="positive number of seconds"):
            AzureSettings.from_env({"VEIL_AZURE_TIMEOUT_SECONDS": bad})


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"VEIL_AZURE_INSECURE_SKIP_TLS_VERIFY": "true"}, "local emulators only"),
        ({"VEIL_AZURE_CA_BUNDLE": "/nonexistent/ca.pem"}, "not a readable file"),
        ({"VEIL_AZURE_ARM_ENDPOINT": "http://127.0.0.1:1"}, "must be an https URL"),
    ],
)
def test_unsafe_or_broken_settings_are_refused(env: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AzureSettings.from_env(env)


def test_static_token_is_test_only_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    settings = AzureSettings.from_env(
        {"VEIL_AZURE_STATIC_TOKEN": "t0k", "VEIL_AZURE_INSECURE_SKIP_TLS_VERIFY": "1"}
    )
    assert isinstance(settings.credential, StaticTokenCredential)
    assert settings.emulator
    assert settings.connection_verify is False
    assert settings.verify_challenge_resource is False
    assert "TEST ONLY" in caplog.text


def test_static_token_credential() -> None:
    credential = StaticTokenCredential("abc", lifetime_seconds=60)
    token = credential.get_token("https://vault.azure.net/.default", tenant_id="t")
    info = credential.get_token_info("https://management.azure.com/.default")
    assert token.token == info.token == "abc"
    assert token.expires_on > 0
    with credential:
        pass
    with pytest.raises(ValueError, match="must not be empty"):
        StaticTokenCredential("")


def test_settings_from_env_drive_both_real_clients(
    azure_tls: TlsFiles, kv_double: KeyVaultDouble, arm_double: ArmDouble
) -> None:
    """The documented environment variables are enough to reach the doubles with the real
    SDKs, TLS verified against the given CA bundle."""
    settings = AzureSettings.from_env(
        {
            "VEIL_AZURE_STATIC_TOKEN": TOKEN,
            "VEIL_AZURE_CA_BUNDLE": str(azure_tls.ca_file),
            "VEIL_AZURE_ARM_ENDPOINT": arm_double.url,
        }
    )
    name = f"veil-{uuid.uuid4().hex[:12]}"
    policy = release_policy(spec()).canonical
    state = ensure_release_key(key_client(kv_double.url, settings), name, policy)
    assert state.created

    cluster = f"aks-{uuid.uuid4().hex[:8]}"
    arm_double.add_cluster("sub", "rg", cluster)
    pool = NodePool(
        subscription_id="sub",
        resource_group="rg",
        cluster_name=cluster,
        name="cvm",
        vm_size="Standard_EC8es_v5",
    )
    pool_state = ensure_confidential_pool(container_service_client("sub", settings), pool)
    assert (pool_state.platform, pool_state.changed) == ("tdx", True)
