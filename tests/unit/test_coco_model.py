"""A ConfidentialModel on Confidential Containers: its pods carry a Kata agent policy generated
from their own spec, the release policy pins that policy's digest, and the policy, evaluated by
regorus as the kata agent does, admits Veil's containers and nothing the host could change."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.resources.agent_requests import (
    SERVICE_ENV,
    agent_allows,
    bind,
    create_container,
    exec_process,
)
from veil.api.confidential_model import ConfidentialModel
from veil.azure.release_policy import build_release_policy
from veil.config import Images, OperatorConfig, image_configs
from veil.controllers.confidential_model import _measured_claims
from veil.resources import confidential_model as build
from veil.resources.kata_policy import POLICY_ANNOTATION, ImageConfig, KataPolicyError, from_rego

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "confidential-model-cvm" / "model.yaml"
RUNTIME = "ghcr.io/veil-dev/veil@sha256:" + "1" * 64
SKR = "mcr.microsoft.com/aci/skr@sha256:" + "2" * 64
RUNTIME_PATH = "PATH=/opt/veil-app/bin:/usr/local/bin:/usr/bin:/bin"
CONFIG = OperatorConfig(
    images=Images(runtime=RUNTIME, key_release=SKR),
    image_configs={
        RUNTIME: ImageConfig(entrypoint=("veil",), env=(RUNTIME_PATH,)),
        SKR: ImageConfig(entrypoint=("/skr.sh",)),
    },
)
SEALED_SOURCE = "/run/kata-containers/sandbox/local/sealed"
TMP_SOURCE = "/run/kata-containers/sandbox/ephemeral/tmp"


def _owner(**model: str) -> tuple[dict[str, Any], ConfidentialModel]:
    document = yaml.safe_load(EXAMPLE.read_text())
    document["metadata"].update(uid="00000000-1111-2222-3333-444444444444")
    document["spec"]["tee"] = {
        "isolation": "coco",
        "platform": "sevsnp",
        "runtimeClassName": "kata-qemu-snp",
    }
    document["spec"]["model"].update(model)
    return document, ConfidentialModel.model_validate(document)


def _template(owner: dict[str, Any], model: ConfidentialModel, config: OperatorConfig) -> Any:
    children = build.children(owner, model.spec, config)
    deployment = next(c for c in children.apply if c["kind"] == "Deployment")
    return deployment["spec"]["template"]


def _policy(template: Any) -> Any:
    rego = base64.b64decode(template["metadata"]["annotations"][POLICY_ANNOTATION]).decode()
    return from_rego(rego)


def _runtime_request(args: list[str], image: str = RUNTIME) -> dict[str, Any]:
    return create_container(
        name="runtime",
        image=image,
        args=["veil", *args],
        env=[RUNTIME_PATH, *SERVICE_ENV],
        namespace="veil-cvm",
        mounts=[
            bind("/var/run/veil/sealed", SEALED_SOURCE, read_only=True),
            bind("/tmp", TMP_SOURCE),
        ],
        storages=[
            {"driver": "image_guest_pull", "source": image, "mount_point": "/r/rootfs"},
            {"driver": "local", "source": "local", "mount_point": SEALED_SOURCE},
            {"driver": "ephemeral", "source": "tmpfs", "mount_point": TMP_SOURCE},
        ],
    )


def test_the_pods_carry_an_agent_policy_that_admits_veils_runtime_and_nothing_else() -> None:
    owner, model = _owner()
    template = _template(owner, model, CONFIG)
    assert template["spec"]["runtimeClassName"] == "kata-qemu-snp"
    policy = _policy(template)
    args = template["spec"]["containers"][0]["args"]
    assert agent_allows(policy, "CreateContainerRequest", _runtime_request(args))
    other_image = "ghcr.io/attacker/veil@sha256:" + "3" * 64
    assert not agent_allows(policy, "CreateContainerRequest", _runtime_request(args, other_image))
    # The host cannot turn the key source into a debugging key file.
    debug = [*args, "--private-key", "/tmp/key.pem"]
    assert not agent_allows(policy, "CreateContainerRequest", _runtime_request(debug))
    assert not agent_allows(policy, "ExecProcessRequest", exec_process("runtime-cid", ["sh"]))


def test_the_release_policy_pins_the_agent_policys_digest() -> None:
    owner, model = _owner()
    measured = _measured_claims(owner, model.spec, CONFIG)
    assert measured is not None
    digest = hashlib.sha256(_policy(_template(owner, model, CONFIG)).rego.encode()).hexdigest()
    assert measured["x-ms-sevsnpvm-hostdata"] == digest
    assert measured["x-ms-sevsnpvm-is-debuggable"] is False
    claims = {
        c["claim"]: c["equals"]
        for c in build_release_policy(model.spec, measured)["anyOf"][0]["allOf"]
    }
    assert claims["x-ms-sevsnpvm-hostdata"] == digest


def test_a_re_sealed_model_keeps_the_measurement_and_another_runtime_does_not() -> None:
    """The sealed file's digest depends on the key version, so the measurement must not pin it
    (else every re-seal would need a new version); which code runs is pinned."""
    owner, model = _owner()
    before = _measured_claims(owner, model.spec, CONFIG)
    resealed_owner, resealed = _owner(sha256="ab" * 32, uri="az://veildemo/models/v2.onnx.sealed")
    assert _measured_claims(resealed_owner, resealed.spec, CONFIG) == before
    other = dataclasses.replace(
        CONFIG,
        images=Images(runtime="ghcr.io/veil-dev/veil@sha256:" + "4" * 64, key_release=SKR),
        image_configs={
            **CONFIG.image_configs,
            "ghcr.io/veil-dev/veil@sha256:" + "4" * 64: ImageConfig(
                entrypoint=("veil",), env=(RUNTIME_PATH,)
            ),
        },
    )
    assert _measured_claims(owner, model.spec, other) != before


def test_pods_that_cannot_be_pinned_are_refused() -> None:
    owner, model = _owner()
    with pytest.raises(KataPolicyError, match="not pinned by digest"):
        build.children(owner, model.spec, OperatorConfig())
    without_configs = dataclasses.replace(CONFIG, image_configs={})
    with pytest.raises(KataPolicyError, match="no ImageConfig"):
        _measured_claims(owner, model.spec, without_configs)


def test_image_configs_are_read_as_the_chart_writes_them() -> None:
    configs = image_configs(
        '{"r@sha256:' + "1" * 64 + '": {"entrypoint": ["veil"], "env": ["A=1"], "workingDir": "/"}}'
    )
    assert configs == {
        "r@sha256:" + "1" * 64: ImageConfig(entrypoint=("veil",), env=("A=1",), working_dir="/")
    }
    assert image_configs("") == {}
    for bad, named in (("[]", "map image"), ('{"r": {"env": "A=1"}}', "env must be a list")):
        with pytest.raises(ValueError, match=named):
            image_configs(bad)
