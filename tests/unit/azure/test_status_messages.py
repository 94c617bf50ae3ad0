"""A condition message is one or two sentences a person acts on: what failed, on which
resource, what to do. The whole error text (a DefaultAzureCredential chain runs to dozens of
lines) goes to the log and the object's events, never into status."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from azure.core.exceptions import ClientAuthenticationError

from veil.api.confidential_model import ConfidentialModel, NodePool
from veil.azure import KeyVaultError, NodePoolError
from veil.azure.credentials import AzureSettings
from veil.azure.keyvault import ensure_release_key, key_client
from veil.azure.node_pools import container_service_client, ensure_confidential_pool
from veil.config import OperatorConfig
from veil.controllers import confidential_model
from veil.controllers import synthetic_dataset as synthetic_controller
from veil.controllers.reconcile import Result
from veil.resources.confidential_model import KeyRef
from veil_standins.arm import ArmDouble
from veil_standins.keyvault import KeyVaultDouble

REPO = Path(__file__).resolve().parents[3]
POLICY = b'{"version":"1.0.0","anyOf":[{"authority":"https://a","allOf":[]}]}'
STATUS_LIMIT = 600  # characters: two sentences and a short cause


def _person_readable(message: str) -> None:
    assert "\n" not in message, message
    assert len(message) <= STATUS_LIMIT, message
    assert "Attempted credentials" not in message
    assert "Traceback" not in message


@pytest.fixture
def chain_settings(monkeypatch: pytest.MonkeyPatch, kv_double_settings: AzureSettings) -> Any:
    """The real DefaultAzureCredential where no credential is available (no managed identity
    probe: nothing here answers it): it fails with its whole chain, as in a mis-set cluster."""
    from azure.identity import DefaultAzureCredential

    for name in list(os.environ):
        if name.startswith(("AZURE_", "IDENTITY_", "MSI_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("PATH", "/nonexistent")  # no az, azd or pwsh to ask
    credential = DefaultAzureCredential(exclude_managed_identity_credential=True)
    return dataclasses.replace(kv_double_settings, credential=credential)


def test_a_credential_chain_failure_is_one_line_with_the_chain_as_detail(
    kv_double: KeyVaultDouble, chain_settings: AzureSettings, key_name: str
) -> None:
    with pytest.raises(KeyVaultError) as refused:
        ensure_release_key(key_client(kv_double.url, chain_settings), key_name, POLICY)
    message = str(refused.value)
    _person_readable(message)
    assert "did not accept the operator's credentials" in message
    assert "workload identity" in message
    assert "DefaultAzureCredential" in message  # the chain's first line, as the cause
    assert "Attempted credentials" in refused.value.detail
    assert len(refused.value.detail.splitlines()) > 3


def test_an_arm_credential_failure_keeps_the_chain_out_of_the_message(
    arm_double: ArmDouble, arm_settings: AzureSettings
) -> None:
    chain = "DefaultAzureCredential failed to retrieve a token.\nAttempted credentials:\n" + (
        "\tSomeCredential: unavailable. Visit https://aka.ms/troubleshoot\n" * 12
    )

    class Refusing:
        def get_token(self, *_: Any, **__: Any) -> Any:
            raise ClientAuthenticationError(message=chain)

        def get_token_info(self, *_: Any, **__: Any) -> Any:
            raise ClientAuthenticationError(message=chain)

    settings = dataclasses.replace(arm_settings, credential=Refusing())
    pool = NodePool.model_validate(
        {
            "subscriptionId": "00000000-0000-0000-0000-000000000000",
            "resourceGroup": "rg",
            "clusterName": "aks",
            "name": "cvmpool",
            "vmSize": "Standard_DC4as_v5",
            "count": 1,
        }
    )
    with pytest.raises(NodePoolError) as refused:
        ensure_confidential_pool(container_service_client(pool.subscription_id, settings), pool)
    _person_readable(str(refused.value))
    assert "Check the workload identity" in str(refused.value)
    assert refused.value.detail.count("SomeCredential") == 12


def _model() -> tuple[dict[str, Any], Any]:
    document = yaml.safe_load(
        (REPO / "examples" / "confidential-model-cvm" / "model.yaml").read_text()
    )
    document["metadata"]["uid"] = "00000000-1111-2222-3333-444444444444"
    return document, ConfidentialModel.model_validate(document).spec


def test_the_models_key_condition_is_short_and_the_event_gets_the_detail() -> None:
    owner, spec = _model()
    chain = "first line of the refusal\n" + "a line of the chain\n" * 40

    def refuse(*_: Any) -> KeyRef:
        raise KeyVaultError("Key Vault did not accept the operator's credentials.", detail=chain)

    never = cast(Any, refuse)
    ports = confidential_model.Ports(refuse, never, never, OperatorConfig(), never)
    result = confidential_model._ensure_key(owner, spec, ports, {})
    assert isinstance(result, Result)
    for _, _, _, message in result.conditions:
        _person_readable(message)
    _person_readable(result.outcome.message)
    assert result.detail == chain


def test_an_unreadable_report_says_what_to_expect_in_one_line(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from veil.api.synthetic_dataset import SyntheticDatasetSpec
    from veil.artifacts import ArtifactError

    document = yaml.safe_load((REPO / "examples" / "synthetic-data" / "synthetic.yaml").read_text())
    spec = SyntheticDatasetSpec.model_validate(document["spec"])
    sdk_text = "could not read az://a/b: (AuthorizationFailure) denied\nCode: x\nMessage: " + (
        "y" * 900
    )

    def unreadable(_: str) -> bytes:
        raise ArtifactError(sdk_text)

    monkeypatch.setattr(synthetic_controller, "read_bytes", unreadable)
    result = synthetic_controller._finished(spec, {"jobName": "j"})
    _person_readable(result.outcome.message)
    assert "retries" in result.outcome.message
    assert result.detail == sdk_text
