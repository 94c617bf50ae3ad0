"""A ConfidentialModel's DP training stage: claim, train in a Job, hand over the sealed model.

The claim follows the SyntheticDataset rule: Consumed before the Job exists (the Job reads
the dataset), never refunded afterwards. It names the dataset (a budget pays only for its own)
and carries every mechanism the run spends (`veil.training.claim`, which the trainer's result
reports too). Only the sealed model's digest is taken from the Job's result into the status.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from veil import API_GROUP, API_VERSION, events
from veil.api.confidential_model import ConfidentialModelSpec, SealedArtifact
from veil.artifacts import ArtifactError, read_bytes
from veil.conditions import Outcome
from veil.config import OperatorConfig
from veil.controllers.budget_store import BudgetRef
from veil.controllers.payment import pay_before_reading
from veil.controllers.reconcile import Result, first_line
from veil.kube import apply
from veil.kube.jobs import job_outcome
from veil.privacy import ClaimRequest, ConsumerRef
from veil.resources import training as build
from veil.resources.common import selector_labels
from veil.training.claim import mechanisms

RESUME = {"spec": {"suspend": False}}


def _pay(
    owner: Mapping[str, Any], spec: ConfidentialModelSpec, run: str, status: dict[str, Any]
) -> Result | None:
    training = spec.training
    assert training is not None
    meta = owner["metadata"]
    ref = BudgetRef(training.budget_ref.namespace or meta["namespace"], training.budget_ref.name)
    request = ClaimRequest(
        # One claim per run: retraining is a new computation on the data, paid anew.
        key=f"{meta['uid']}.{run}",
        consumer=ConsumerRef(
            kind="ConfidentialModel", namespace=meta["namespace"], name=meta["name"]
        ),
        # Everything the run spends, as the trainer reports it: the fit, then the evaluation.
        mechanisms=mechanisms(training.epsilon, training.evaluation_epsilon, training.delta),
        attempt=int(meta.get("generation", 1)) - 1,
        # The budget pays only for its own dataset.
        dataset=training.dataset_uri,
    )
    unpaid = pay_before_reading(ref, request, status)
    previous = owner.get("status") or {}
    before = previous.get("claimState") if previous.get("trainingRun") == run else None
    events.claim_state_changed(
        owner, before, status.get("claimState"), f"{ref.namespace}/{ref.name}"
    )
    return unpaid


def _remove_other_runs(owner: Mapping[str, Any], current_job: str) -> None:
    """Jobs of earlier runs go (their claims stay spent: they could read the data)."""
    meta = owner["metadata"]
    jobs = apply.list_objects(
        "batch/v1", "Job", meta["namespace"], selector_labels(owner, build.APP)
    )
    stale = [j["metadata"]["name"] for j in jobs if j["metadata"]["name"] != current_job]
    apply.ensure_absent(
        [("batch/v1", "Job", name) for name in stale],
        meta["namespace"],
        meta["uid"],
        propagation="Background",
    )


def train(
    owner: Mapping[str, Any],
    spec: ConfidentialModelSpec,
    config: OperatorConfig,
    status: dict[str, Any],
) -> SealedArtifact | Result:
    """The trained, sealed model once the Job has produced it; until then, why not yet."""
    run, job_name = build.run_id(spec), build.job_name(owner, spec)
    previous = owner.get("status") or {}
    this_run_before = previous.get("trainingRun") == run
    status["trainingRun"] = run
    if this_run_before and previous.get("trainedModel"):
        # Done: the Job is never made again, since a second run would read the data again
        # on the same claim. The budget is not asked either (the claim may be folded away).
        return SealedArtifact.model_validate(previous["trainedModel"])
    # Until this run has made them (a merge patch would otherwise keep an earlier run's).
    status.update(trainedModel=None, trainingJob=None)
    unpaid = _pay(owner, spec, run, status)
    if unpaid is not None:
        return unpaid
    _remove_other_runs(owner, job_name)
    if this_run_before and previous.get("trainingJob") == job_name:
        job = _recorded_job(owner, job_name)
        if job is None:
            status["trainingJob"] = job_name  # still the run's Job: this verdict must hold
            return Result(
                Outcome.stalled_with(
                    "TrainingJobLost",
                    f"Job {job_name} was deleted before it finished; it may have read the data, "
                    "so it is not run again on the same claim: raise spec.training.round to "
                    "train again, paid anew",
                ),
                status=status,
            )
    else:
        job = _start_job(owner, spec, config, run, job_name)
    status["trainingJob"] = job_name
    trained = _trained(job, job_name, spec, status)
    if isinstance(trained, SealedArtifact):
        events.normal(
            owner,
            "TrainingJobSucceeded",
            f"Job {job_name} trained and sealed the model (sha256 {trained.sha256})",
            action="FinishJob",
        )
    return trained


def _start_job(
    owner: Mapping[str, Any],
    spec: ConfidentialModelSpec,
    config: OperatorConfig,
    run: str,
    job_name: str,
) -> dict[str, Any] | None:
    """Create the run's Job suspended (no pod, so it cannot read), record it, then let it run.

    Once `status.trainingJob` names it, no pass creates it again (`_recorded_job`): a Job
    deleted after that is lost, never rerun on the same claim. A crash before the record
    leaves at most a suspended Job, which the next pass records and resumes.
    """
    meta = owner["metadata"]
    live = apply.get_object("batch/v1", "Job", job_name, meta["namespace"])
    created = False
    if live is None or (live.get("spec") or {}).get("suspend"):
        report = apply.ensure(build.children(owner, spec, config, suspended=True))
        created = f"Job/{job_name}" in report.created
    apply.patch_status(
        f"{API_GROUP}/{API_VERSION}",
        owner["kind"],
        meta["name"],
        meta["namespace"],
        {"trainingRun": run, "trainingJob": job_name, "claimState": "Consumed"},
    )
    if created:
        events.normal(
            owner,
            "TrainingJobCreated",
            f"Created Job {job_name} to train the model (run {run}); its budget claim is consumed",
            action="StartJob",
        )
    return _recorded_job(owner, job_name)


def _recorded_job(owner: Mapping[str, Any], job_name: str) -> dict[str, Any] | None:
    """The recorded run's Job, let run if still suspended; None once it is gone (only ever
    patched, never created: a merge patch of a deleted Job makes nothing)."""
    namespace = owner["metadata"]["namespace"]
    job = apply.get_object("batch/v1", "Job", job_name, namespace)
    if job is not None and (job.get("spec") or {}).get("suspend"):
        if not apply.patch_object("batch/v1", "Job", job_name, namespace, RESUME):
            return None
        job = apply.get_object("batch/v1", "Job", job_name, namespace)
    return job


def _trained(
    job: Mapping[str, Any] | None,
    job_name: str,
    spec: ConfidentialModelSpec,
    status: dict[str, Any],
) -> SealedArtifact | Result:
    """What the run's Job has come to: the sealed model, or why not (yet)."""
    state, message = job_outcome(job)
    if state == "Failed":
        return Result(
            Outcome.stalled_with(
                "TrainingFailed",
                f"training Job failed: {message}; the budget stays spent (raise "
                "spec.training.round to try again, paid anew)",
            ),
            status=status,
        )
    if state != "Complete":
        return Result(Outcome.progressing("Training", f"Job {job_name} is running"), status=status)
    try:
        result = json.loads(read_bytes(build.result_uri(spec)))
    except (ArtifactError, OSError, ValueError) as missing:
        return Result(
            Outcome.failed(
                "TrainingResultUnreadable",
                f"The training Job {job_name} finished but its result is unreadable "
                f"({first_line(str(missing))}); Veil retries every minute.",
            ),
            status=status,
            requeue_after=60,
            detail=str(missing),
        )
    sealed = result.get("sealed") or {}
    assert spec.training is not None
    artifact = SealedArtifact(uri=spec.training.output_uri, sha256=str(sealed.get("sha256")))
    status["trainedModel"] = artifact.to_wire()
    return artifact
