"""A ConfidentialModel's DP training stage: claim, train in a Job, hand over the sealed model.

The claim follows the SyntheticDataset rule: Consumed before the Job exists (the Job reads
the dataset), never refunded afterwards. It names the dataset (a budget pays only for its own)
and carries every mechanism the run spends (`veil.training.claim`, which the trainer's result
reports too; for DP-SGD, the event planned from the spec by `veil.training.options`, as the
trainer plans it). Only the sealed model's digest is taken from the Job's result into the
status. With `workers` > 1 the workload is a Kubeflow PyTorchJob, made, recorded and resumed
the same way; when the cluster does not serve that kind, nothing is claimed.
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
from veil.training import options
from veil.training.claim import mechanisms


def workload_outcome(workload: Mapping[str, Any] | None) -> tuple[str, str]:
    """A Job's or a PyTorchJob's outcome, as `job_outcome` words it (a PyTorchJob that
    succeeded is Complete)."""
    if workload is None or workload.get("kind") != build.PYTORCH_JOB[1]:
        return job_outcome(workload)
    for condition in (workload.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in ("Succeeded", "Failed"):
            state = "Complete" if condition["type"] == "Succeeded" else "Failed"
            return state, condition.get("message") or condition.get("reason", "")
    return "Running", ""


def _pay(
    owner: Mapping[str, Any],
    spec: ConfidentialModelSpec,
    run: str,
    status: dict[str, Any],
) -> Result | None:
    training = spec.training
    assert training is not None
    plan = options.spec_plan(training)  # checked by `_refusal` before
    meta = owner["metadata"]
    ref = BudgetRef(training.budget_ref.namespace or meta["namespace"], training.budget_ref.name)
    request = ClaimRequest(
        # One claim per run: retraining is a new computation on the data, paid anew.
        key=f"{meta['uid']}.{run}",
        consumer=ConsumerRef(
            kind="ConfidentialModel", namespace=meta["namespace"], name=meta["name"]
        ),
        # Everything the run spends, as the trainer reports it: the fit (for DP-SGD the
        # event the trainer plans from the same settings), then the evaluation.
        mechanisms=mechanisms(
            training.epsilon, training.evaluation_epsilon, training.delta, dpsgd=plan
        ),
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
    """Workloads of earlier runs go (their claims stay spent: they could read the data)."""
    meta = owner["metadata"]
    stale: list[tuple[str, str, str]] = []
    for api_version, kind in (build.JOB, build.PYTORCH_JOB):
        try:
            found = apply.list_objects(
                api_version, kind, meta["namespace"], selector_labels(owner, build.APP)
            )
        except apply.KindNotInstalledError:
            continue  # no training operator: no PyTorchJob of an earlier run either
        stale += [
            (api_version, kind, w["metadata"]["name"])
            for w in found
            if w["metadata"]["name"] != current_job
        ]
    apply.ensure_absent(stale, meta["namespace"], meta["uid"], propagation="Background")


def _refusal(
    owner: Mapping[str, Any], spec: ConfidentialModelSpec, config: OperatorConfig, job_name: str
) -> Result | None:
    """Why the run cannot start, if it cannot: no image to train it with, a DP-SGD plan that
    cannot be met, or a PyTorchJob the cluster does not serve. All found before any claim."""
    assert spec.training is not None
    if build.trainer_image(spec, config) is None:
        return Result(
            Outcome.stalled_with(
                "TrainerImageNotConfigured",
                f"spec.training.family {spec.training.family} trains with torch and Opacus, "
                "which the runtime image lacks: set the chart's runtime.trainerImage (the "
                "Dockerfile's trainer target, by digest); nothing was claimed.",
            )
        )
    try:
        options.spec_plan(spec.training)
    except ValueError as bad:
        return Result(
            Outcome.stalled_with(
                "TrainingSpecInvalid", f"spec.training cannot be trained as asked: {bad}"
            )
        )
    api_version, kind = build.workload_kind(spec)
    if kind == build.PYTORCH_JOB[1]:
        try:
            apply.get_object(api_version, kind, job_name, owner["metadata"]["namespace"])
        except apply.KindNotInstalledError:
            return Result(
                Outcome.stalled_with(
                    "TrainingOperatorNotInstalled",
                    f"spec.training.workers {spec.training.workers} needs Kubeflow's "
                    f"{kind} ({api_version}), which this cluster does not serve: install the "
                    "Kubeflow training operator, or set workers to 1.",
                ),
                requeue_after=60,  # installing the training operator is all it takes
            )
    return None


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
    refused = _refusal(owner, spec, config, job_name)
    if refused is not None:
        refused.status = status
        return refused
    unpaid = _pay(owner, spec, run, status)
    if unpaid is not None:
        return unpaid
    _remove_other_runs(owner, job_name)
    kind = build.workload_kind(spec)
    if this_run_before and previous.get("trainingJob") == job_name:
        job = _recorded_job(owner, job_name, kind)
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
    api_version, kind = build.workload_kind(spec)
    live = apply.get_object(api_version, kind, job_name, meta["namespace"])
    created = False
    if live is None or build.suspended(live):
        report = apply.ensure(build.children(owner, spec, config, suspended=True))
        created = f"{kind}/{job_name}" in report.created
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
            f"Created {kind} {job_name} to train the model (run {run}); its budget claim is "
            "consumed",
            action="StartJob",
        )
    return _recorded_job(owner, job_name, (api_version, kind))


def _recorded_job(
    owner: Mapping[str, Any], job_name: str, kind: tuple[str, str] = build.JOB
) -> dict[str, Any] | None:
    """The recorded run's workload, let run if still suspended; None once it is gone (only
    ever patched, never created: a merge patch of a deleted object makes nothing)."""
    namespace = owner["metadata"]["namespace"]
    api_version, kind_name = kind
    job = apply.get_object(api_version, kind_name, job_name, namespace)
    if job is not None and build.suspended(job):
        resume = build.resume_patch(kind_name)
        if not apply.patch_object(api_version, kind_name, job_name, namespace, resume):
            return None
        job = apply.get_object(api_version, kind_name, job_name, namespace)
    return job


def _trained(
    job: Mapping[str, Any] | None,
    job_name: str,
    spec: ConfidentialModelSpec,
    status: dict[str, Any],
) -> SealedArtifact | Result:
    """What the run's Job has come to: the sealed model, or why not (yet)."""
    state, message = workload_outcome(job)
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
