"""Key versions over a model's life: what the pods' fetch step reports decides whether a re-seal
is due and when the other versions may be disabled."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from veil.api.confidential_model import ConfidentialModel, ConfidentialModelSpec
from veil.controllers.key_lifecycle import assess, sealed_keys
from veil.runtime.sealed_key import SealedKey

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "confidential-model-cvm" / "model.yaml"
SHA = "ab" * 32


def _spec() -> ConfidentialModelSpec:
    return ConfidentialModel.model_validate(yaml.safe_load(EXAMPLE.read_text())).spec


def _kid(version: str, name: str = "cancer-classifier") -> str:
    return f"https://veil-demo.vault.azure.net/keys/{name}/{version}"


def _pod(
    message: str | None, *, sha: str = SHA, deleting: bool = False, exit_code: int = 0
) -> dict[str, Any]:
    meta: dict[str, Any] = {"annotations": {"veil.dev/model-sha256": sha}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    terminated = {"exitCode": exit_code, **({"message": message} if message else {})}
    return {
        "metadata": meta,
        "status": {
            "initContainerStatuses": [
                {"name": "fetch-sealed-model", "state": {"terminated": terminated}}
            ]
        },
    }


def _report(version: str, name: str = "cancer-classifier") -> str:
    return SealedKey.parse(_kid(version, name), "thumb").report()


def test_only_live_pods_of_the_current_model_count() -> None:
    pods = [
        _pod(_report("v2")),
        _pod(_report("v1"), sha="cd" * 32),  # the previous model, still rolling out
        _pod(_report("v1"), deleting=True),
        _pod(None),  # fetch still running
        _pod(_report("v1"), exit_code=1),
    ]
    assert [s.version for s in sealed_keys(pods, SHA)] == ["v2"]


def test_sealed_to_the_current_version_retires_the_others_once_rolled_out() -> None:
    sealed = [SealedKey.parse(_kid("v2"))]
    settled = assess(_spec(), "v2", sealed, rolled_out=True)
    assert settled.condition[:3] == ("KeySealed", "True", "SealedToCurrentVersion")
    assert (settled.retire, settled.sealed_version, settled.outcome) == (True, "v2", None)
    assert not assess(_spec(), "v2", sealed, rolled_out=False).retire


def test_a_policy_change_asks_for_a_reseal_with_the_command_and_retires_nothing() -> None:
    sealed = [SealedKey.parse(_kid("v1"))]
    pending = assess(_spec(), "v2", sealed, rolled_out=True)
    kind, status, reason, message = pending.condition
    assert (kind, status, reason) == ("KeySealed", "False", "ResealRequired")
    assert "--key-name cancer-classifier --key-version v2" in message
    assert "veil seal" in message
    assert "spec.model.sha256" in message
    assert pending.sealed_version == "v1"
    assert not pending.retire
    assert pending.outcome is not None
    assert pending.outcome.stalled
    assert message.count(". ") <= 2  # one or two sentences


def test_a_model_sealed_to_another_key_is_stalled() -> None:
    other = assess(_spec(), "v2", [SealedKey.parse(_kid("v2", "someone-else"))], rolled_out=True)
    assert other.condition[2] == "SealedToOtherKey"
    assert not other.retire
    assert other.outcome is not None
    assert other.outcome.reason == "SealedToOtherKey"


def test_without_reports_or_versions_nothing_is_retired() -> None:
    assert assess(_spec(), "v2", [], rolled_out=True).condition[2] == "AwaitingFetch"
    unversioned = assess(_spec(), "v2", [SealedKey.parse("thumbprint:x", "x")], rolled_out=True)
    assert unversioned.condition[2] == "SealedWithoutKeyVersion"
    assert not unversioned.retire
