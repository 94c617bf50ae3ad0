"""SyntheticDataset handlers: claim the budget, run the hardened Job, report the result.

Claim rule (see the README): the claim becomes Consumed *before* the Job exists, because from
then on the Job could read the dataset; a Consumed claim is never refunded, whatever the Job
does later. A claim still Pending or Granted when the SyntheticDataset is deleted is Released.

One SyntheticDataset is one run: `status.jobName` is written as its Job is created, and from
then on the Job is never created again, nor the budget asked again. If the Job disappears,
a finished dataset stays Ready with its report; an unfinished one is Stalled (`JobLost`).

Status holds public facts only (claim state, Job name, output URI, the row count asked for)
and the report's DP estimates: nothing computed from the data without paying for it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Mapping
from typing import Any

import kopf

from veil import API_GROUP, API_VERSION, events, labels, logs
from veil.api.synthetic_dataset import SyntheticDatasetSpec
from veil.artifacts import ArtifactError, read_bytes
from veil.conditions import Outcome
from veil.config import OperatorConfig
from veil.controllers.budget_store import BudgetRef, BudgetUnavailableError
from veil.controllers.payment import pay_before_reading
from veil.controllers.privacy_budget import store
from veil.controllers.reconcile import Result, evaluate, first_line, forget, reconcile
from veil.kube import apply
from veil.kube.jobs import job_outcome
from veil.privacy import ClaimRequest, ConsumerRef, LedgerError
from veil.resources import synthetic_dataset as build
from veil.synthesis.privacy import claim_mechanisms

KIND = "SyntheticDataset"
PLURAL = "syntheticdatasets"
CONFIG = OperatorConfig.from_env()

RESUME = {"spec": {"suspend": False}}

_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def _budget_ref(owner: Mapping[str, Any], spec: SyntheticDatasetSpec) -> BudgetRef:
    return BudgetRef(
        spec.budget_ref.namespace or owner["metadata"]["namespace"], spec.budget_ref.name
    )


def _claim(owner: Mapping[str, Any], spec: SyntheticDatasetSpec) -> ClaimRequest:
    meta = owner["metadata"]
    synth = spec.synthesizer
    return ClaimRequest.model_validate(
        {
            "key": meta["uid"],
            "consumer": ConsumerRef(kind=KIND, namespace=meta["namespace"], name=meta["name"]),
            "mechanisms": claim_mechanisms(
                synth.method,
                synth.epsilon,
                synth.delta,
                synth.preprocessor_epsilon,
                discovery_epsilon=synth.discovery_epsilon,
                discovery_delta=synth.discovery_delta,
                report_epsilon=synth.report_epsilon,
            ),
            # A new generation may ask again after a denial.
            "attempt": int(meta.get("generation", 1)) - 1,
            # The budget pays only for its own dataset.
            "dataset": spec.source.uri,
        }
    )


def _done(spec: SyntheticDatasetSpec, status: dict[str, Any]) -> Result:
    """Ready, with what the status says: the rows asked for and the DP estimate, if any."""
    tvd = ((status.get("quality") or {}).get("oneWayTvd") or {}).get("mean")
    estimate = (
        f"; DP estimate of the mean 1-way TVD {tvd:.3f} (reportEpsilon "
        f"{spec.synthesizer.report_epsilon:g})"
        if isinstance(tvd, int | float)
        else ""
    )
    return Result(
        Outcome.done(
            "Synthesized", f"{status['rows']} rows at ε {spec.synthesizer.epsilon:g}{estimate}"
        ),
        status=status,
    )


def _finished(spec: SyntheticDatasetSpec, status: dict[str, Any]) -> Result:
    try:
        report = json.loads(read_bytes(build.report_uri(spec)))
    except (ArtifactError, OSError, ValueError) as missing:
        return Result(
            Outcome.failed(
                "ReportUnreadable",
                f"The synthesis Job finished but its report is unreadable "
                f"({first_line(str(missing))}); Veil retries every minute.",
            ),
            status=status,
            requeue_after=60,
            detail=str(missing),
        )
    # Only public facts and the paid DP estimate: the row count is the one asked for.
    quality = report.get("quality")
    status.update(
        outputUri=spec.output.uri,
        rows=spec.synthesizer.rows,
        quality=quality
        if isinstance(quality, dict) and quality.get("kind") == "dpEstimate"
        else None,
    )
    return _done(spec, status)


def converge(owner: Mapping[str, Any], spec: SyntheticDatasetSpec) -> Result:
    meta = owner["metadata"]
    with _guard:
        lock = _locks.setdefault(meta["uid"], threading.Lock())
    with lock:
        # The caller's copy may predate the record of the Job (a watch event read before the
        # previous pass wrote status.jobName): deciding on it could make a deleted Job again,
        # a second read on one claim. A GET is a consistent read, and the record is written
        # under this lock, so the copy read here has it.
        current = _current(meta)
        if current is None:
            return Result(
                Outcome.progressing("Deleting", f"{KIND} {meta['name']} is being deleted")
            )
        return _converge(current, spec)


def _current(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """The dataset as the API server has it now; None once it is gone, going, or replaced."""
    current = apply.get_object(f"{API_GROUP}/{API_VERSION}", KIND, meta["name"], meta["namespace"])
    if current is None or current["metadata"].get("uid") != meta["uid"]:
        return None
    return None if current["metadata"].get("deletionTimestamp") else current


def _job(owner: Mapping[str, Any]) -> dict[str, Any] | None:
    meta = owner["metadata"]
    return apply.get_object("batch/v1", "Job", build.job_name(owner), meta["namespace"])


def _record(meta: Mapping[str, Any], fields: dict[str, Any]) -> None:
    apply.patch_status(f"{API_GROUP}/{API_VERSION}", KIND, meta["name"], meta["namespace"], fields)


def _create_job(owner: Mapping[str, Any], spec: SyntheticDatasetSpec, name: str) -> None:
    """Create the Job suspended (no pod, so it cannot read), record it, then let it run.

    A Job recorded in status is never created again, so it never reads twice; a crash at any
    step loses nothing: before the record only a suspended Job can exist, and after it the
    next pass resumes that Job (`_started`).
    """
    meta = owner["metadata"]
    live = _job(owner)
    if live is None or (live.get("spec") or {}).get("suspend"):
        apply.ensure(build.children(owner, spec, CONFIG, suspended=True))
    _record(meta, {"jobName": name, "claimState": "Consumed"})
    _resume(owner, name)
    events.normal(
        owner,
        "JobCreated",
        f"Created Job {name} to synthesize {spec.synthesizer.rows} rows at ε "
        f"{spec.synthesizer.epsilon:g}; its budget claim is consumed",
        action="StartJob",
    )


def _resume(owner: Mapping[str, Any], name: str) -> None:
    """Let the recorded Job run; a Job deleted meanwhile is not made again (JobLost)."""
    apply.patch_object("batch/v1", "Job", name, owner["metadata"]["namespace"], RESUME)


def _converge(owner: Mapping[str, Any], spec: SyntheticDatasetSpec) -> Result:
    name = build.job_name(owner)
    if (owner.get("status") or {}).get("jobName") == name:
        return _started(owner, spec, name)
    status: dict[str, Any] = {}
    ref = _budget_ref(owner, spec)
    unpaid = pay_before_reading(ref, _claim(owner, spec), status)
    events.claim_state_changed(
        owner,
        (owner.get("status") or {}).get("claimState"),
        status.get("claimState"),
        f"{ref.namespace}/{ref.name}",
    )
    if unpaid is not None:
        return unpaid
    _create_job(owner, spec, name)
    recorded = {**(owner.get("status") or {}), "jobName": name, "claimState": "Consumed"}
    return _started({**owner, "status": recorded}, spec, name)


def _started(owner: Mapping[str, Any], spec: SyntheticDatasetSpec, name: str) -> Result:
    """A run whose Job was created: the budget is not asked again (its claim may be folded
    away) and the Job is never made again."""
    previous = owner.get("status") or {}
    status: dict[str, Any] = {"claimState": "Consumed", "jobName": name}
    if previous.get("outputUri"):
        status.update(
            outputUri=previous["outputUri"],
            rows=spec.synthesizer.rows,
            quality=previous.get("quality"),
        )
        return _done(spec, status)
    job = _job(owner)
    if job is not None and (job.get("spec") or {}).get("suspend"):
        # Recorded but not yet let run (the operator stopped in between): resume it.
        _resume(owner, name)
        job = _job(owner)
    if job is None:
        return Result(
            Outcome.stalled_with(
                "JobLost",
                f"Job {name} was deleted before it finished; it may have read the data, so it "
                "is not run again on the same claim: create a new SyntheticDataset to "
                "synthesize again, paid anew",
            ),
            status=status,
        )
    return _outcome(spec, job, status)


def _outcome(
    spec: SyntheticDatasetSpec, job: Mapping[str, Any] | None, status: dict[str, Any]
) -> Result:
    state, message = job_outcome(job)
    if state == "Complete":
        return _finished(spec, status)
    if state == "Failed":
        return Result(
            Outcome.stalled_with(
                "JobFailed",
                f"synthesis Job failed: {message}; the budget stays spent "
                "(the Job could read the data)",
            ),
            status=status,
        )
    return Result(
        Outcome.progressing("Synthesizing", f"Job {status['jobName']} is running"), status=status
    )


async def _domain(spec: SyntheticDatasetSpec, body: Mapping[str, Any], logger: Any) -> Result:
    return await asyncio.to_thread(converge, body, spec)


@kopf.on.resume(API_GROUP, API_VERSION, PLURAL)
@kopf.on.create(API_GROUP, API_VERSION, PLURAL)
@kopf.on.update(API_GROUP, API_VERSION, PLURAL)
async def on_dataset(body: kopf.Body, patch: kopf.Patch, logger: Any, **_: Any) -> None:
    await reconcile(
        kind=KIND,
        spec_model=SyntheticDatasetSpec,
        body=body,
        patch=patch,
        domain=_domain,
        logger=logger,
    )


@kopf.on.event("batch", "v1", "jobs", labels={labels.OWNER_KIND: KIND})
async def on_job_changed(event: kopf.RawEvent, logger: Any, **_: Any) -> None:
    """A Job finished, failed or was deleted: re-evaluate its SyntheticDataset."""
    job = event.get("object") or {}
    job_meta = job.get("metadata", {})
    owner_name = (job_meta.get("labels") or {}).get(labels.INSTANCE)
    namespace = job_meta.get("namespace")
    if not owner_name or not namespace:
        return
    logs.start(KIND, namespace, owner_name)
    owner = await asyncio.to_thread(
        apply.get_object, f"{API_GROUP}/{API_VERSION}", KIND, owner_name, namespace
    )
    if owner is None or owner["metadata"].get("deletionTimestamp"):
        return
    evaluation = await evaluate(
        kind=KIND, spec_model=SyntheticDatasetSpec, body=owner, domain=_domain, logger=logger
    )
    if evaluation.status_patch:
        await asyncio.to_thread(
            apply.patch_status,
            f"{API_GROUP}/{API_VERSION}",
            KIND,
            owner_name,
            namespace,
            evaluation.status_patch,
        )
    if evaluation.events:
        await asyncio.to_thread(evaluation.record_events, owner)


@kopf.on.delete(API_GROUP, API_VERSION, PLURAL)
async def on_dataset_deleted(body: kopf.Body, logger: Any, **_: Any) -> None:
    """The Job goes by garbage collection; an unspent claim goes back to the budget."""
    forget(KIND, body)
    _locks.pop(body["metadata"]["uid"], None)
    spec_data = dict(body.get("spec") or {})
    budget = spec_data.get("budgetRef")
    if not budget:
        return
    ref = BudgetRef(budget.get("namespace") or body["metadata"]["namespace"], budget["name"])
    try:
        await asyncio.to_thread(
            store().release,
            ref,
            body["metadata"]["uid"],
            "the SyntheticDataset was deleted before its Job could read",
        )
    except BudgetUnavailableError:
        return  # the budget is gone: nothing to give back
    except LedgerError as kept:
        logger.info("claim kept: %s", kept)
