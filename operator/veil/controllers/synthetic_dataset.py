"""SyntheticDataset handlers: claim the budget, run the hardened Job, report the result.

Claim rule (see the README): the claim becomes Consumed *before* the Job exists, because from
then on the Job could read the dataset; a Consumed claim is never refunded, whatever the Job
does later. A claim still Pending or Granted when the SyntheticDataset is deleted is Released.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Mapping
from typing import Any

import kopf

from veil import API_GROUP, API_VERSION, labels
from veil.api.synthetic_dataset import SyntheticDatasetSpec
from veil.artifacts import ArtifactError, read_bytes
from veil.conditions import Outcome
from veil.config import OperatorConfig
from veil.controllers.budget_store import BudgetRef, BudgetUnavailableError
from veil.controllers.payment import pay_before_reading
from veil.controllers.privacy_budget import store
from veil.controllers.reconcile import Result, evaluate, forget, reconcile
from veil.kube import apply
from veil.kube.jobs import job_outcome
from veil.privacy import ClaimRequest, ConsumerRef, LedgerError
from veil.resources import synthetic_dataset as build
from veil.synthesis.privacy import claim_mechanisms

KIND = "SyntheticDataset"
PLURAL = "syntheticdatasets"
CONFIG = OperatorConfig.from_env()

_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def _budget_ref(owner: Mapping[str, Any], spec: SyntheticDatasetSpec) -> BudgetRef:
    assert spec.budget_ref is not None
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
                synth.method, synth.epsilon, synth.delta, synth.preprocessor_epsilon
            ),
            # A new generation may ask again after a denial.
            "attempt": int(meta.get("generation", 1)) - 1,
        }
    )


def _finished(spec: SyntheticDatasetSpec, status: dict[str, Any]) -> Result:
    try:
        report = json.loads(read_bytes(build.report_uri(spec)))
    except (ArtifactError, OSError, ValueError) as missing:
        return Result(
            Outcome.failed(
                "ReportUnreadable", f"the Job finished but its report is unreadable: {missing}"
            ),
            status=status,
            requeue_after=60,
        )
    quality = report.get("quality") or {}
    rows = report.get("rows") or {}
    status.update(outputUri=spec.output.uri, rows=int(rows.get("synthetic", 0)), quality=quality)
    one_way = (quality.get("oneWayTvd") or {}).get("mean")
    two_way = (quality.get("twoWayTvd") or {}).get("mean")
    figures = f"; mean 1-way TVD {one_way:.3f}, 2-way {two_way:.3f}" if one_way and two_way else ""
    return Result(
        Outcome.done(
            "Synthesized", f"{status['rows']} rows at ε {spec.synthesizer.epsilon:g}{figures}"
        ),
        status=status,
    )


def converge(owner: Mapping[str, Any], spec: SyntheticDatasetSpec) -> Result:
    uid = owner["metadata"]["uid"]
    with _guard:
        lock = _locks.setdefault(uid, threading.Lock())
    with lock:
        return _converge(owner, spec)


def _converge(owner: Mapping[str, Any], spec: SyntheticDatasetSpec) -> Result:
    meta = owner["metadata"]
    status: dict[str, Any] = {}
    if spec.allow_non_private:
        status["claimState"] = None  # nothing to pay
    else:
        unpaid = pay_before_reading(_budget_ref(owner, spec), _claim(owner, spec), status)
        if unpaid is not None:
            return unpaid
    status["jobName"] = build.job_name(owner)
    apply.ensure(build.children(owner, spec, CONFIG))
    job = apply.get_object("batch/v1", "Job", build.job_name(owner), meta["namespace"])
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
