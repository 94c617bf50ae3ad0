"""A ConfidentialModel's key versions over time. Pure functions.

A changed release policy makes a new key version (Key Vault's immutable policies cannot be
edited), but a sealed model's data key stays wrapped to the version it was sealed to. So:

- the pods release the version their sealed header names (the fetch step reports it);
- while the serving pods' model is sealed to an older version, status says the model must be
  re-sealed, with the command, and serving goes on under the old version's policy;
- once every serving pod is sealed to the current version and the rollout is done, nothing
  serves from the other versions any more: they are disabled (kept, for audit and recovery).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from veil import labels
from veil.api.confidential_model import ConfidentialModelSpec
from veil.conditions import Outcome
from veil.controllers.model_status import Condition
from veil.runtime.sealed_key import SealedKey

FETCH_CONTAINER = "fetch-sealed-model"


def _fetch_message(pod: Mapping[str, Any]) -> str | None:
    for status in (pod.get("status") or {}).get("initContainerStatuses") or []:
        if status.get("name") != FETCH_CONTAINER:
            continue
        for state in (status.get("state"), status.get("lastState")):
            terminated = (state or {}).get("terminated") or {}
            if terminated.get("exitCode") == 0 and terminated.get("message"):
                return str(terminated["message"])
    return None


def sealed_keys(pods: Sequence[Mapping[str, Any]], model_sha256: str) -> list[SealedKey]:
    """What the fetch step of each live pod of the current model reported; pods of an older
    model (a rollout in progress) do not count."""
    found = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        if (meta.get("annotations") or {}).get(labels.MODEL_DIGEST) != model_sha256:
            continue
        message = _fetch_message(pod)
        sealed = SealedKey.from_report(message) if message else None
        if sealed is not None:
            found.append(sealed)
    return found


@dataclass(frozen=True)
class KeyAssessment:
    condition: Condition
    sealed_version: str | None = None
    # Ready's outcome when the key situation overrides the rollout's (a re-seal is due).
    outcome: Outcome | None = None
    # Every version but the current one may be disabled.
    retire: bool = False


def _reseal_command(spec: ConfidentialModelSpec, version: str) -> str:
    release = spec.key_release
    return (
        f"veil seal model.onnx model.onnx.sealed --vault-url {release.vault_url} "
        f"--key-name {release.key_name} --key-version {version}"
    )


def assess(
    spec: ConfidentialModelSpec,
    current_version: str,
    sealed: Sequence[SealedKey],
    *,
    rolled_out: bool,
) -> KeyAssessment:
    """Compare what the serving pods are sealed to with the version in force."""
    name = spec.key_release.key_vault().key_name
    if not sealed:
        return KeyAssessment(
            ("KeySealed", "Unknown", "AwaitingFetch", "no pod fetched the model yet")
        )
    vault_host = spec.key_release.key_vault().vault_url.split("://", 1)[-1].rstrip("/").lower()
    foreign = [
        s
        for s in sealed
        if s.key_name is not None and (s.key_name, s.vault_host) != (name, vault_host)
    ]
    if foreign:
        message = (
            f"The model is sealed to {foreign[0].key_id}, not to key {name} of this vault, so "
            f"no pod can release its key. Re-seal it: {_reseal_command(spec, current_version)}."
        )
        return KeyAssessment(
            ("KeySealed", "False", "SealedToOtherKey", message),
            outcome=Outcome.stalled_with("SealedToOtherKey", message),
        )
    versions = {s.version for s in sealed}
    if None in versions:
        return KeyAssessment(
            (
                "KeySealed",
                "Unknown",
                "SealedWithoutKeyVersion",
                "The sealed header names no key version (sealed to a public key without "
                "--key-id), so Veil cannot tell when older versions are unused; re-seal "
                f"with {_reseal_command(spec, current_version)}.",
            )
        )
    if versions == {current_version}:
        return KeyAssessment(
            (
                "KeySealed",
                "True",
                "SealedToCurrentVersion",
                f"sealed to {name} version {current_version}, which carries the policy in force",
            ),
            sealed_version=current_version,
            retire=rolled_out,
        )
    old = sorted(v for v in versions if v is not None and v != current_version)[0]
    message = (
        f"The release policy changed: key {name} version {current_version} carries it, but the "
        f"model is sealed to version {old} and is still served under the old policy. Re-seal "
        f"with `{_reseal_command(spec, current_version)}`, upload it and update "
        "spec.model.uri and spec.model.sha256."
    )
    return KeyAssessment(
        ("KeySealed", "False", "ResealRequired", message),
        sealed_version=old,
        outcome=Outcome.stalled_with("ResealRequired", message),
    )
