"""Key versions over a model's life, on real pods with the node agent and the Key Vault
stand-in: a tightened release policy makes a new key version, the model keeps serving from the
version it is sealed to while status asks for a re-seal (with the command), and once it is
re-sealed and rolled out the old version is disabled, so nothing can release it any more."""

from __future__ import annotations

import copy
import os
from typing import Any

import pytest

from tests.cluster import demo
from tests.cluster.kube import apply, condition, get, wait_until
from tests.cluster.localenv import LocalEnvironment, example_overrides, load_yaml
from tests.e2e.conftest import repo_path
from veil.azure.credentials import AzureSettings
from veil.azure.keyvault import key_client, list_versions

NAMESPACE, MODEL = "veil-keys", "lifecycle"
NOT_DEBUGGABLE = {"claim": "x-ms-isolation-tee.x-ms-sevsnpvm-is-debuggable", "equals": False}


def _status(env: LocalEnvironment) -> dict[str, Any]:
    return dict(get(env.cluster, "confidentialmodel", MODEL, "-n", NAMESPACE))


def _wait(env: LocalEnvironment, what: str, test: Any, timeout: float = 300) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        model = _status(env)
        return model if test(model) else None

    return dict(wait_until(what, reached, timeout=timeout))


def _versions(env: LocalEnvironment, document: dict[str, Any]) -> dict[str, bool]:
    release = document["spec"]["keyRelease"]
    client = key_client(release["vaultUrl"], AzureSettings.from_env({**os.environ, **env.settings}))
    return {v.version: v.enabled for v in list_versions(client, release["keyName"])}


@pytest.mark.e2e
def test_a_policy_change_asks_for_a_reseal_then_retires_the_old_version(
    environment: LocalEnvironment,
) -> None:
    onnx = demo.breast_cancer_classifier().onnx
    environment.workload_namespace(NAMESPACE)
    [document] = load_yaml(repo_path("examples", "confidential-model-cvm", "model.yaml"))
    document = example_overrides(environment, document)
    document["metadata"] = {"name": MODEL, "namespace": NAMESPACE}
    document["spec"]["keyRelease"]["keyName"] = "lifecycle-model"
    uri, sha256 = environment.seal_model(document, onnx, f"models/{MODEL}-v1.onnx.sealed")
    document["spec"]["model"] = {"uri": uri, "sha256": sha256}
    apply(environment.cluster, document)
    first = _wait(
        environment,
        "the model Ready and sealed to the current version",
        lambda m: (
            condition(m, "Ready").get("status") == "True"
            and condition(m, "KeySealed").get("status") == "True"
        ),
    )
    v1 = first["status"]["keyVersion"]
    assert first["status"]["sealedKeyVersion"] == v1

    tightened = copy.deepcopy(document)
    tightened["spec"]["keyRelease"]["requiredClaims"] = [NOT_DEBUGGABLE]
    apply(environment.cluster, tightened)
    pending = _wait(
        environment,
        "a new key version and ResealRequired",
        lambda m: condition(m, "KeySealed").get("reason") == "ResealRequired",
    )
    v2 = pending["status"]["keyVersion"]
    assert v2 != v1
    assert pending["status"]["sealedKeyVersion"] == v1
    message = condition(pending, "KeySealed")["message"]
    assert f"--key-name lifecycle-model --key-version {v2}" in message
    assert condition(pending, "Ready")["reason"] == "ResealRequired"
    # Still served from the version it is sealed to, and that version is still releasable.
    assert condition(pending, "KeyReleased").get("status") == "True"
    assert _versions(environment, document) == {v1: True, v2: True}

    uri, sha256 = environment.seal_model(tightened, onnx, f"models/{MODEL}-v2.onnx.sealed")
    tightened["spec"]["model"] = {"uri": uri, "sha256": sha256}
    apply(environment.cluster, tightened)
    settled = _wait(
        environment,
        "the re-sealed model served and the old version retired",
        lambda m: (
            condition(m, "Ready").get("status") == "True"
            and m["status"].get("retiredKeyVersionsFor") == v2
        ),
    )
    assert settled["status"]["sealedKeyVersion"] == v2
    assert _versions(environment, document) == {v1: False, v2: True}
