"""A ConfidentialModel's DP training stage: claim, train in a Job, hand over the sealed model.

The claim follows the SyntheticDataset rule: Consumed before the Job exists (the Job reads
the dataset), never refunded afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from veil.api.confidential_model import ConfidentialModelSpec, SealedArtifact
from veil.artifacts import ArtifactError, read_bytes
from veil.conditions import Outcome
from veil.config import OperatorConfig
from veil.controllers.budget_store import BudgetRef, BudgetUnavailableError
from veil.controllers.reconcile import Result
from veil.kube import apply
from veil.kube.jobs import job_outcome
from veil.privacy import ClaimRequest, ConsumerRef, EpsilonDeltaMechanism, LedgerError
from veil.resources import training as build

PENDING_POLL_SECONDS = 30.0


def _pay(
    owner: Mapping[str, Any], spec: ConfidentialModelSpec, status: dict[str, Any]
) -> Result | None:
    from veil.controllers.privacy_budget import store

    training = spec.training
    assert training is not None
    meta = owner["metadata"]
    ref = BudgetRef(training.budget_ref.namespace or meta["namespace"], training.budget_ref.name)
    request = ClaimRequest(
        key=meta["uid"],
        consumer=ConsumerRef(
            kind="ConfidentialModel", namespace=meta["namespace"], name=meta["name"]
        ),
        # diffprivlib's models are pure ε; δ is charged as declared.
        mechanisms=(EpsilonDeltaMechanism(epsilon=training.epsilon, delta=training.delta),),
        attempt=int(meta.get("generation", 1)) - 1,
    )
    try:
        decision = store().claim(ref, request)
    except BudgetUnavailableError as missing:
        return Result(
            Outcome.failed("BudgetUnavailable", str(missing)), status=status, requeue_after=60
        )
    except LedgerError as conflict:
        return Result(Outcome.stalled_with("ClaimConflict", str(conflict)), status=status)
    status["claimState"] = decision.state
    if decision.state == "Pending":
        return Result(
            Outcome.progressing("AwaitingBudget", decision.reason),
            status=status,
            requeue_after=PENDING_POLL_SECONDS,
        )
    if decision.state in ("Denied", "Released"):
        return Result(Outcome.stalled_with("BudgetDenied", decision.reason), status=status)
    if decision.state == "Granted":
        store().consume(ref, decision.key)  # before the Job can read the data
        status["claimState"] = "Consumed"
    return None


def train(
    owner: Mapping[str, Any],
    spec: ConfidentialModelSpec,
    config: OperatorConfig,
    status: dict[str, Any],
) -> SealedArtifact | Result:
    """The trained, sealed model once the Job has produced it; until then, why not yet."""
    unpaid = _pay(owner, spec, status)
    if unpaid is not None:
        return unpaid
    meta = owner["metadata"]
    status["trainingJob"] = build.job_name(owner)
    apply.ensure(build.children(owner, spec, config))
    job = apply.get_object("batch/v1", "Job", build.job_name(owner), meta["namespace"])
    state, message = job_outcome(job)
    if state == "Failed":
        return Result(
            Outcome.stalled_with(
                "TrainingFailed", f"training Job failed: {message}; the budget stays spent"
            ),
            status=status,
        )
    if state != "Complete":
        return Result(
            Outcome.progressing("Training", f"Job {status['trainingJob']} is running"),
            status=status,
        )
    known = (owner.get("status") or {}).get("trainedModel")
    if known:
        artifact = SealedArtifact.model_validate(known)
    else:
        try:
            result = json.loads(read_bytes(build.result_uri(spec)))
        except (ArtifactError, OSError, ValueError) as missing:
            return Result(
                Outcome.failed(
                    "TrainingResultUnreadable",
                    f"the training Job finished but its result is unreadable: {missing}",
                ),
                status=status,
                requeue_after=60,
            )
        sealed = result.get("sealed") or {}
        assert spec.training is not None
        artifact = SealedArtifact(uri=spec.training.output_uri, sha256=str(sealed.get("sha256")))
    status["trainedModel"] = artifact.to_wire()
    return artifact
