"""One new key version at a time per model, across operators.

Key Vault has no conditional create: two operators that both read "no key" (two `--standalone`
operators, or a rolling update's overlap) would each make a version. So before it creates one,
an operator claims the creation on the ConfidentialModel itself: an annotation written with the
resourceVersion it read, which the API server refuses (409) if anyone wrote the model since.
The loser reads again and finds either the winner's claim (it waits) or the winner's key (it
creates nothing). A claim is only honoured for LEASE_SECONDS: an operator that died between
claiming and creating does not hold the key up for longer.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kubernetes.dynamic.exceptions import ConflictError

from veil import API_GROUP, API_VERSION
from veil.api.confidential_model import ConfidentialModel
from veil.kube import apply

ANNOTATION = f"{API_GROUP}/key-creation"
LEASE_SECONDS = 60.0
# This process: a pod's hostname is its name; the pid tells apart operators on one host.
IDENTITY = f"{socket.gethostname()}/{os.getpid()}"


class KeyCreationClaimedError(Exception):
    """Another operator is creating the key (or wrote the model meanwhile): check again later."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Claim:
    by: str
    policy_digest: str
    at: float

    @classmethod
    def read(cls, owner: Mapping[str, Any]) -> Claim | None:
        """The claim on the model, or None (absent or unreadable: a hand edit claims nothing)."""
        raw = ((owner.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION)
        try:
            found = json.loads(raw) if raw else None
            if not isinstance(found, dict):
                return None
            return cls(str(found["by"]), str(found["policyDigest"]), float(found["at"]))
        except (ValueError, KeyError, TypeError):
            return None

    def annotation(self) -> str:
        return json.dumps(
            {"by": self.by, "policyDigest": self.policy_digest, "at": round(self.at, 3)},
            separators=(",", ":"),
        )


def claim(
    owner: Mapping[str, Any],
    policy_digest: str,
    *,
    identity: str = IDENTITY,
    now: Callable[[], float] = time.time,
) -> None:
    """Claim the creation of the key version with this policy for `owner` (as read), or raise
    KeyCreationClaimedError. Blocking."""
    meta = owner["metadata"]
    held = Claim.read(owner)
    at = now()
    if held is not None and held.by != identity and held.policy_digest == policy_digest:
        left = held.at + LEASE_SECONDS - at
        if left > 0:
            raise KeyCreationClaimedError(
                f"another Veil operator ({held.by}) is creating this model's key version; "
                f"this one checks for it every few seconds, and takes over if its claim "
                f"lapses (in {max(1, round(left))} s)",
                retry_after=min(left, 5.0),
            )
    patch = {
        "metadata": {
            # The precondition: refused if the model changed since this reconcile read it.
            "resourceVersion": meta["resourceVersion"],
            "annotations": {ANNOTATION: Claim(identity, policy_digest, at).annotation()},
        }
    }
    try:
        written = apply.patch_object(
            f"{API_GROUP}/{API_VERSION}",
            ConfidentialModel.kind_name,
            meta["name"],
            meta["namespace"],
            patch,
        )
    except ConflictError:
        raise KeyCreationClaimedError(
            "the model changed while this operator was about to create its key version; "
            "it reads the model and the key again",
            retry_after=1.0,
        ) from None
    if not written:
        raise KeyCreationClaimedError("the model was deleted; no key is created", retry_after=5.0)
